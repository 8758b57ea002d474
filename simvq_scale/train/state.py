"""TrainState: everything a resumed run needs besides the engines' own weights and optimizer state."""

from __future__ import annotations

from dataclasses import dataclass, field

from simvq_scale.train.ema import EMA


@dataclass
class TrainState:
    ema: EMA
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # global samples consumed
    data: dict = field(default_factory=dict)  # the data stream's position (its loader's state)

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "data": self.data,
                "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.data = dict(state.get("data", {}))
        self.ema.load_state_dict(state["ema"])
