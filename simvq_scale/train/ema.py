"""The EMA copy of the generator: what evaluation, reconstructions and the export use."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of `model` following its weights: ema <- ema + (1 - decay) (w - ema) after each step.

    The copy's non-persistent buffers (the frozen codebook, possibly gigabytes at a million codes) are the
    model's own tensors, held once; its persistent buffers are copied from the model at each update. Make
    it before torch.compile touches the model (a compiled module does not deep-copy).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self._buffer_pairs = _share_frozen_buffers(self.module, model)
        self._params = list(self.module.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # under no_grad the parameters themselves serve (a detached view of each was one more host op per tensor)
        torch._foreach_lerp_(self._params, list(model.parameters()), 1.0 - self.decay)
        for ema_buffer, buffer in self._buffer_pairs:
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def _share_frozen_buffers(ema: nn.Module, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Point the copy's non-persistent buffers at the model's own tensors; return the (copy, model) pairs
    of the persistent buffers, which the copy follows."""
    pairs = []
    model_modules = dict(model.named_modules())
    for name, ema_module in ema.named_modules():
        source = model_modules[name]
        for buffer_name, buffer in source._buffers.items():
            if buffer is None:
                continue
            if buffer_name in source._non_persistent_buffers_set:
                ema_module._buffers[buffer_name] = buffer
            else:
                pairs.append((ema_module._buffers[buffer_name], buffer))
    return pairs
