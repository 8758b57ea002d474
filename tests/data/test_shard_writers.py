"""Shard writers: layouts, skipped files, determinism, resume, audio conversion, real data, demo tool."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from simvq_scale.data.audio_sources import AudioLayoutError, shard_audio
from simvq_scale.data.image_sources import LayoutError, shard_images
from simvq_scale.data.tars import iter_samples
from simvq_scale.tools import make_demo_data


def _jpeg(rng, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_image_tree(root: Path, per_class: int = 5, seed: int = 0) -> dict[str, bytes]:
    """Three classes of small JPEGs plus one PNG and a set of bad files; returns the good JPEGs' bytes by key."""
    rng = np.random.default_rng(seed)
    good = {}
    for c in ("cat", "dog", "eel"):
        (root / c / "sub").mkdir(parents=True)
        for i in range(per_class):
            data = _jpeg(rng)
            name = f"{c}/img.{i}.jpg" if i == 0 else f"{c}/img{i}.JPEG"  # a dotted stem and an upper-case suffix
            (root / name).write_bytes(data)
            good[os.path.splitext(name)[0].replace(".", "_")] = data
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "dog" / "sub" / "p.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (root / "eel" / "cut.jpg").write_bytes(_jpeg(rng, (64, 64))[:300])
    return good


def read_all(out: Path, prefix: str) -> list[dict]:
    return [s for p in sorted(out.glob(f"{prefix}-*.tar")) for s in iter_samples(p)]


def test_image_folder_round_trip_skips_bad_files(tmp_path):
    good = make_image_tree(tmp_path / "src" / "train")
    manifest = shard_images(tmp_path / "src", tmp_path / "out", split="train", shard_size=4, progress=False)
    samples = read_all(tmp_path / "out", "imagenet-train")
    by_key = {s["__key__"]: s for s in samples}
    assert manifest["total"] == len(samples) == len(good) + 1  # the PNG is kept (re-encoded)
    assert manifest["class_to_idx"] == {"cat": 0, "dog": 1, "eel": 2}
    assert sorted(Path(s["path"]).name for s in manifest["skipped"]) == ["broken.jpg", "cut.jpg", "notes.txt"]
    assert all(s["reason"] for s in manifest["skipped"])
    for key, data in good.items():
        assert by_key[key]["jpg"] == data  # original bytes, untouched
        assert int(by_key[key]["cls"]) == manifest["class_to_idx"][key.split("/")[0]]
    png = by_key["dog/sub/p"]["jpg"]
    assert Image.open(io.BytesIO(png)).format == "JPEG"
    assert [s["samples"] for s in manifest["shards"]] == [len([1 for s in samples if s["__url__"].endswith(x["file"])])
                                                        for x in manifest["shards"]]
    on_disk = json.loads((tmp_path / "out" / "imagenet-train.json").read_text())
    assert on_disk["total"] == manifest["total"]


def test_resize_shorter_reencodes_large_images_only(tmp_path):
    make_image_tree(tmp_path / "src")
    shard_images(tmp_path / "src", tmp_path / "out", split="train", resize_shorter=20, progress=False)
    sizes = {s["__key__"]: Image.open(io.BytesIO(s["jpg"])).size for s in read_all(tmp_path / "out", "imagenet-train")}
    assert sizes["cat/img1"] == (27, 20)  # 40x30 -> shorter side 20
    assert sizes["dog/sub/p"] == (20, 20)


def test_output_is_deterministic_and_independent_of_workers(tmp_path):
    make_image_tree(tmp_path / "src")
    shard_images(tmp_path / "src", tmp_path / "a", split="train", shard_size=3, workers=0, progress=False)
    shard_images(tmp_path / "src", tmp_path / "b", split="train", shard_size=3, workers=2, progress=False)
    tars_a = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert tars_a == sorted(p.name for p in (tmp_path / "b").glob("*.tar")) and len(tars_a) > 3
    for name in tars_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_resume_rewrites_only_damaged_or_missing_shards(tmp_path):
    make_image_tree(tmp_path / "src", per_class=6)
    out = tmp_path / "out"
    first = shard_images(tmp_path / "src", out, split="train", shard_size=3, progress=False)
    original = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    names = sorted(original)
    (out / names[1]).unlink()  # never finished
    (out / names[2]).write_bytes(original[names[2]][: len(original[names[2]]) // 2])  # cut mid-write
    (out / (names[3] + ".tmp")).write_bytes(b"partial")  # temp file of an interrupted worker
    second = shard_images(tmp_path / "src", out, split="train", shard_size=3, progress=False)
    assert second["reused_shards"] == first["num_shards"] - 2
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == original
    assert not list(out.glob("*.tmp")) and second["total"] == first["total"]
    # a changed source file invalidates exactly its shard
    changed = tmp_path / "src" / "eel" / "img5.JPEG"
    changed.write_bytes(_jpeg(np.random.default_rng(9)))
    third = shard_images(tmp_path / "src", out, split="train", shard_size=3, progress=False)
    assert third["reused_shards"] == first["num_shards"] - 1


def test_layout_errors_say_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="expected ImageNet/ImageFolder layout"):
        shard_images(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "hollow" / "n01").mkdir(parents=True)
    with pytest.raises(LayoutError, match="contain no files"):
        shard_images(tmp_path / "hollow", tmp_path / "out", progress=False)


def test_flat_validation_folder_with_label_csv(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(1)
    wnids = ["n02", "n01", "n02"]
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate(wnids, 1):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_jpeg(rng))
        rows.append(f"ILSVRC2012_val_{i:08d},{wnid} 1 2 3 4")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    manifest = shard_images(tmp_path, tmp_path / "out", split="val", progress=False)
    assert manifest["class_to_idx"] == {"n01": 0, "n02": 1}
    labels = {s["__key__"]: int(s["cls"]) for s in read_all(tmp_path / "out", "imagenet-val")}
    assert labels == {"ILSVRC2012_val_00000001": 1, "ILSVRC2012_val_00000002": 0, "ILSVRC2012_val_00000003": 1}


def test_audio_writer_resamples_to_mono_flac_with_metadata(tmp_path):
    chapter = tmp_path / "src" / "train" / "spk1" / "ch7"
    chapter.mkdir(parents=True)
    t = np.arange(16000) / 16000
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 220 * t)], axis=1)
    sf.write(chapter / "spk1_ch7_a.wav", stereo, 16000)
    (chapter / "spk1_ch7_a.normalized.txt").write_text("Hello there.\n")
    sf.write(chapter / "spk1_ch7_b.flac", 0.3 * np.sin(2 * np.pi * 300 * np.arange(4800) / 24000), 24000)
    sf.write(chapter / "spk1_ch7_empty.wav", np.zeros((0, 1)), 16000)
    (chapter / "spk1_ch7_junk.wav").write_bytes(b"RIFF....not audio")
    manifest = shard_audio(tmp_path / "src", tmp_path / "out", split="train", sample_rate=24000, progress=False)
    samples = {s["__key__"]: s for s in read_all(tmp_path / "out", "libritts-train")}
    assert sorted(samples) == ["spk1/ch7/spk1_ch7_a", "spk1/ch7/spk1_ch7_b"]
    assert sorted(Path(s["path"]).name for s in manifest["skipped"]) == ["spk1_ch7_empty.wav", "spk1_ch7_junk.wav"]
    wave, rate = sf.read(io.BytesIO(samples["spk1/ch7/spk1_ch7_a"]["flac"]), always_2d=True)
    assert rate == 24000 and wave.shape == (24000, 1)
    expected = 0.5 * (0.5 * np.sin(2 * np.pi * 440 * np.arange(24000) / 24000)
                      + 0.1 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000))
    assert np.abs(wave[100:-100, 0] - expected[100:-100]).max() < 0.01  # mono mix, resampled
    meta = json.loads(samples["spk1/ch7/spk1_ch7_a"]["json"])
    assert meta["speaker"] == "spk1" and meta["chapter"] == "ch7" and meta["source_sample_rate"] == 16000
    assert meta["duration_s"] == pytest.approx(1.0)
    assert samples["spk1/ch7/spk1_ch7_a"]["txt"] == b"Hello there."
    assert samples["spk1/ch7/spk1_ch7_b"]["txt"] == b""
    with pytest.raises(AudioLayoutError, match="no audio files"):
        shard_audio(tmp_path / "out", tmp_path / "out2", progress=False)


def test_real_photos_and_speech(shared_data, tmp_path):
    for split in ("train", "val"):
        files = list((shared_data / "photos" / split).rglob("*.jpg"))
        manifest = shard_images(shared_data / "photos", tmp_path, split=split, shard_size=32, progress=False)
        assert manifest["total"] == len(files) and not manifest["skipped"]
        assert manifest["class_to_idx"] == {p.name: i for i, p in enumerate(sorted((shared_data / "photos" / split).iterdir()))}
    clips = sorted((shared_data / "speech" / "test").rglob("*.flac"))
    manifest = shard_audio(shared_data / "speech", tmp_path, split="test", sample_rate=16000, shard_size=40,
                           progress=False)
    assert manifest["total"] == len(clips) and not manifest["skipped"]
    first = next(iter_samples(tmp_path / "libritts-test-000000.tar"))
    source = shared_data / "speech" / "test" / (first["__key__"] + ".flac")
    expected_text = source.with_name(source.stem + ".normalized.txt").read_text().strip()
    assert first["txt"].decode() == expected_text
    assert sf.info(io.BytesIO(first["flac"])).samplerate == 16000
    assert json.loads(first["json"])["duration_s"] == pytest.approx(sf.info(source).duration, abs=1e-3)


def test_demo_tool_builds_readable_labelled_sets(tmp_path):
    out = tmp_path / "demo"
    assert make_demo_data.main(["--out", str(out), "--train-crops", "3", "--val-crops", "1", "--clips", "2",
                                "--crop-size", "64", "--no-espeak"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    image = json.loads((out / "image-train.json").read_text())
    audio = json.loads((out / "audio-train.json").read_text())
    assert image["total"] == 3 * len(image["class_to_idx"]) >= 30
    assert "SYNTHETIC" in audio["speech_source"] and "SYNTHETIC" in summary["speech_source"]
    assert audio["total"] == 2 * len(make_demo_data.SYNTHETIC_SPEAKERS)
    first = next(iter_samples(out / "image-val-000000.tar"))
    assert Image.open(io.BytesIO(first["jpg"])).size == (64, 64)
