"""Loaders over real tar shards: eval exactly-once across ranks, bad data, determinism, saved position, audio, gloo run."""

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image

from simvq_scale.config import DataConfig
from simvq_scale.data import ShardPatternError, build_eval_loader, build_train_loader, shard_images
from simvq_scale.data.train_stream import ShardSequence
from tests.dist_utils import run_distributed

NUM_IMAGES = 23


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """23 small photos-like JPEGs of 3 classes in 5 shards (the last one short); returns (pattern, keys)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        folder = root / "src" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"im{i:02d}.jpg")
    manifest = shard_images(root / "src", root / "out", split="train", shard_size=5, progress=False)
    pattern = str(root / "out" / "imagenet-train-{000000..000004}.tar")
    return pattern, {f"class{i % 3}/im{i:02d}" for i in range(NUM_IMAGES)}, manifest


def image_cfg(pattern: str, workers: int = 2, **kw) -> DataConfig:
    return DataConfig(**{"modality": "image", "train_shards": pattern, "image_size": 16, "shuffle_buffer": 8,
                         "workers": workers, **kw})


def eval_keys(loader) -> tuple[list[str], int]:
    keys, batches = [], 0
    for batch in loader:
        batches += 1
        assert batch["x"].shape[0] == batch["mask"].shape[0] == len(batch["key"])
        assert batch["x"].min() >= -1 and batch["x"].max() <= 1
        keys += [k for k, m in zip(batch["key"], batch["mask"].tolist()) if m]
        assert all(k == "" for k, m in zip(batch["key"], batch["mask"].tolist()) if not m)
    return keys, batches


# (2, 11, 0): rank 0 holds 11 samples (1 batch), rank 1 holds 12 (2 batches): rank 0 must add a padding batch
@pytest.mark.parametrize("world_size,batch_size,workers", [(1, 4, 2), (2, 4, 2), (3, 4, 2), (2, 11, 0)])
def test_eval_reads_every_sample_once_across_ranks(image_shards, world_size, batch_size, workers):
    pattern, all_keys, _ = image_shards
    cfg = image_cfg(pattern, workers=workers)
    seen, batch_counts = [], set()
    for rank in range(world_size):
        loader = build_eval_loader(cfg, pattern, batch_size, rank, world_size)
        keys, batches = eval_keys(loader)
        assert batches == len(loader)
        batch_counts.add(batches)
        seen += keys
    assert sorted(seen) == sorted(all_keys)  # each sample exactly once
    assert len(batch_counts) == 1  # equal batch counts on every rank


def test_eval_center_crop_is_deterministic(image_shards):
    pattern, _, _ = image_shards
    first = next(iter(build_eval_loader(image_cfg(pattern, workers=0), pattern, 5, 0, 1)))
    again = next(iter(build_eval_loader(image_cfg(pattern, workers=0), pattern, 5, 0, 1)))
    assert first["x"].shape == (5, 3, 16, 16) and torch.equal(first["x"], again["x"])


def test_pattern_matching_nothing_fails_at_build_naming_it(tmp_path):
    pattern = str(tmp_path / "missing-{000000..000003}.tar")
    with pytest.raises(ShardPatternError, match="missing-"):
        build_train_loader(image_cfg(pattern), 4, 0, 1)
    with pytest.raises(ShardPatternError, match=r"\*\.tar"):
        build_eval_loader(image_cfg(""), str(tmp_path / "*.tar"), 4, 0, 1)


def train_batches(cfg, n, batch_size=4, rank=0, world_size=1):
    loader = build_train_loader(cfg, batch_size, rank, world_size)
    it = iter(loader)
    return [next(it) for _ in range(n)], loader


def test_train_stream_is_deterministic_for_its_seed(image_shards):
    pattern, all_keys, _ = image_shards
    cfg = image_cfg(pattern, random_resize=True)
    a, _ = train_batches(cfg, 8)
    b, _ = train_batches(cfg, 8)
    c, _ = train_batches(image_cfg(pattern, random_resize=True, seed=1), 8)
    keys = lambda batches: [k for batch in batches for k in batch["key"]]  # noqa: E731
    assert keys(a) == keys(b) and all(torch.equal(x["x"], y["x"]) for x, y in zip(a, b))
    assert keys(a) != keys(c)
    assert all(batch["x"].shape == (4, 3, 16, 16) for batch in a + c)
    assert set(keys(a)) <= all_keys and len(set(keys(a))) > 10  # infinite stream: more batches than samples


def test_shard_order_splits_each_pass_between_slots():
    slots, shards = 6, [f"s{i:02d}.tar" for i in range(20)]
    orders = [[ShardSequence(shards, 3, s, slots)[n] for n in range(10)] for s in range(slots)]
    flat = [orders[s][i] for i in range(10) for s in range(slots)]  # the global sequence, in position order
    assert sorted(flat[:20]) == shards and sorted(flat[20:40]) == shards
    assert flat[:20] != flat[20:40]  # every pass is a new permutation
    assert orders != [[ShardSequence(shards, 4, s, slots)[n] for n in range(10)] for s in range(slots)]


def test_ranks_get_different_streams(image_shards):
    pattern, _, _ = image_shards
    r0, _ = train_batches(image_cfg(pattern, workers=0), 3, rank=0, world_size=2)
    r1, _ = train_batches(image_cfg(pattern, workers=0), 3, rank=1, world_size=2)
    assert [b["key"] for b in r0] != [b["key"] for b in r1]


@pytest.fixture
def damaged_shards(tmp_path, image_shards):
    """Copies of the good shards plus one holding an undecodable image and one truncated mid-member."""
    pattern, _, _ = image_shards
    out = tmp_path / "bad"
    out.mkdir()
    good = sorted(pattern.replace("{000000..000004}", f"{i:06d}") for i in range(5))
    for i, path in enumerate(good):
        (out / f"s-{i:06d}.tar").write_bytes(open(path, "rb").read())
    with open(out / "s-000005.tar", "wb") as f:
        writer = wds.TarWriter(f, mtime=0, encoder=False)
        writer.write({"__key__": "bad/garbage", "jpg": b"\xff\xd8not a jpeg", "cls": b"0"})
        writer.write({"__key__": "bad/no_image", "cls": b"1"})
        writer.close()
    data = (out / "s-000000.tar").read_bytes()
    with tarfile.open(out / "s-000000.tar") as tar:
        members = tar.getmembers()
    cut = members[5].offset_data + 10  # inside the third sample's image
    (out / "s-000006.tar").write_bytes(data[:cut])
    return str(out / "s-{000000..000006}.tar")


def test_eval_masks_and_counts_bad_samples(damaged_shards, image_shards):
    _, all_keys, _ = image_shards
    cfg = image_cfg(damaged_shards)
    keys, records = [], []
    skipped = Counter()
    batch_counts = set()
    for rank in range(2):
        loader = build_eval_loader(cfg, damaged_shards, 4, rank, 2)
        rank_keys, batches = eval_keys(loader)
        keys += rank_keys
        batch_counts.add(batches)
        skipped.update(loader.skipped())
        records += loader.take_skipped_records()[0]
    counts = Counter(keys)
    assert set(counts) == all_keys
    # the two good samples before the cut are read a second time from the truncated copy
    assert sorted(k for k, n in counts.items() if n == 2) == sorted(["class0/im00", "class0/im03"])
    assert skipped["undecodable_image"] == 1 and skipped["missing_field"] == 1
    assert skipped["truncated_sample"] == 1 and skipped["truncated_tar"] >= 1
    assert len(batch_counts) == 1
    named = {(r["url"].rsplit("/", 1)[1], r["key"], r["reason"]) for r in records}
    assert {("s-000005.tar", "bad/garbage", "undecodable_image"), ("s-000005.tar", "bad/no_image", "missing_field"),
            ("s-000006.tar", "class0/im06", "truncated_sample"), ("s-000006.tar", "", "truncated_tar")} <= named


def test_train_skips_bad_data_and_exposes_counts(damaged_shards):
    cfg = image_cfg(damaged_shards, shuffle_buffer=4)
    batches, loader = train_batches(cfg, 20, batch_size=3)
    assert all(b["x"].shape == (3, 3, 16, 16) for b in batches)
    assert not any(k.startswith("bad/") for b in batches for k in b["key"])
    counts = loader.skipped()
    assert counts.get("undecodable_image", 0) >= 1 and counts.get("truncated_tar", 0) >= 1
    assert loader.skipped_total() == sum(counts.values())


def test_train_on_hopeless_data_raises_instead_of_hanging(tmp_path):
    with open(tmp_path / "junk-000000.tar", "wb") as f:
        writer = wds.TarWriter(f, mtime=0, encoder=False)
        for i in range(10):
            writer.write({"__key__": f"k{i}", "jpg": b"junk"})
        writer.close()
    loader = build_train_loader(image_cfg(str(tmp_path / "junk-000000.tar"), workers=0, shuffle_buffer=1), 2, 0, 1)
    with pytest.raises(RuntimeError, match="failed to decode"):
        next(iter(loader))


@pytest.fixture
def audio_shards(tmp_path):
    """Clips at 16 kHz (FLAC stereo long and short, WAV mid) and an empty WAV, in one shard, not resampled."""
    rng = np.random.default_rng(0)
    path = tmp_path / "a-000000.tar"
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, mtime=0, encoder=False)
        for key, frames, channels, fmt in (("long", 40000, 2, "flac"), ("short", 4000, 1, "flac"),
                                           ("mid", 20000, 1, "wav"), ("empty", 0, 1, "wav")):
            buffer = io.BytesIO()
            sf.write(buffer, 0.5 * rng.uniform(-1, 1, (frames, channels)), 16000, format=fmt.upper())
            writer.write({"__key__": key, fmt: buffer.getvalue(), "txt": b""})
        writer.close()
    return str(path)


def test_audio_decode_resamples_crops_pads_and_counts_empty(audio_shards):
    cfg = DataConfig(modality="audio", train_shards=audio_shards, sample_rate=24000, segment_seconds=0.5,
                     workers=0, shuffle_buffer=1)
    loader = build_eval_loader(cfg, audio_shards, 4, 0, 1)
    (batch,) = list(loader)
    assert batch["x"].shape == (4, 12000) and batch["x"].dtype == torch.float32
    assert batch["key"] == ["long", "short", "mid", ""] and batch["mask"].tolist() == [True, True, True, False]
    short = batch["x"][1]
    assert short[:5800].abs().max() > 0.1 and short[6100:].abs().max() == 0  # 0.25 s of audio, then padding
    assert loader.skipped() == {"empty_audio": 1}
    gained = DataConfig(**{**cfg.__dict__, "random_gain_db": 20.0, "workers": 2})
    batches, train_loader = train_batches(gained, 6, batch_size=2)
    peaks = torch.stack([b["x"].abs().amax(dim=1) for b in batches]).flatten()
    assert all(b["x"].shape == (2, 12000) for b in batches)
    assert peaks.max() / peaks.min() > 2.0  # +-20 dB random gain spreads the levels
    assert train_loader.skipped().get("empty_audio", 0) >= 1


def _gloo_eval_and_train(rank, world_size, pattern):
    cfg = image_cfg(pattern, workers=0)  # run_distributed's children are daemonic: they cannot start workers
    loader = build_eval_loader(cfg, pattern, 3, rank, world_size)
    keys, batches = [], 0
    for batch in loader:
        batches += 1
        mask_sum = batch["mask"].sum().reshape(1)
        dist.all_reduce(mask_sum)  # a collective per batch: unequal batch counts would hang here
        keys += [k for k, m in zip(batch["key"], batch["mask"].tolist()) if m]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, keys)
    train = iter(build_train_loader(cfg, 2, dist.get_rank(), world_size))
    shapes = [tuple(next(train)["x"].shape) for _ in range(3)]
    return {"keys": gathered, "batches": batches, "train_shapes": shapes}


@pytest.mark.slow
def test_loaders_under_a_real_two_process_gloo_run(image_shards):
    pattern, all_keys, _ = image_shards
    results = run_distributed(_gloo_eval_and_train, 2, pattern, timeout_s=150)
    assert results[0]["batches"] == results[1]["batches"]
    union = [k for rank_keys in results[0]["keys"] for k in rank_keys]
    assert sorted(union) == sorted(all_keys)
    assert all(r["train_shapes"] == [(2, 3, 16, 16)] * 3 for r in results)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_continues_exactly_from_its_saved_state(image_shards, workers):
    pattern, _, _ = image_shards
    # 5 samples per shard, a 12-sample buffer: the saved buffer spans shards and passes; random crops and sizes
    cfg = image_cfg(pattern, workers=workers, shuffle_buffer=12, random_resize=True)
    straight, _ = train_batches(cfg, 24, batch_size=3)  # 72 samples, three passes over the 23
    for cut in (1, 5, 14):  # with 2 workers, cuts 1 and 5 leave the second worker's batch next
        loader = build_train_loader(cfg, 3, 0, 1)
        batches = iter(loader)
        for _ in range(cut):
            next(batches)
        saved = io.BytesIO()
        torch.save(loader.state_dict(), saved)
        state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)  # plain types and tensors only
        resumed = build_train_loader(cfg, 3, 0, 1)
        resumed.load_state_dict(state)
        for expected, got in zip(straight[cut:], iter(resumed)):
            assert got["key"] == expected["key"] and torch.equal(got["x"], expected["x"])
    # a new iter() of the same loader continues after the last consumed batch, with the workers started anew
    loader = build_train_loader(cfg, 3, 0, 1)
    first = [next(iter(loader)) for _ in range(3)]
    assert [b["key"] for b in first] == [b["key"] for b in straight[:3]]


def test_a_state_of_another_layout_starts_at_the_next_epoch_with_a_warning(image_shards):
    pattern, _, _ = image_shards
    batches, loader = train_batches(image_cfg(pattern, workers=0), 8)  # 32 samples of 23: in the second pass
    state = loader.state_dict()
    reached = state["slots"][0]["next_shard"] // 5  # one slot over 5 shards
    other = build_train_loader(image_cfg(pattern, workers=2), 4, 0, 1)
    with pytest.warns(UserWarning, match=r"\(workers changed\).*starts at epoch"):
        other.load_state_dict(state)
    assert reached >= 1 and other.stream.start_epoch == reached + 1
    assert other.skipped() == loader.skipped()
    assert next(iter(other))["x"].shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict({**state, "format": 99})


def test_skipped_samples_are_named_and_memory_is_capped(tmp_path, image_shards, monkeypatch):
    pattern, _, _ = image_shards
    corrupt = tmp_path / "c-000000.tar"
    with open(corrupt, "wb") as f:
        writer = wds.TarWriter(f, mtime=0, encoder=False)
        for i in range(30):
            writer.write({"__key__": f"bad/{i:02d}", "jpg": b"\xff\xd8not a jpeg"})
        writer.close()
    monkeypatch.setattr("simvq_scale.data.pipeline.MAX_PENDING_RECORDS", 10)
    cfg = image_cfg(f"{pattern}::{corrupt}", workers=0, shuffle_buffer=4)
    _, loader = train_batches(cfg, 20)  # 80 samples: more than one pass over the 53
    total = loader.skipped_total()
    records, dropped = loader.take_skipped_records()
    assert total >= 30 and loader.skipped() == {"undecodable_image": total}  # counting goes on past the cap
    assert len(records) == 10 and dropped == total - 10
    assert all(r["url"] == str(corrupt) and r["key"].startswith("bad/") and r["reason"] == "undecodable_image"
               for r in records)
    assert loader.take_skipped_records() == ([], 0)
