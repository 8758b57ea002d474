"""tools/bench_train.py: the kernel summary of --profile, transposes traced to their ops, and the real tool on
a CPU (one JSON line per variant)."""

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd.profiler_util import Kernel

from simvq_scale.tools import bench_train
from simvq_scale.tools.bench_train import kernel_kind, kernel_time_by_kind, transpose_sources
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
    ("_fallback_kernel", "codebook search"),  # the exactness fallback's full fp32 scan, not "other"
    ("_rerank_kernel", "codebook search"),
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


def op(name, parent=None, shapes=(), kernels=()):
    return SimpleNamespace(name=name, cpu_parent=parent, input_shapes=list(shapes), kernels=list(kernels))


def test_transposes_are_traced_to_the_op_and_region_that_launched_them():
    """Walks up from the launch to the nearest aten op with shapes, and to the outermost region."""
    compiled = op("CompiledFunctionBackward")
    conv_backward = op("aten::convolution_backward", compiled, [[64, 128, 32, 32], [64, 128, 32, 32]])
    eager = op("autograd::engine::evaluate_function: ConvolutionBackward0")
    eager_conv = op("aten::cudnn_convolution", op("aten::convolution", eager, [[64, 3, 128, 128]]),
                    [[64, 3, 128, 128], [64, 3, 3, 3]])
    events = [
        compiled, conv_backward, eager, eager_conv,
        op("cudaLaunchKernel", conv_backward, kernels=[Kernel(TRANSPOSE, 0, 40.0), Kernel(CONV, 0, 500.0)]),
        op("cudaLaunchKernel", eager_conv, kernels=[Kernel(TRANSPOSE, 0, 300.0)]),
        op("cudaLaunchKernel", eager_conv, kernels=[Kernel(TRANSPOSE, 0, 300.0)]),
        op("cudaLaunchKernel", eager_conv, kernels=[Kernel(CONV, 0, 900.0)]),  # no transpose: not counted
    ]
    sources = transpose_sources(events, steps=2)
    assert [(s["region"], s["op"]) for s in sources] == [
        ("autograd::engine::evaluate_function: Convolution", "aten::cudnn_convolution"),  # region cut to 48
        ("CompiledFunctionBackward", "aten::convolution_backward")]
    assert sources[0]["shapes"] == ((64, 3, 128, 128), (64, 3, 3, 3))
    assert sources[0]["calls"] == 1.0 and sources[0]["ms"] == pytest.approx(0.3)
    assert sources[1]["calls"] == 0.5 and sources[1]["ms"] == pytest.approx(0.02)


def timed(name, start, end, device_type, annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device_type,
                           is_user_annotation=annotation)


def test_device_idle_is_charged_to_the_phase_the_host_was_in_when_the_gpu_resumed():
    from torch.autograd import DeviceType

    from simvq_scale.train.trainer import STEP_PHASE

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [
        timed(f"{STEP_PHASE}G forward and loss", 0, 100, cpu), timed(f"{STEP_PHASE}G optimizer step", 100, 180, cpu),
        timed("aten::mm", 10, 20, cpu),  # host ops inside a phase are not phases
        timed("kernel a", 5, 50, gpu), timed("kernel b", 40, 60, gpu),  # overlapping streams: busy until 60
        timed("kernel c", 90, 95, gpu),  # idle 60-90, resumed in G's forward
        timed("annotation", 95, 170, gpu, annotation=True),  # a range on the device timeline, not work
        timed("kernel d", 150, 160, gpu),  # idle 95-150, resumed in the optimizer step
        timed("kernel e", 2160, 2170, gpu),  # idle 160-2160, resumed outside every phase
    ]
    idle = bench_train.idle_time_by_phase(events, steps=2)
    assert idle == pytest.approx({"between steps": 1.0, "G optimizer step": 0.0275, "G forward and loss": 0.015,
                                  "total": 1.0425})
    assert list(idle) == ["between steps", "G optimizer step", "G forward and loss", "total"]
    assert bench_train.idle_time_by_phase([timed("kernel", 0, 5, gpu)], steps=1) == {}


def test_host_time_is_the_phases_own_duration_per_step():
    from torch.autograd import DeviceType

    from simvq_scale.train.trainer import STEP_PHASE

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [timed(f"{STEP_PHASE}G backward", 0, 3000, cpu), timed(f"{STEP_PHASE}G backward", 5000, 6000, cpu),
              timed(f"{STEP_PHASE}metrics", 3000, 3500, cpu),
              timed("aten::mm", 10, 2000, cpu),  # an op inside a phase is not a phase
              timed(f"{STEP_PHASE}G backward", 0, 9000, gpu)]  # the range mirrored on the device timeline
    host = bench_train.host_time_by_phase(events, steps=2)
    assert host == pytest.approx({"G backward": 2.0, "metrics": 0.25, "total": 2.25})
    assert list(host) == ["G backward", "metrics", "total"]


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
        assert row["device_idle_ms_per_step"] == {}
        assert 0 < row["host_issue_ms"] <= row["step_ms"]
        assert Path(row["package"]) == ROOT / "simvq_scale"  # the checkout's own code ran, whatever PYTHONPATH says
        host = row["host_ms_per_step"]  # measured on the host: present on a CPU too
        assert host["G forward and loss"] > 0 and host["D optimizer step"] > 0
        assert host["total"] == pytest.approx(sum(v for k, v in host.items() if k != "total"))
        # the torch search on a CPU never falls back; 2 images of 16 x 16 tokens (32 px, one downsampling)
        assert row["search_fallbacks_per_step"] == 0 and row["tokens_per_step"] == 2 * 16 * 16
    table = (tmp_path / "profile" / "default.txt").read_text()
    # the step's phases are profiler ranges (what the device's idle time is charged to on a GPU)
    assert "step: G forward and loss" in table and "step: D optimizer step" in table, table
    assert "train_step" in (tmp_path / "profile" / "default.host.txt").read_text()  # cProfile's function table
    assert "default" in done.stdout and "vq" in done.stdout.splitlines()[-2]


def _warn_twice():
    for _ in range(2):
        _deep_library_warning()


def _deep_library_warning():
    warnings.warn("a synchronizing op")


def test_warnings_by_caller_counts_each_site_by_its_innermost_frame_outside_the_skipped_paths():
    # the helper stands for a torch op (its file is skipped): the site is the test function that called it
    sites = bench_train.warnings_by_caller(_warn_twice, skip=("/warnings.py", " in _deep_library"))
    assert sum(sites.values()) == 2
    (site, count), = sites.items()
    assert count == 2 and site.endswith(" in _warn_twice") and "test_bench_train.py:" in site
    assert bench_train.warnings_by_caller(lambda: None) == {}


def _wait_for_the_device_twice():
    import torch

    torch.cuda.synchronize()  # explicit: CUDA's sync debug mode does not report it
    torch.ones(1, device="cuda").item()  # implicit: a copy to the host


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_find_syncs_counts_explicit_and_implicit_waits_by_caller(capsys):
    assert bench_train.host_syncs(_wait_for_the_device_twice, "probe") == 2
    assert capsys.readouterr().out.count("in _wait_for_the_device_twice") == 2
