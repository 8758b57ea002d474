"""Use a trained tokenizer: load an export, turn images or waveforms into code ids and back.

    from simvq_scale import load_tokenizer
    tok = load_tokenizer("runs/image_65k")          # a run dir (its generator_ema.pt) or the export file
    ids = tok.encode(images)                         # (B,3,H,W) in [-1,1] -> (B,h,w) int64
    x_hat = tok.decode(ids)                          # equal to tok.reconstruct(images)[0]

The export is what Trainer.export writes: {"config": asdict(Config), "step": int, "generator": state_dict}
of the EMA generator, read back with torch's weights-only unpickler (simvq_scale.weights_only), so a
crafted file is refused instead of run. The frozen SimVQ codebook is not in it (a non-persistent buffer regenerated from
the seed), so the loaded model is rebuilt from the config and loaded strictly. A codebook that training
sharded over ranks is regenerated whole here: inference runs in one process per model copy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from simvq_scale import weights_only
from simvq_scale.config import Config, from_dict

EXPORT_NAME = "generator_ema.pt"  # the file the trainer writes in train.out_dir
EXPORT_KEYS = ("config", "generator")


class ExportNotFoundError(FileNotFoundError):
    """--checkpoint names no export file (nor a run directory holding one)."""


def resolve_export(path: str | Path) -> Path:
    """The export file for `path`: the file itself, or <run dir>/generator_ema.pt."""
    path = Path(path).expanduser()
    file = path / EXPORT_NAME if path.is_dir() else path
    if not file.is_file():
        where = f"run directory {path} has no {EXPORT_NAME}" if path.is_dir() else f"{path} does not exist"
        raise ExportNotFoundError(f"--checkpoint: {where}; pass a training out_dir after its final export "
                                f"or the {EXPORT_NAME} file itself")
    return file


class Tokenizer:
    """A generator (encoder -> quantizer -> decoder) in eval mode, with its config and training step."""

    def __init__(self, generator: nn.Module, config: Config, step: int, source: str = ""):
        self.generator = generator.eval()
        self.config, self.step, self.source = config, step, source

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def modality(self) -> str:
        return self.config.data.modality

    @property
    def codebook_size(self) -> int:
        return self.generator.quantizer.codebook_size

    @property
    def sample_rate(self) -> int:
        """Audio sample rate the model works at (audio tokenizers only)."""
        return self.config.data.sample_rate

    def to(self, device: str | torch.device) -> "Tokenizer":
        self.generator.to(device)
        return self

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) in [-1,1] or waveforms (B,T) -> code ids (B, *token grid), int64."""
        return self.generator.encode(self._input(x))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Code ids (B, *token grid) -> images or waveforms, equal to reconstruct's output for the same ids.

        A waveform decodes to (tokens x hop) samples; `length` cuts it to the original input's length,
        which is what reconstruct returns."""
        if ids.dtype.is_floating_point:
            raise TypeError(f"decode takes integer code ids, got dtype {ids.dtype}")
        ids = ids.to(self.device, torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"code ids span [{int(ids.min())}, {int(ids.max())}], outside the codebook of "
                             f"{self.codebook_size}")
        out = self.generator.decode_indices(ids)
        return out if length is None else out[..., :length]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass: (reconstruction, code ids)."""
        x_hat, out = self.generator(self._input(x))
        return x_hat, out.indices


def inference_config(raw: dict, source: str) -> Config:
    """The training config with the codebook replicated (sharding is a training-time layout)."""
    cfg = from_dict(Config, raw, source)
    cfg.quantizer.shard.group = "none"
    return cfg


def build_from_config(cfg: Config) -> nn.Module:
    from simvq_scale.modality import get_modality
    from simvq_scale.quant import build_quantizer

    return get_modality(cfg.data.modality).build_generator(cfg, build_quantizer(cfg.quantizer))


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
    """Load an exported generator (a run dir or its generator_ema.pt) onto `device`, in eval mode."""
    file = resolve_export(path)
    export = weights_only.load(file)  # never the full unpickler: an export may come from anyone
    if not isinstance(export, dict) or any(k not in export for k in EXPORT_KEYS):
        found = sorted(export) if isinstance(export, dict) else type(export).__name__
        raise ValueError(f"{file} is not a generator export: expected keys {list(EXPORT_KEYS)}, found {found}")
    cfg = inference_config(export["config"], str(file))
    generator = build_from_config(cfg)
    generator.load_state_dict(export["generator"], strict=True)
    return Tokenizer(generator, cfg, int(export.get("step", 0)), str(file)).to(device)


def partial_export(path: Path) -> Path:
    """Where export_generator writes the file `path` before renaming it (what a killed run leaves behind)."""
    return path.with_suffix(".tmp")


def export_generator(generator: nn.Module, cfg: Config, step: int, path: str | Path) -> Path:
    """The export format: the generator's weights and config in one file, written atomically (by rename)."""
    path = Path(path)
    tmp = partial_export(path)
    torch.save({"config": dataclasses.asdict(cfg), "step": step, "generator": generator.state_dict()}, tmp)
    tmp.replace(path)
    return path
