"""The tokenizer API (export -> load -> encode/decode) and the token export and reconstruction tools."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from simvq_scale import load_tokenizer
from simvq_scale.data import expand_shards
from simvq_scale.eval.runner import limited_eval_loader
from simvq_scale.inference import EXPORT_NAME
from tests.helpers import run_tool, tiny_export


def _batch(tokenizer, shards: str, n: int) -> torch.Tensor:
    loader = limited_eval_loader(tokenizer.config.data, shards, n, 0, 1, n)
    return next(iter(loader))["x"]


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_decode_of_encoded_ids_equals_the_forward_reconstruction(tiny_runs, demo_data, modality):
    tokenizer = load_tokenizer(tiny_runs[modality])  # a run dir
    assert tokenizer.step == 7 and tokenizer.modality == modality and tokenizer.codebook_size == 256
    x = _batch(tokenizer, str(Path(demo_data["dir"]).parent / demo_data[f"{modality}_val"]), 3)
    ids = tokenizer.encode(x)
    assert ids.dtype == torch.int64 and ids.shape[0] == 3 and int(ids.max()) < 256
    x_hat, forward_ids = tokenizer.reconstruct(x)
    assert torch.equal(ids, forward_ids)
    length = x.shape[-1] if modality == "audio" else None  # audio decodes to tokens x hop samples
    assert torch.equal(tokenizer.decode(ids, length), x_hat)  # bit for bit: decode_indices keeps W
    with pytest.raises(ValueError, match=r"code ids span \[0, 256\], outside the codebook of 256"):
        tokenizer.decode(torch.full_like(ids, 256).index_fill_(0, torch.tensor([0]), 0))


def test_a_sharded_training_codebook_loads_whole_and_the_export_file_works_too(tmp_path):
    run = tiny_export("image", tmp_path / "sharded", shard_group="world")
    tokenizer = load_tokenizer(run / EXPORT_NAME)  # the file itself
    assert tokenizer.config.quantizer.shard.group == "none"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(tokenizer.decode(tokenizer.encode(x)), tokenizer.reconstruct(x)[0])


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"run directory {tmp_path} has no {EXPORT_NAME}"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.pt does not exist"):
        load_tokenizer(tmp_path / "nothere.pt")
    torch.save({"generator": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt is not a generator export: expected keys \['config', 'generator'\]"):
        load_tokenizer(tmp_path / "bad.pt")


@pytest.mark.slow
def test_export_tokens_writes_every_sample_once_with_the_ids_encode_gives(tiny_runs, demo_data, tmp_path):
    shards = str(Path(demo_data["dir"]).parent / demo_data["image_val"])
    out = tmp_path / "tokens"
    run_tool("export_tokens.py", "--checkpoint", str(tiny_runs["image"]), "--data", shards, "--max-samples", "11",
             "--batch-size", "4", "--workers", "0", "--shard-size", "5", "--out", str(out), "--no-progress")
    manifest = json.loads((out / "tokens.json").read_text())
    assert manifest["samples"] == 11 and manifest["codebook_size"] == 256 and manifest["token_shape"] == [16, 16]
    assert len(manifest["shards"]) == 3  # 5 + 5 + 1
    exported = {}
    for name in manifest["shards"]:
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key = member.name[: -len(".ids.npy")]
                assert key not in exported
                exported[key] = np.load(io.BytesIO(tar.extractfile(member).read()))
    tokenizer = load_tokenizer(tiny_runs["image"])
    batch = next(iter(limited_eval_loader(tokenizer.config.data, shards, 11, 0, 1, 11)))
    assert sorted(exported) == sorted(batch["key"])
    ids = tokenizer.encode(batch["x"]).numpy()
    for key, expected in zip(batch["key"], ids):
        assert exported[key].dtype == np.int32 and np.array_equal(exported[key], expected)


@pytest.mark.slow
def test_reconstruct_tool_writes_side_by_side_images_and_audio(tiny_runs, demo_data, tmp_path):
    with tarfile.open(expand_shards(str(Path(demo_data["dir"]).parent / demo_data["image_val"]))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "photo.jpg").write_bytes(tar.extractfile(member).read())
    rate = 24000
    t = np.arange(int(0.7 * rate)) / rate  # not a whole number of tokens: the tool pads and cuts back
    sf.write(tmp_path / "tone.wav", (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), rate)
    out = tmp_path / "recon"
    image = run_tool("reconstruct.py", "--checkpoint", str(tiny_runs["image"]), str(tmp_path / "photo.jpg"), "--out", str(out))
    assert "256 codes" in image.stdout
    from PIL import Image

    assert Image.open(out / "photo.compare.png").size == (64, 32)
    run_tool("reconstruct.py", "--checkpoint", str(tiny_runs["audio"]), str(tmp_path / "tone.wav"), "--out", str(out))
    recon, recon_rate = sf.read(out / "tone.recon.wav")
    assert recon_rate == rate and len(recon) == len(t)
