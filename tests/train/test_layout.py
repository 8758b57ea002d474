"""What gets compiled, and in which layout: on a GPU the compiled image step runs its convolutions NHWC
(model.channels_last), so cuDNN transposes no activations (torch.profiler's kernels, traced to their ops with
bench_train's --profile helpers); channels-last follows model.channels_last for images and audio (whose
discriminators are 2-D); networks compiled again get their own graphs."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import make_trainer, tiny_overrides


def step_kernels_worker(rank, world_size, overrides):
    import os

    os.environ["DS_ACCELERATOR"] = "cuda"  # the test children default to DeepSpeed's CPU accelerator
    from torch.profiler import ProfilerActivity, profile

    from simvq_scale.tools.bench_train import device_kernels, kernel_kind, transpose_sources

    trainer = make_trainer(overrides)
    x = trainer.to_device(next(iter(trainer.loader))["x"])
    for _ in range(2):  # compiles
        trainer.train_step(x)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as profiler:
        trainer.train_step(x)
        torch.cuda.synchronize()
    events = profiler.events()
    kinds = [kernel_kind(name) for name, _ in device_kernels(events)]
    return {"kinds": {kind: kinds.count(kind) for kind in set(kinds)}, "transposes": transpose_sources(events, 1),
            "channels_last": trainer.channels_last}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_channels_last_compiled_step_transposes_no_activations(demo_data, tmp_path):
    overrides = tiny_overrides(demo_data, tmp_path / "run", "train.compile=true", "train.precision=bf16",
                               "model.channels_last=true")
    result = run_distributed(step_kernels_worker, 1, overrides, init_process_group=False, timeout_s=600)[0]
    assert result["channels_last"] and result["kinds"].get("convolutions", 0) > 0, result["kinds"]
    # only convolutions to one channel may be left (D's head; LPIPS' heads when it is on): a one-channel output
    # has no layout of its own to keep. A forward's second input is the weight (out channels first), a
    # backward's first the one-channel gradient
    def one_channel_output(source):
        first, second = source["shapes"]
        return second[0] == 1 if source["op"] == "aten::cudnn_convolution" else first[1] == 1

    others = [s for s in result["transposes"] if not one_channel_output(s)]
    assert not others, others


def test_channels_last_follows_the_config_for_images_and_for_audio():
    from simvq_scale.config import load_config
    from simvq_scale.modality import get_modality
    from tests.helpers import ROOT

    image = get_modality("image")
    assert image.channels_last(load_config(ROOT / "configs" / "image_262k.yaml"))
    assert not image.channels_last(load_config(ROOT / "configs" / "image_262k.yaml", ["model.channels_last=false"]))
    # the audio discriminators' convolutions are 2-D (MPD's folded waveform, MRD's spectrograms)
    audio = get_modality("audio")
    assert audio.channels_last(load_config(ROOT / "configs" / "audio_262k.yaml"))
    assert not audio.channels_last(load_config(ROOT / "configs" / "audio_262k.yaml", ["model.channels_last=false"]))


def test_networks_compiled_again_get_their_own_graphs():
    """A second instance of a compiled module class reuses the first one's graph unless the graphs are
    forgotten (compile_networks does, first), which had made bench_train's later variants run the first
    variant's graphs, their own compile settings silently unused."""
    from torch._dynamo.utils import counters

    from simvq_scale.train.engines import forget_compiled_graphs

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).relu()

    x = torch.randn(1, 3, 8, 8)

    def compile_and_run() -> int:
        before = counters["stats"]["unique_graphs"]
        block = Block()
        block.compile(backend="eager")
        block(x)
        return counters["stats"]["unique_graphs"] - before

    forget_compiled_graphs()
    assert compile_and_run() == 1
    assert compile_and_run() == 0  # the trap: the new instance ran the cached graph
    forget_compiled_graphs()
    assert compile_and_run() == 1
