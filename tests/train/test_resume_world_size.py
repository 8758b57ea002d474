"""A run trained on 2 gloo ranks resumes on 1 and on 3: weights, Adam moments and the usage window carry over
whole, and training continues with the same step count. Global batch 6 divides by 1, 2 and 3. ZeRO-1/2 engines
go through DeepSpeed's universal checkpoint (made and removed by the checkpointer); a ZeRO-0 engine's
optimizer state is whole in its model-states file and loads as it is."""

import json
import shutil

import pytest
import torch
import torch.distributed as dist

from simvq_scale.train.checkpoint import TRAINER_STATE, load_deepspeed_file, tag_for
from simvq_scale.weights_only import UnsafeFileError
from tests.dist_utils import run_distributed
from tests.helpers import fit_worker, make_trainer, plant, tiny_overrides

COMMON = ["train.global_batch=6", "train.ckpt_every=2", "train.log_every=1"]
CODEBOOK_SIZE = 256  # helpers.TINY_IMAGE
ZERO_1_2 = ["optim.zero_stage_g=2", "optim.zero_stage_d=1"]
ZERO_0 = ["optim.zero_stage_g=0", "optim.zero_stage_d=0"]


def state_vector(state_dict):
    return torch.cat([t.reshape(-1).float() for t in state_dict.values()])


@pytest.fixture(scope="module")
def two_rank_runs(demo_data, tmp_path_factory):
    """stages -> a run folder trained for 2 steps on 2 ranks with those ZeRO stages (made once per module)."""
    made = {}

    def run(stages: tuple[str, ...]):
        if stages not in made:
            out = tmp_path_factory.mktemp("world_size") / "run"
            run_distributed(fit_worker, 2, [(tiny_overrides(demo_data, out, *COMMON, *stages, "train.steps=2"), None)],
                            timeout_s=600)
            made[stages] = out
        return made[stages]

    return run


def saved_figures(run, partitioned: bool):
    """What the 2-rank checkpoint holds, summed over its ranks: generator weights, Adam's second moments
    of both engines (ZeRO partitions or the whole state of a ZeRO-0 engine), and the usage window."""
    tag = run / "ckpt" / "generator" / tag_for(2)
    module = load_deepspeed_file(tag / "mp_rank_00_model_states.pt")["module"]
    moments = {}
    for engine in ("generator", "discriminator"):
        folder = run / "ckpt" / engine / tag_for(2)
        files = sorted(folder.glob("zero_pp_rank_*_optim_states.pt"))
        assert len(files) == (2 if partitioned else 0)
        if partitioned:
            moments[engine] = sum(float(load_deepspeed_file(f)["optimizer_state_dict"]["base_optimizer_state"]
                                        ["state"][0]["exp_avg_sq"].double().sum()) for f in files)
        else:
            adam = load_deepspeed_file(folder / "mp_rank_00_model_states.pt")["optimizer"]
            moments[engine] = sum(float(s["exp_avg_sq"].double().sum()) for s in adam["state"].values())
    counts = sum(torch.load(tag / f"rank_{r}.pt", weights_only=True)["usage"]["indices"].bincount(minlength=256)
                 for r in range(2))
    tokens = sum(int(torch.load(tag / f"rank_{r}.pt", weights_only=True)["usage"]["step_lengths"].sum())
                 for r in range(2))
    return {"weights": state_vector(module), "moments": moments,
            "tokens": tokens, "utilization": float((counts > 0).sum()) / CODEBOOK_SIZE}


def resume_worker(rank, world_size, restore_only, continue_to_4):
    trainer = make_trainer(restore_only, "auto")  # train.steps=2: resumes at step 2 and trains no step
    trainer.fit()
    moments = {}
    for name, engine in (("generator", trainer.engine_g), ("discriminator", trainer.engine_d)):
        partitioned = engine.zero_optimization()
        adam = engine.optimizer.optimizer if partitioned else engine.optimizer  # the client AdamW
        total = torch.tensor([sum(float(s["exp_avg_sq"].double().sum()) for s in adam.state.values())],
                             dtype=torch.float64)
        if partitioned:
            dist.all_reduce(total)  # each rank holds its ZeRO partition of the moments
        moments[name] = float(total)
    usage = trainer.metrics.usage.reduce()
    restored = {"step": trainer.state.step, "weights": state_vector(trainer.engine_g.module.state_dict()), "moments": moments,
                "tokens": usage["window_tokens"], "utilization": usage["utilization"]}
    make_trainer(continue_to_4, "auto").fit()
    return restored


@pytest.mark.slow
@pytest.mark.parametrize("stages,world_size", [(ZERO_1_2, 1), (ZERO_1_2, 3), (ZERO_0, 3)],
                         ids=["zero2/1-on-1", "zero2/1-on-3", "zero0-on-3"])
def test_a_two_rank_run_resumes_on_another_world_size(demo_data, two_rank_runs, tmp_path, stages, world_size):
    run = tmp_path / "run"
    shutil.copytree(two_rank_runs(tuple(stages)), run)
    saved = saved_figures(run, partitioned=stages == ZERO_1_2)
    results = run_distributed(resume_worker, world_size,
                              tiny_overrides(demo_data, run, *COMMON, *stages, "train.steps=2"),
                              tiny_overrides(demo_data, run, *COMMON, *stages, "train.steps=4"), timeout_s=900)
    for restored in results:
        assert restored["step"] == 2
        assert torch.equal(restored["weights"], saved["weights"])
        assert restored["tokens"] == saved["tokens"] and restored["utilization"] == saved["utilization"]
        for engine in ("generator", "discriminator"):
            assert restored["moments"][engine] == pytest.approx(saved["moments"][engine], rel=1e-9)
            assert saved["moments"][engine] > 0  # the optimizer has moved: carrying it over is not trivial
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (run / "ckpt" / "latest").read_text() == tag_for(4)
    state = json.loads((run / "ckpt" / "generator" / tag_for(4) / TRAINER_STATE).read_text())
    assert state["world_size"] == world_size and state["step"] == 4
    assert sorted(p.name for p in (run / "ckpt" / "generator" / tag_for(4)).glob("rank_*.pt")) == \
        [f"rank_{r}.pt" for r in range(world_size)]
    assert not (run / "ckpt" / "universal").exists()  # the converted copy is gone once loaded


@pytest.mark.slow
def test_a_crafted_file_is_refused_before_the_conversion_unpickles_it(demo_data, two_rank_runs, tmp_path):
    # DeepSpeed's converter reads every ZeRO file with the full unpickler, also the ones no rank loads itself
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(two_rank_runs(tuple(ZERO_1_2)), run)
    crafted = run / "ckpt" / "generator" / tag_for(2) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    plant(crafted, marker)
    with pytest.raises(RuntimeError, match=UnsafeFileError.__name__):
        run_distributed(fit_worker, 1, [(tiny_overrides(demo_data, run, *COMMON, *ZERO_1_2, "train.steps=4"), "auto")],
                        timeout_s=600)
    assert not marker.exists()
