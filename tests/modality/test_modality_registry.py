"""A third modality registered here, in the test alone: config checks, data decoding, evaluation, the
comparison table, the reconstruct tool, the preflight, --dry-run and training all ask the registry, so a new
modality needs no edit anywhere else.

The modality is grayscale images (the image networks with one channel, decoded from the demo photos). It is
registered at import, so spawned workers (which import this module to find their function) have it too.
"""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from simvq_scale.config import ConfigError, load_config, require
from simvq_scale.eval.evaluator import Evaluator, MeanSums
from simvq_scale.modality import Modality, get_modality, modality_names, register_modality
from simvq_scale.tools import reconstruct, train
from tests.dist_utils import run_distributed
from tests.helpers import ROOT
GRAY = "gray"
TINY = ["data.modality=gray", "data.image_size=32", "data.workers=0", "data.shuffle_buffer=50",
        "model.image.channels=32", "model.image.channel_mult=[1,2]", "model.image.num_res_blocks=1",
        "model.discriminator.layers=2", "model.discriminator.channels=32", "loss.perceptual_weight=0",
        "quantizer.codebook_size=64", "quantizer.dim=8", "quantizer.usage_window_tokens=1024",
        "train.global_batch=4", "loss.disc_start=0", "optim.warmup_steps=1"]


class MeanAbsoluteError(Evaluator):
    METRICS = ("mae",)
    SKIPPABLE = ()
    NOTES = {"mae": "mean absolute difference per image, in [-1, 1] units"}
    TABLE_COLUMNS = (("mae", "MAE", ".4f"),)
    COMPARISON_NOTE = "MAE on gray levels"

    def __init__(self, device, networks, data):
        super().__init__(device, networks, data)
        self.means = MeanSums(self.METRICS, device)

    def update(self, x, x_hat):
        self.means.add("mae", (x - x_hat.float()).abs().flatten(1).mean(1))

    def compute(self):
        return {name: mean for name, (mean, _) in self.means.reduce().items()}


@register_modality
class GrayModality(Modality):
    name = GRAY
    recon_loss_tag = "loss/recon"
    sample_noun = "gray img"

    def check_config(self, cfg):
        require(cfg.data.image_size % 16 == 0, f"data.image_size={cfg.data.image_size} must be a multiple of 16 "
                "for gray images")

    def sample_shape(self, data):
        return (1, data.image_size, data.image_size)

    def decode(self, data, sample, train, rng):
        from simvq_scale.data.decode import decode_image

        return decode_image(sample, data.image_size, train, False, rng).mean(0, keepdim=True)

    def build_generator(self, cfg, quantizer):
        from simvq_scale.models.image import build_image_autoencoder

        return build_image_autoencoder(cfg.model.image, quantizer, 1)

    def build_discriminator(self, cfg):
        from simvq_scale.models.discriminators import PatchGANDiscriminator

        return PatchGANDiscriminator(1, cfg.model.discriminator.channels, cfg.model.discriminator.layers)

    def build_objective(self, cfg):
        from simvq_scale.losses.gan_image import ImageGANObjective

        return ImageGANObjective(cfg.loss)

    def describe(self, cfg, tokens_per_sample, codebook_size):
        return {"pixels_per_token": cfg.data.image_size**2 / tokens_per_sample}

    def evaluator_class(self):
        return MeanAbsoluteError

    def read_file(self, path, data):
        return self.decode(data, {"__key__": path.stem, "png": path.read_bytes()}, False, np.random.default_rng(0))

    def write_reconstruction(self, out, stem, x, x_hat, data):
        np.save(out / f"{stem}.recon.npy", x_hat.numpy())
        return [out / f"{stem}.recon.npy"]

    def fidelity(self, x, x_hat, data):
        return f"MAE {float((x - x_hat).abs().mean()):.4f}"

    def log_reconstructions(self, logger, step, x, x_hat, cfg, objective):
        logger.image(step, "recon/gray", torch.cat([x[0], x_hat[0].float()], dim=-1).add(1).div(2))

    def validation_figures(self, x, x_hat, objective):
        return {"val/recon": (x.float() - x_hat.float()).abs().flatten(1).mean(1)}


def gray_config(demo_data, *more):
    return load_config(ROOT / "configs" / "image_demo.yaml",
                       TINY + [f"data.train_shards={demo_data['image_train']}",
                               f"data.val_shards={demo_data['image_val']}", *more])


def test_the_registry_lists_it_and_validate_runs_its_checks(demo_data):
    assert GRAY in modality_names() and get_modality(GRAY).sample_shape(gray_config(demo_data).data) == (1, 32, 32)
    gray_config(demo_data).validate()
    with pytest.raises(ConfigError, match="data.image_size=40 must be a multiple of 16 for gray images"):
        gray_config(demo_data, "data.image_size=40").validate()
    # the image modality's own checks are not its: image would refuse these widths, gray does not read them
    gray_config(demo_data, "model.discriminator.channels=40").validate()


def test_the_loaders_decode_through_it(demo_data):
    from simvq_scale.data import build_eval_loader, build_train_loader

    data = gray_config(demo_data).data
    train = next(iter(build_train_loader(data, 3, 0, 1)))["x"]
    evaluation = next(iter(build_eval_loader(data, data.val_shards, 3, 0, 1)))["x"]
    assert train.shape == evaluation.shape == (3, 1, 32, 32)
    assert train.min() >= -1 and train.max() <= 1 and train.std() > 0.05  # real photos, not padding


@pytest.fixture(scope="module")
def gray_tokenizer(demo_data, tmp_path_factory):
    from simvq_scale.inference import EXPORT_NAME, build_from_config, export_generator, load_tokenizer

    cfg = gray_config(demo_data)
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("gray_run")
    export_generator(build_from_config(cfg), cfg, 3, run / EXPORT_NAME)
    return load_tokenizer(run)


def test_evaluation_and_the_comparison_table_use_its_evaluator(gray_tokenizer, tmp_path):
    from simvq_scale.eval.comparison import RunRecord, csv_rows, markdown_table as comparison_table
    from simvq_scale.eval.runner import evaluate, limited_eval_loader, markdown_table

    data = gray_tokenizer.config.data
    report = evaluate(gray_tokenizer, limited_eval_loader(data, data.val_shards, 4, 0, 1, 6), progress=False)
    assert report["modality"] == GRAY and report["samples"] == 6
    assert list(report["metrics"]) == ["utilization", "perplexity", "mae"]
    batch = next(iter(limited_eval_loader(data, data.val_shards, 6, 0, 1, 6)))["x"]
    expected = (batch - gray_tokenizer.reconstruct(batch)[0]).abs().mean().item()
    assert report["metrics"]["mae"] == pytest.approx(expected, rel=1e-5)
    assert report["notes"]["mae"] == MeanAbsoluteError.NOTES["mae"]
    assert f"| mae | {report['metrics']['mae']:.4f} | {MeanAbsoluteError.NOTES['mae']} |" in markdown_table(report)

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.json").write_text(json.dumps(report))
    record = RunRecord("gray-run", "simvq", 64, 3, tmp_path / "run")
    table = comparison_table([record], GRAY, "caption")
    assert "| utilization | perplexity | MAE | note |" in table and f"{report['metrics']['mae']:.4f}" in table
    assert csv_rows([record], GRAY)[0]["mae"] == report["metrics"]["mae"]


def test_the_reconstruct_tool_reads_writes_and_scores_its_files(gray_tokenizer, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(photo)
    assert reconstruct.main(["--checkpoint", gray_tokenizer.source, str(photo), "--out", str(tmp_path / "out")]) == 0
    recon = np.load(tmp_path / "out" / "photo.recon.npy")
    assert recon.shape == (1, 32, 32) and np.abs(recon).max() <= 1
    assert "256 codes, MAE " in capsys.readouterr().out  # 32 x 32 pixels over 2 x 2: 16 x 16 tokens


def _launch(argv: list[str]) -> tuple[int, str]:
    """The trainer's main (simvq-train, launch/train.py) in this process (where the gray modality is registered):
    (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train.main(argv)
    return code, out.getvalue()


def dry_run_then_train_worker(rank, world_size, overrides):
    argv = ["--config", str(ROOT / "configs" / "image_demo.yaml"), "--set", *overrides]
    dry = _launch(argv + ["--dry-run"])
    trained = _launch(argv)
    return dry, trained


@pytest.mark.slow
def test_dry_run_and_training_work_with_it(demo_data, tmp_path):
    overrides = TINY + [f"data.train_shards={demo_data['image_train']}", f"data.val_shards={demo_data['image_val']}",
                        f"train.out_dir={tmp_path / 'run'}", "train.steps=2", "train.log_every=1",
                        "train.images_every=1", "train.ckpt_every=2", "train.heartbeat_timeout_s=0"]
    [((dry_code, dry_out), (code, _))] = run_distributed(dry_run_then_train_worker, 1, overrides,
                                                         init_process_group=False, timeout_s=400)
    assert dry_code == 0 and code == 0
    described = json.loads(dry_out.strip().splitlines()[-1])
    assert described["tokens_per_sample"] == 256 and described["pixels_per_token"] == 4.0  # the modality's figure
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss/recon"]) for r in rows)
    from simvq_scale.inference import load_tokenizer

    tokenizer = load_tokenizer(tmp_path / "run")
    assert tokenizer.modality == GRAY and tokenizer.step == 2
    assert tokenizer.encode(torch.zeros(1, 1, 32, 32)).shape == (1, 16, 16)
