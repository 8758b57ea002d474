"""TrainState: everything a resumed run needs besides the engines' own weights and optimizer state."""

from __future__ import annotations

from dataclasses import dataclass, field

from simvq_scale.train.ema import EMA


@dataclass
class TrainState:
    """The shared part (step, samples seen, EMA weights: the same on every rank, saved once) and this rank's
    part (its data stream's position, saved in its own rank file)."""

    ema: EMA
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # global samples consumed
    data: dict = field(default_factory=dict)  # this rank's loader position (loader.state_dict())

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.ema.load_state_dict(state["ema"])

    def rank_state_dict(self) -> dict:
        return {"loader": self.data}

    def load_rank_state_dict(self, state: dict) -> None:
        self.data = dict(state.get("loader") or {})
