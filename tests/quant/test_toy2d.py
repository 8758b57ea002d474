"""The paper's 2-D toy (Sec. 4.2.1), asserted numerically.

Codes start as the same 2-D Gaussian codebook C; features are a Gaussian blob
off to one side. Training minimises the commitment loss with Adam.
- SimVQ (C frozen, W trained): one step of W moves every code.
- Vanilla VQ: a code moves only if it was the nearest code of some feature in some
  step. Adam's update of a row whose gradient was always exactly zero is exactly
  zero, so "moved" and "ever selected" must be the same set, and it is small.
- SimVQ with C trainable too (train_codebook=True): C's gradient lands only on the
  selected rows, which then run to the features on their own, so fewer codes end
  up used than with C frozen (the paper's finding that training C brings collapse back).
"""

import torch

from simvq_scale.quant.simvq import SimVQ
from simvq_scale.quant.vq import VQ

K, STEPS, BATCH, LR = 256, 200, 512, 1e-2


def features() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4096, 2, generator=g) * 0.5 + 2.0


def codes_of(q) -> torch.Tensor:
    with torch.no_grad():
        return q.decode_indices(torch.arange(K)).clone()


def train(q, steps: int) -> set[int]:
    """Adam on the commitment loss; returns every index selected along the way."""
    x = features()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(q.parameters(), lr=LR)
    selected: set[int] = set()
    for _ in range(steps):
        out = q(x[torch.randint(x.shape[0], (BATCH,), generator=g)])
        selected.update(out.indices.tolist())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return selected


def utilization(q) -> float:
    with torch.no_grad():
        return q(features()).indices.unique().numel() / K


def simvq(train_codebook: bool = False) -> SimVQ:
    torch.manual_seed(0)
    return SimVQ(K, 2, seed=0, train_codebook=train_codebook, search_impl="torch")


def test_simvq_moves_every_code_after_a_few_steps():
    q = simvq()
    before = codes_of(q)
    selected = train(q, 3)
    moved = (codes_of(q) - before).norm(dim=1)
    assert len(selected) < K // 2  # most codes were nobody's nearest ...
    # ... and still every one of them moved (far above fp32 rounding; a zero move would need a code
    # exactly at the fixed point of the change of the affine map)
    assert bool((moved > 1e-5).all()), moved.min()


def test_vanilla_vq_moves_exactly_the_codes_that_were_selected():
    q = VQ(K, 2, search_impl="torch")
    with torch.no_grad():
        q.embedding.weight.copy_(simvq().codebook.weight)  # the same starting codes as SimVQ
    before = codes_of(q)
    selected = train(q, 20)
    moved = set(torch.nonzero((codes_of(q) - before).norm(dim=1) > 0).flatten().tolist())
    assert moved == selected
    assert len(moved) < K // 4


def test_training_c_as_well_brings_collapse_back():
    frozen, trained = simvq(False), simvq(True)
    train(frozen, STEPS)
    train(trained, STEPS)
    u_frozen, u_trained = utilization(frozen), utilization(trained)
    # measured 0.29 vs 0.23 with these seeds; the margin asserted is half of that gap
    assert u_frozen > u_trained + 0.03, (u_frozen, u_trained)
