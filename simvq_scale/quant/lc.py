"""VQGAN-LC ("Scaling the Codebook Size of VQGAN to 100,000"): frozen pretrained features as codes.

The codebook is a fixed matrix of features (K x feature_dim, e.g. clustered CLIP
features) loaded from a .npy file; one trainable Linear(feature_dim, dim) maps it
to the code space. That is SimVQ with a different frozen C, so this module is
SimVQ with its codebook and projection swapped: same search, lookup, loss and
decode_indices. Unlike SimVQ's Gaussian rows, such features are not zero-mean, so
the search frame is centred on the projected feature mean: codes (F - m) W^T,
tokens z - (m W^T + b).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from simvq_scale.config import QuantizerConfig
from simvq_scale.quant.registry import register_quantizer
from simvq_scale.quant.simvq import LocalCodebook, SimVQ


def load_features(path: str | Path, codebook_size: int) -> torch.Tensor:
    """The (codebook_size, feature_dim) fp32 feature matrix stored at `path` (quantizer.lc.features)."""
    features = np.load(path)
    if features.ndim != 2 or features.shape[0] != codebook_size:
        raise ValueError(f"LC features {str(path)!r} have shape {features.shape}, not ({codebook_size}, feature_dim)")
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))


class FeatureCodebook(LocalCodebook):
    """LocalCodebook whose rows are given features instead of the seeded Gaussian."""

    def __init__(self, features: torch.Tensor, chunk_size: int = 8192, search_impl: str = "auto"):
        nn.Module.__init__(self)
        self.codebook_size, self.chunk_size, self.search_impl = features.shape[0], chunk_size, search_impl
        # re-read from the file, never checkpointed; so is their mean, the centre of the search frame
        self.register_buffer("weight", features, persistent=False)
        self.register_buffer("row_mean", features.double().mean(0).float(), persistent=False)


class LC(SimVQ):
    def __init__(self, codebook_size: int, dim: int, features_path: str | Path, beta: float = 0.25,
                 bias: bool = True, chunk_size: int = 8192, search_impl: str = "auto"):
        features = load_features(features_path, codebook_size)
        super().__init__(codebook_size, dim, beta=beta, bias=bias,
                         codebook=FeatureCodebook(features, chunk_size, search_impl))
        self.features_path = str(features_path)
        self.proj = nn.Linear(features.shape[1], dim, bias=bias)

    @torch.no_grad()
    def search_frame(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (F - m) W^T and origin m W^T + b: the same distances, centred on the codes (module docstring)."""
        mean = self.codebook.row_mean
        return self.project(self.codebook.weight - mean, bias=False), self.project(mean[None])[0]


@register_quantizer("lc")
def build(cfg: QuantizerConfig) -> LC:
    return LC(cfg.codebook_size, cfg.dim, cfg.lc.features, beta=cfg.beta, bias=cfg.lc.bias,
              chunk_size=cfg.search_chunk, search_impl=cfg.search_impl)
