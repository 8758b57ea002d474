"""tools/bench_train.py: the kernel summary of --profile, and the real tool on a CPU (one JSON line per variant)."""

import json
from pathlib import Path

import pytest

from simvq_scale.tools.bench_train import kernel_kind, kernel_time_by_kind
from tests.helpers import ROOT, TINY_IMAGE, run_tool

# kernel names as an H200 profile of the compiled image step prints them
CONV = "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64"
TRANSPOSE = "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false>"
FUSED_CONV_BACKWARD = "triton_red_fused_convolution_backward_native_group_norm_backward_3"


@pytest.mark.parametrize("name, kind", [
    (CONV, "convolutions"),
    ("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32", "convolutions"),
    (TRANSPOSE, "layout transposes"),
    ("void cudnn::engines_precompiled::nhwcToNchwKernel<float, __nv_bfloat16, float, true>", "layout transposes"),
    (FUSED_CONV_BACKWARD, "compiled fused kernels"),  # a compiled kernel named after a convolution is not one
    ("triton_poi_fused__to_copy_native_group_norm_silu_3", "compiled fused kernels"),
    ("_best_tiles_kernel", "codebook search"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copies and casts"),
    ("void at::native::elementwise_kernel<128, 4>", "other kernels"),
])
def test_kernels_are_sorted_by_what_they_do(name, kind):
    assert kernel_kind(name) == kind


def test_time_by_kind_is_per_step_largest_first_with_a_total():
    summary = kernel_time_by_kind([(CONV, 3000.0), (TRANSPOSE, 1500.0), (CONV, 1500.0), ("Memcpy DtoD", 300.0)], 3)
    assert list(summary) == ["convolutions", "layout transposes", "copies and casts", "total"]
    assert summary["convolutions"] == pytest.approx(1.5)
    assert summary["layout transposes"] == pytest.approx(0.5)
    assert summary["total"] == pytest.approx(2.1)


@pytest.mark.slow
def test_the_real_tool_times_a_default_and_a_baseline_on_a_cpu(demo_data, tmp_path):
    jsonl = tmp_path / "bench.jsonl"
    overrides = [o for o in TINY_IMAGE if not o.startswith("train.global_batch")]
    shards = Path(demo_data["dir"]).parent  # demo.json's patterns are relative to the folder holding the demo data
    done = run_tool("bench_train.py", "--config", str(ROOT / "configs" / "image_demo.yaml"), "--set", *overrides,
                    f"data.train_shards={shards / demo_data['image_train']}",
                    f"data.val_shards={shards / demo_data['image_val']}", "train.global_batch=2", "train.val_every=0",
                    "--steps", "2", "--warmup", "1", "--baseline", "vq:quantizer.kind=vq",
                    "--out-dir", str(tmp_path / "runs"), "--profile", str(tmp_path / "profile"),
                    "--profile-steps", "1", "--json", str(jsonl))
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["default", "vq"]
    assert rows[1]["overrides"] == ["quantizer.kind=vq"]
    for row in rows:
        assert row["samples_per_s"] > 0 and row["step_ms"] > 0 and row["batch"] == 2
        assert row["device"] == "cpu" and row["mfu"] is None and row["kernel_ms_per_step"] == {}
    assert (tmp_path / "profile" / "default.txt").read_text().strip()
    assert "default" in done.stdout and "vq" in done.stdout.splitlines()[-2]
