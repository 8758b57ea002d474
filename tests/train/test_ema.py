"""The EMA generator: ema <- ema + (1 - decay)(w - ema) per update, frozen buffers shared, persistent ones followed."""

import torch
from torch import nn

from simvq_scale.train.ema import EMA


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("codebook", torch.randn(4, 3), persistent=False)  # frozen, possibly huge
        self.register_buffer("count", torch.zeros(()))


def test_ema_update_follows_the_weights_and_buffers_without_autograd():
    model = WithBuffers()
    ema = EMA(model, decay=0.9)
    start = ema.module.linear.weight.clone()
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        model.count.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.module.linear.weight, start + 0.1 * (model.linear.weight.detach() - start))
    assert ema.module.count.item() == 7  # a persistent buffer is copied
    assert ema.module.codebook is model.codebook  # the frozen buffer is held once
    assert not ema.module.linear.weight.requires_grad and ema.module.linear.weight.grad_fn is None
    assert model.linear.weight.requires_grad  # the model is left as it was
