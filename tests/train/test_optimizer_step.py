"""OptimizerStep: a ZeRO-0 engine clipped on the device matches DeepSpeed's own clipping (ZeRO-1) step for
step, across ranks, and a step of non-finite gradients leaves the weights and AdamW's state alone."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import ROOT


def all_finite():
    return torch.ones((), dtype=torch.bool)  # what NonFiniteGuard.take says when every loss was finite


def two_engines_worker(rank, world_size):
    from simvq_scale.config import load_config
    from simvq_scale.train.engines import OptimizerStep, build_engine

    # grad_clip far below the gradients' norm: every step is clipped
    cfg = load_config(ROOT / "configs" / "image_demo.yaml", [
        f"train.global_batch={4 * world_size}", "optim.grad_clip=0.05", "optim.warmup_steps=0", "optim.lr=0.01"])
    steps, models = {}, {}
    for stage in (0, 1):
        torch.manual_seed(0)
        models[stage] = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        engine = build_engine(models[stage], cfg, cfg.optim.lr, stage, micro_batch=4, accumulation=1, bf16=False)
        steps[stage] = OptimizerStep(engine, cfg.optim.grad_clip, stage, all_finite)
    torch.manual_seed(1 + rank)  # each rank its own data: the norm must be of the all-reduced gradients
    norms = []
    for _ in range(3):
        x = torch.randn(4, 6)
        for stage, step in steps.items():
            step.engine.backward(step.engine(x).pow(2).sum())
            step()
        norms.append([steps[0].grad_norm(), steps[1].grad_norm()])
    weights = {stage: [p.detach().clone() for p in m.parameters()] for stage, m in models.items()}

    zero0 = steps[0]
    before = [p.detach().clone() for p in models[0].parameters()]
    adam_steps = [zero0.engine.optimizer.state[p]["step"].clone() for p in models[0].parameters()]
    zero0.engine.backward(zero0.engine(torch.randn(4, 6)).sum() * float("inf"))
    zero0()
    return {"weights": weights, "norms": norms, "nonfinite_norm": zero0.grad_norm(),
            "unchanged": all(torch.equal(a, p) for a, p in zip(before, models[0].parameters())),
            "adam_steps_kept": all(torch.equal(s, zero0.engine.optimizer.state[p]["step"])
                                   for s, p in zip(adam_steps, models[0].parameters())),
            "ds_clip_zero0": zero0.engine.gradient_clipping()}


@pytest.mark.slow
def test_zero0_device_clipping_matches_deepspeed_clipping_and_skips_nonfinite_steps():
    results = run_distributed(two_engines_worker, 2, timeout_s=240)
    for r in results:
        assert r["ds_clip_zero0"] == 0.0  # DeepSpeed does not clip a ZeRO-0 engine a second time
        for zero0, zero1 in r["norms"]:
            assert zero0 == pytest.approx(zero1, rel=1e-5) and zero0 > 0.05 * 2  # clipped every step
        for a, b in zip(r["weights"][0], r["weights"][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert r["nonfinite_norm"] != r["nonfinite_norm"] or r["nonfinite_norm"] == float("inf")
        assert r["unchanged"] and r["adam_steps_kept"]
    torch.testing.assert_close(results[0]["weights"][0], results[1]["weights"][0])  # ranks agree


def one_rank_worker(rank, world_size):
    from simvq_scale.config import load_config
    from simvq_scale.train.engines import OptimizerStep, build_engine

    cfg = load_config(ROOT / "configs" / "image_demo.yaml", [
        "train.global_batch=4", "optim.grad_clip=0.05", "optim.warmup_steps=0", "optim.lr=0.01"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    plain = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    plain.load_state_dict(model.state_dict())
    engine = build_engine(model, cfg, cfg.optim.lr, 0, micro_batch=4, accumulation=1, bf16=False)
    step = OptimizerStep(engine, cfg.optim.grad_clip, 0, all_finite)
    adam = torch.optim.AdamW(plain.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                             weight_decay=cfg.optim.weight_decay)
    for _ in range(3):
        x = torch.randn(4, 6)
        engine.backward(engine(x).pow(2).sum())
        step()
        plain(x).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
        adam.step()
        adam.zero_grad()
    return {"allreduce": engine.enable_backward_allreduce, "engine": [p.detach() for p in model.parameters()],
            "plain": [p.detach() for p in plain.parameters()]}


@pytest.mark.slow
def test_a_one_rank_zero0_engine_skips_the_all_reduce_and_steps_as_plain_torch():
    result = run_distributed(one_rank_worker, 1, timeout_s=240)[0]
    assert result["allreduce"] is False
    torch.testing.assert_close(result["engine"], result["plain"], rtol=1e-5, atol=1e-6)


def guard_worker(rank, world_size):
    from simvq_scale.train.nonfinite import NonFiniteGuard

    module = torch.nn.Linear(2, 2)
    guard = NonFiniteGuard([module], torch.device("cpu"), "skip")
    verdicts = []
    for bad_rank in (0, None):  # a step where rank 0 had one non-finite micro-step, then a clean step
        guard.check(module, torch.tensor(1.0))
        guard.check(module, torch.tensor(float("nan") if rank == bad_rank else 2.0))
        verdicts.append(bool(guard.take(module)))
    return {"verdicts": verdicts, "count": int(guard.count)}


@pytest.mark.slow
def test_the_guard_verdict_covers_every_micro_step_and_every_rank_and_resets_per_step():
    ranks = run_distributed(guard_worker, 2, timeout_s=120)
    assert [r["verdicts"] for r in ranks] == [[False, True], [False, True]]  # rank 1's losses were all finite
    assert [r["count"] for r in ranks] == [1, 0]
