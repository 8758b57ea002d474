"""VQGAN-LC ("Scaling the Codebook Size of VQGAN to 100,000"): frozen pretrained features as codes.

The codebook is a fixed matrix of features (K x feature_dim, e.g. clustered CLIP
features) loaded from a .npy file; one trainable Linear(feature_dim, dim) maps it
to the code space. That is SimVQ with a different frozen C, so this module is
SimVQ with its codebook and projection swapped: same search, lookup, loss and
decode_indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from simvq_scale.quant.simvq import LocalCodebook, SimVQ


def load_features(path: str | Path, codebook_size: int) -> torch.Tensor:
    """The (codebook_size, feature_dim) fp32 feature matrix stored at `path` (quantizer.lc_features)."""
    path = Path(path)
    if not str(path) or not path.is_file():
        raise FileNotFoundError(f"quantizer.lc_features={str(path)!r}: no such .npy file of LC code features")
    features = np.load(path)
    if features.ndim != 2 or features.shape[0] != codebook_size:
        raise ValueError(f"quantizer.lc_features={str(path)!r} holds an array of shape {features.shape}; "
                         f"expected ({codebook_size}, feature_dim) for codebook_size={codebook_size}")
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))


class FeatureCodebook(LocalCodebook):
    """LocalCodebook whose rows are given features instead of the seeded Gaussian."""

    def __init__(self, features: torch.Tensor, chunk_size: int = 8192, search_impl: str = "auto"):
        nn.Module.__init__(self)
        self.codebook_size, self.chunk_size, self.search_impl = features.shape[0], chunk_size, search_impl
        self.register_buffer("weight", features, persistent=False)  # re-read from the file, never checkpointed


class LC(SimVQ):
    def __init__(self, codebook_size: int, dim: int, features_path: str | Path, beta: float = 0.25,
                 bias: bool = True, chunk_size: int = 8192, search_impl: str = "auto"):
        features = load_features(features_path, codebook_size)
        super().__init__(codebook_size, dim, beta=beta, bias=bias,
                         codebook=FeatureCodebook(features, chunk_size, search_impl))
        self.features_path = str(features_path)
        self.proj = nn.Linear(features.shape[1], dim, bias=bias)
