"""bf16 where the config says bf16: every convolution of G and D computes in bf16 inside the DeepSpeed
engines (DeepSpeed switches an outer autocast off inside its engines), while parameters, gradients and
the codebook search stay fp32."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import ROOT, TINY_AUDIO, tiny_overrides

CONVS = (torch.nn.Conv1d, torch.nn.Conv2d)


def conv_dtypes_worker(rank, world_size, config, overrides):
    from simvq_scale import distributed
    from simvq_scale.config import load_config
    from simvq_scale.train.trainer import Trainer

    device = distributed.init_distributed()
    trainer = Trainer(load_config(ROOT / "configs" / config, overrides).validate(1), device)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, set()).add(output.dtype)
        return hook

    for prefix, model in (("G", trainer.generator), ("D", trainer.discriminator)):
        for name, module in model.named_modules():
            if isinstance(module, CONVS):
                module.register_forward_hook(record(f"{prefix}.{name}"))
    x = next(iter(trainer.loader))["x"][: trainer.micro_batch]
    # the engines alone, without the trainer's outer autocast: bf16 must come from inside the engine
    # (on CUDA DeepSpeed switches an outer autocast off there; on the CPU it does not notice one, so
    # this is the check that fails here when the engines' own autocast is missing)
    with torch.no_grad():
        trainer.engine_g(x)
        trainer.engine_d(x)
    engines_alone = {k: sorted(str(d) for d in v) for k, v in seen.items()}
    seen.clear()
    x_hat, _ = trainer.generator_step(x)
    trainer.discriminator_step(x, x_hat)
    # the dtypes in which the gradients are reduced: a ZeRO-1/2 engine's buckets (by communication dtype), a
    # ZeRO-0 engine's all-reduce dtype
    grads = {dtype for engine in (trainer.engine_g, trainer.engine_d)
             for dtype in (engine.optimizer.ipg_buckets if engine.zero_optimization() else [engine.communication_data_type])}
    params = {p.dtype for p in [*trainer.generator.parameters(), *trainer.discriminator.parameters()]}
    return {"convs": {k: sorted(str(d) for d in v) for k, v in seen.items()}, "engines_alone": engines_alone,
            "params": sorted(str(d) for d in params), "grads": sorted(str(d) for d in grads),
            "codebook": str(trainer.quantizer.codebook.weight.dtype), "bf16": trainer.bf16}


@pytest.mark.slow
@pytest.mark.parametrize("modality,zero_stages", [("image", (0, 0)), ("audio", (0, 0)), ("image", (2, 1))])
def test_every_conv_of_g_and_d_runs_bf16_under_precision_bf16(demo_data, tmp_path, modality, zero_stages):
    stages = [f"optim.zero_stage_g={zero_stages[0]}", f"optim.zero_stage_d={zero_stages[1]}"]
    if modality == "image":
        config = "image_demo.yaml"
        overrides = tiny_overrides(demo_data, tmp_path / "run", "train.precision=bf16", *stages)
    else:
        config = "audio_demo.yaml"
        overrides = [*TINY_AUDIO, f"data.train_shards={demo_data['audio_train']}",
                     f"data.val_shards={demo_data['audio_val']}", f"train.out_dir={tmp_path / 'run'}",
                     "train.precision=bf16", *stages]
    result = run_distributed(conv_dtypes_worker, 1, config, overrides, timeout_s=300)[0]
    assert result["bf16"]
    generator = [k for k in result["convs"] if k.startswith("G.")]
    discriminator = [k for k in result["convs"] if k.startswith("D.")]
    assert generator and discriminator  # the hooks did see both networks
    for where in ("engines_alone", "convs"):
        fp32 = {k: v for k, v in result[where].items() if v != ["torch.bfloat16"]}
        assert not fp32, f"{where}: convolutions not in bf16: {fp32}"
    assert set(result["engines_alone"]) == set(result["convs"])
    assert result["params"] == ["torch.float32"] and result["codebook"] == "torch.float32"
    assert result["grads"] == ["torch.float32"]  # gradient reductions stay fp32


@pytest.mark.slow
def test_fp32_precision_keeps_every_conv_fp32(demo_data, tmp_path):
    overrides = tiny_overrides(demo_data, tmp_path / "run", "train.precision=fp32")
    result = run_distributed(conv_dtypes_worker, 1, "image_demo.yaml", overrides, timeout_s=300)[0]
    assert not result["bf16"]
    assert all(v == ["torch.float32"] for where in ("engines_alone", "convs") for v in result[where].values())


def test_quantizer_parameters_get_their_own_learning_rate():
    from simvq_scale.config import load_config
    from simvq_scale.modality import get_modality
    from simvq_scale.quant import build_quantizer
    from simvq_scale.train.engines import param_groups

    cfg = load_config(ROOT / "configs" / "image_demo.yaml")
    model = get_modality("image").build_generator(cfg, build_quantizer(cfg.quantizer))
    (group,) = param_groups(model, 1e-4, 1.0)
    assert len(group["params"]) == len(list(model.parameters()))
    rest, scaled = param_groups(model, 1e-4, 10.0)
    assert scaled["lr"] == pytest.approx(1e-3) and rest["lr"] == 1e-4
    assert {id(p) for p in scaled["params"]} == {id(p) for p in model.quantizer.parameters()}  # W and b
    assert len(rest["params"]) + len(scaled["params"]) == len(list(model.parameters()))
