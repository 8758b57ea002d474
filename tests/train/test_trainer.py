"""The DeepSpeed GAN trainer on CPU: real engines (ZeRO-0 by default, ZeRO-2/1 where a test says) over gloo."""

import json
import subprocess
import sys

import pytest
import torch

from tests.dist_utils import run_distributed
from simvq_scale.train.checkpoint import tag_for
from tests.helpers import ROOT, fit_worker, losses_by_step, make_trainer, read_tensorboard, tiny_overrides, train

# every test trains on spawned gloo ranks or runs launch/train.py: the slow lane
pytestmark = pytest.mark.slow

TAGS = ["loss/total_g", "loss/recon", "loss/perceptual", "loss/commit", "loss/g_adv", "loss/d",
        "codebook/utilization", "codebook/perplexity", "codebook/dead_codes", "W/rank", "W/fro_norm",
        "opt/lr_g", "opt/grad_norm_g", "perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_frac",
        "perf/max_mem_gib"]


def first_batch(trainer):
    return next(iter(trainer.loader))["x"][: trainer.micro_batch]


def flat(module):
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def gan_steps_worker(rank, world_size, overrides):
    import torch.distributed as dist

    trainer = make_trainer(overrides)
    x = first_batch(trainer)
    g0, d0 = flat(trainer.generator), flat(trainer.discriminator)
    x_hat, parts = trainer.generator_step(x)
    g1, d1 = flat(trainer.generator), flat(trainer.discriminator)
    d_grads_after_g = [p.grad for p in trainer.discriminator.parameters() if p.grad is not None]
    trainer.discriminator_step(x, x_hat)
    g2, d2 = flat(trainer.generator), flat(trainer.discriminator)
    every_rank = [torch.empty_like(torch.cat([g2, d2])) for _ in range(world_size)]
    dist.all_gather(every_rank, torch.cat([g2, d2]))
    return {
        "g_step_moved_g": not torch.equal(g0, g1), "g_step_left_d": torch.equal(d0, d1),
        "d_grads_after_g": len(d_grads_after_g),
        "d_step_moved_d": not torch.equal(d1, d2), "d_step_left_g": torch.equal(g1, g2),
        "ranks_identical": all(torch.equal(every_rank[0], other) for other in every_rank[1:]),
        "g_adv_finite": bool(torch.isfinite(parts["loss/g_adv"])),
        "d_requires_grad_restored": all(p.requires_grad for p in trainer.discriminator.parameters()),
        "micro_batch": trainer.micro_batch,
    }


@pytest.mark.parametrize("shard_group", ["none", "world"])
def test_gan_step_under_zero2_touches_only_its_own_network(demo_data, tmp_path, shard_group):
    overrides = tiny_overrides(demo_data, tmp_path / "run", f"quantizer.shard.group={shard_group}")
    results = run_distributed(gan_steps_worker, 2, overrides, timeout_s=300)
    for r in results:
        assert r["g_step_moved_g"] and r["g_step_left_d"] and r["d_grads_after_g"] == 0
        assert r["d_step_moved_d"] and r["d_step_left_g"]
        assert r["ranks_identical"] and r["g_adv_finite"] and r["d_requires_grad_restored"]
        assert r["micro_batch"] == 2  # global batch 4 over 2 ranks


def test_resume_reproduces_the_uninterrupted_run(demo_data, tmp_path):
    # with the data-dependent start on: a resumed run skips it and takes W and b from the checkpoint
    common = ["train.log_every=1", "train.ckpt_every=2", "train.keep_last=2", "quantizer.simvq.init_from_data=true"]
    straight = tiny_overrides(demo_data, tmp_path / "straight", *common, "train.steps=4")
    first_half = tiny_overrides(demo_data, tmp_path / "resumed", *common, "train.steps=2")
    second_half = tiny_overrides(demo_data, tmp_path / "resumed", *common, "train.steps=4")
    run_distributed(fit_worker, 2, [(straight, None), (first_half, None), (second_half, "auto")], timeout_s=600)
    a, b = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "resumed")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):  # after the resume: same data stream, weights, optimizer and LR schedule
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6)
    assert a[3] != a[4]  # the run does move, so equality above is not trivial
    assert (tmp_path / "resumed" / "ckpt" / "latest").read_text() == "step000000004"
    kept = sorted(p.name for p in (tmp_path / "resumed" / "ckpt" / "generator").iterdir() if p.is_dir())
    assert kept == ["step000000002", "step000000004"]
    assert (tmp_path / "resumed" / "ckpt" / "discriminator" / "step000000004").is_dir()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_a_gpu_forgets_the_restored_usage_window(demo_data, tmp_path):
    # the usage window loads on the CPU and the next steps' codes come on the GPU; each step here fills the
    # window (1,024 tokens), so the first step after the resume forgets the restored ones (this raised "found
    # at least two devices" on an H200)
    common = ["train.log_every=1", "train.ckpt_every=2", "train.compile=false"]
    first_half = tiny_overrides(demo_data, tmp_path / "run", *common, "train.steps=2")
    second_half = tiny_overrides(demo_data, tmp_path / "run", *common, "train.steps=4")
    run_distributed(fit_worker, 1, [(first_half, None), (second_half, "auto")], backend="nccl", timeout_s=600)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4]
    assert all(0 < r["codebook/utilization"] <= 1 for r in rows)


def device_waits_worker(rank, world_size, overrides):
    from deepspeed.accelerator import get_accelerator

    trainer = make_trainer(overrides)
    x = first_batch(trainer)
    for _ in range(3):  # DeepSpeed's throughput timer starts synchronizing at its engine's step 2
        trainer.train_step(x)
    accelerator = get_accelerator()
    calls = []
    plain = accelerator.synchronize
    accelerator.synchronize = lambda *args, **kwargs: (calls.append(args), plain(*args, **kwargs))[1]
    try:
        trainer.train_step(x)
    finally:
        accelerator.synchronize = plain
    return len(calls)


def test_a_training_step_never_waits_for_the_whole_device(demo_data, tmp_path):
    """A device-wide synchronize inside the step drains the launch queue: the GPU idles while the host issues
    the next work (DeepSpeed's throughput timer did so at every engine forward and step)."""
    overrides = tiny_overrides(demo_data, tmp_path / "run", "train.global_batch=2")
    assert run_distributed(device_waits_worker, 1, overrides, timeout_s=300) == [0]


def nan_worker(rank, world_size, overrides):
    trainer = make_trainer(overrides)
    x = first_batch(trainer)
    before = flat(trainer.generator)
    x_bad = x.clone()
    if rank == 0:  # one rank's micro-step goes wrong: every rank must skip the step
        x_bad[0, 0, 0, 0] = float("nan")
    trainer.generator_step(x_bad)
    skipped = flat(trainer.generator)
    trainer.generator_step(x)  # the next step proceeds
    after = flat(trainer.generator)
    outcome = {"skipped": torch.equal(before, skipped), "moved_after": not torch.equal(skipped, after),
               "params": after, "count": None, "error": None}
    try:
        outcome["count"] = trainer.guard.reduce(trainer.state.step)
    except FloatingPointError as e:
        outcome["error"] = str(e)
    return outcome


@pytest.mark.parametrize("stages", [(0, 0), (2, 1)], ids=["zero0", "zero2-1"])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(demo_data, tmp_path, stages):
    overrides = tiny_overrides(demo_data, tmp_path / "skip", "train.nan_policy=skip", "train.global_batch=4",
                               f"optim.zero_stage_g={stages[0]}", f"optim.zero_stage_d={stages[1]}")
    ranks = run_distributed(nan_worker, 2, overrides, timeout_s=300)
    for r in ranks:
        assert r["skipped"] and r["moved_after"] and r["count"] == 1 and r["error"] is None
        assert torch.isfinite(r["params"]).all()
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


def test_nan_policy_stop_raises_at_the_count(demo_data, tmp_path):
    stop = run_distributed(nan_worker, 1, tiny_overrides(demo_data, tmp_path / "stop", "train.nan_policy=stop"),
                           timeout_s=300)[0]
    assert stop["skipped"] and stop["error"] and "nan_policy=stop" in stop["error"]


def test_plain_python_run_writes_every_tag_and_a_loadable_export(demo_data, tmp_path):
    out = tmp_path / "plain"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "image_demo.yaml"),
           "--set", *tiny_overrides(demo_data, out, "train.steps=2", "train.log_every=1")]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2/2" in done.stdout
    tags = read_tensorboard(out / "tb")
    for tag in TAGS:
        assert tag in tags["scalars"], tag
    assert "W/singular_values" in tags["histograms"]
    assert "recon/images" in tags["images"]
    assert (out / "config.yaml").exists() and (out / "ckpt" / "latest").exists()
    export = torch.load(out / "generator_ema.pt", weights_only=False)
    assert export["step"] == 2 and export["config"]["quantizer"]["codebook_size"] == 256

    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    summary = json.loads(dry.stdout.strip().splitlines()[-1])
    assert summary["tokens_per_sample"] == 16 * 16 and summary["codebook_size"] == 256
    for key in ("parameters_generator", "parameters_discriminator", "global_batch", "world_size"):
        assert key in summary


def test_bad_config_value_stops_before_training(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "image_demo.yaml"),
           "--set", "quantizer.codebok_size=3", "--dry-run"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "quantizer.codebok_size" in done.stderr and "codebook_size" in done.stderr


def test_a_checkpoint_from_before_the_fused_adamw_resumes(demo_data, tmp_path):
    # such a checkpoint's AdamW param groups say fused=None; loading them would leave the unfused AdamW,
    # which refuses the found_inf flag the step is skipped with
    run = tmp_path / "run"
    done = train(run, *tiny_overrides(demo_data, run, "train.steps=1", "train.ckpt_every=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    for engine in ("generator", "discriminator"):
        path = run / "ckpt" / engine / tag_for(1) / "mp_rank_00_model_states.pt"
        saved = torch.load(path, weights_only=False)
        for group in saved["optimizer"]["param_groups"]:
            group["fused"] = None
        torch.save(saved, path)
    done = train(run, *tiny_overrides(demo_data, run, "train.steps=2"), extra=["--resume", "auto"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "ckpt" / "latest").read_text() == tag_for(2)
