"""Reading shards: the tar walker against Python's tarfile, damage, shard URLs (pipe:), and the same samples either way."""

import io
import os
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from simvq_scale.config import DataConfig
from simvq_scale.data import ShardPatternError, build_eval_loader, build_train_loader, expand_shards
from simvq_scale.data.tars import count_samples, iter_samples, tar_members


def _tar_bytes(fmt: int) -> bytes:
    """Members a tar writer may produce: a directory, a long path (ustar prefix / pax / GNU long name), a
    non-ASCII name, an upper-case suffix, an empty file, a symlink, a file without extension, a large mtime."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        def add(name, data, mtime=0):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))

        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        long = "a/" + "x" * 120
        add(f"{long}/k1.jpg", b"abc" * 1000)
        add(f"{long}/k1.cls", b"1")
        add("sp\u00e9cial/k2.JPG", rng.bytes(513))
        add("k3.txt", b"")
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "k3.txt"
        tar.addfile(link)
        add("no_extension", b"zz")
        add("k4.flac", b"q" * 70000, mtime=2**34 if fmt != tarfile.USTAR_FORMAT else 0)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_walker_reads_what_tarfile_reads(fmt, tmp_path):
    data = _tar_bytes(fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the files that belong to a sample (a name with a suffix)
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg() and "." in m.name]
    problems = []
    ours = [(m["fname"], m["data"]) for m in tar_members(io.BytesIO(data), "mem", lambda *p: problems.append(p))]
    assert ours == expected and not problems
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    samples = list(iter_samples(path))
    assert [s["__key__"] for s in samples] == ["a/" + "x" * 120 + "/k1", "sp\u00e9cial/k2", "k3", "k4"]
    assert samples[1]["jpg"] == expected[2][1]  # suffixes lower-cased, as webdataset's group_by_keys does
    assert count_samples(path) == 4


def test_a_cut_anywhere_counts_as_many_samples_as_it_reads(tmp_path):
    data = _tar_bytes(tarfile.PAX_FORMAT)
    path = tmp_path / "cut.tar"
    for cut in range(0, len(data), 211):
        path.write_bytes(data[:cut])
        read_problems, count_problems = [], []
        read = list(iter_samples(path, lambda *p: read_problems.append(p[0])))
        assert count_samples(path, lambda *p: count_problems.append(p[0])) == len(read), cut
        assert read_problems == count_problems and (cut < 512) == (read_problems == ["unreadable_tar"])
        assert not any("__damaged__" in s for s in read[:-1])  # only the sample at the cut can be damaged


def test_gzip_and_garbage_are_reported_not_raised(tmp_path):
    import gzip

    (tmp_path / "z.tar").write_bytes(gzip.compress(_tar_bytes(tarfile.PAX_FORMAT)))
    (tmp_path / "junk.tar").write_bytes(b"hello " * 200)
    problems = []
    assert list(iter_samples(tmp_path / "z.tar", lambda *p: problems.append(p))) == []
    assert problems[0][0] == "unreadable_tar" and "pipe:gzip -dc" in problems[0][2]
    assert count_samples(tmp_path / "junk.tar", lambda *p: problems.append(p)) == 0
    assert problems[-1][0] == "unreadable_tar"


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """3 shards of 5 small JPEGs each; returns the brace pattern."""
    root = tmp_path_factory.mktemp("jpeg_shards")
    rng = np.random.default_rng(0)
    for s in range(3):
        with open(root / f"p-{s:06d}.tar", "wb") as f:
            writer = wds.TarWriter(f, mtime=0, encoder=False)
            for i in range(5):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(buffer, "JPEG")
                writer.write({"__key__": f"s{s}/im{i}", "jpg": buffer.getvalue()})
            writer.close()
    return str(root / "p-{000000..000002}.tar")


def test_shard_patterns_and_urls_expand(jpeg_shards, tmp_path):
    local = expand_shards(jpeg_shards)
    assert len(local) == 3 and local == sorted(local)
    folder = os.path.dirname(local[0])
    assert expand_shards(os.path.join(folder, "p-*.tar")) == local
    assert expand_shards(f"{local[2]}::{local[0]}::{local[0]}") == [local[0], local[2]]
    piped = expand_shards(f"pipe:cat {jpeg_shards}")
    assert piped == [f"pipe:cat {p}" for p in local]
    assert expand_shards("https://host/d-{0..1}.tar") == ["https://host/d-0.tar", "https://host/d-1.tar"]
    with pytest.raises(ShardPatternError, match="pipe:aws s3 cp"):
        expand_shards("s3://bucket/d-{0..1}.tar")
    with pytest.raises(ShardPatternError, match="1 of 4 shards do not exist"):
        expand_shards(f"{jpeg_shards}::{tmp_path / 'gone.tar'}")


def test_pipe_urls_read_the_same_samples_as_local_paths(jpeg_shards):
    cfg = DataConfig(modality="image", train_shards=jpeg_shards, image_size=16, shuffle_buffer=6, workers=0)
    piped = DataConfig(**{**cfg.__dict__, "train_shards": f"pipe:cat {jpeg_shards}"})
    local_train, pipe_train = iter(build_train_loader(cfg, 4, 0, 1)), iter(build_train_loader(piped, 4, 0, 1))
    for _ in range(6):  # more than one pass over the 15 samples
        x, y = next(local_train), next(pipe_train)
        assert x["key"] == y["key"] and torch.equal(x["x"], y["x"])
    for rank in range(2):
        local_eval = build_eval_loader(cfg, jpeg_shards, 3, rank, 2)
        pipe_eval = build_eval_loader(cfg, f"pipe:cat {jpeg_shards}", 3, rank, 2)
        assert len(local_eval) == len(pipe_eval) == 3  # 15 samples: 8 and 7 per rank, 3 batches of 3
        for x, y in zip(local_eval, pipe_eval, strict=True):
            assert x["key"] == y["key"] and torch.equal(x["mask"], y["mask"]) and torch.equal(x["x"], y["x"])


def test_a_failing_pipe_command_is_a_counted_shard(jpeg_shards, tmp_path):
    missing = tmp_path / "missing.tar"
    pattern = f"{jpeg_shards}::pipe:cat {missing} 2>/dev/null"
    cfg = DataConfig(modality="image", train_shards=pattern, image_size=16, shuffle_buffer=2, workers=0)
    loader = build_eval_loader(cfg, pattern, 4, 0, 1)
    keys = [k for batch in loader for k, m in zip(batch["key"], batch["mask"].tolist()) if m]
    assert len(keys) == 15 and loader.skipped() == {"unreadable_tar": 1}
    records, dropped = loader.take_skipped_records()
    assert dropped == 0 and records[0]["url"] == f"pipe:cat {missing} 2>/dev/null"
    train = iter(build_train_loader(cfg, 4, 0, 1))
    batches = [next(train) for _ in range(5)]
    assert all(b["x"].shape == (4, 3, 16, 16) for b in batches)


def test_chosen_samples_are_read_without_the_others(jpeg_shards):
    path = expand_shards(jpeg_shards)[1]
    every = list(iter_samples(path))
    for url in (path, f"pipe:cat {path}"):  # a file seeks over the other payloads, a pipe reads past them
        def read(**kw):
            samples = list(iter_samples(url, **kw))
            assert all(s.pop("__url__") == url for s in samples)
            return samples

        expected = [{k: v for k, v in s.items() if k != "__url__"} for s in every]
        assert read(wanted={1, 3}.__contains__) == [expected[1], expected[3]]
        assert read(start=2, stop=4) == expected[2:4]
        assert read(start=1, wanted={0, 4}.__contains__) == [expected[4]]
