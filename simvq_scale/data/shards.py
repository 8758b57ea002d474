"""Writing WebDataset shard sets: deterministic, parallel, resumable, with a manifest.

Source files arrive as a sorted stream; file number i goes to shard i // shard_size,
so where a file lands never depends on worker scheduling, and the file list is never
held in memory as a whole (only the chunks in flight). Each shard is built by one
worker call `encode(path) -> sample dict | skip reason` and written to a temporary
name, then renamed; a small record next to it (`.<prefix>.parts/<index>.json`)
says how it was made. On a rerun a shard whose record matches its input chunk and
whose tar still counts the recorded samples is kept, everything else is rewritten.
The manifest `<prefix>.json` is assembled from the records at the end.

Tar members carry fixed metadata (mtime 0, no owner), so the same input gives
byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from simvq_scale.data.tars import count_samples


class Skip(Exception):
    """Raised by an encoder for a source file that must not be written; the message is the reason."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute or working-directory path of the file to encode
    key: str  # the sample's stable __key__
    label: int = -1  # class index for labelled images; -1 where there is none


# An encoder turns one source file into the fields of one sample (without __key__) or raises Skip.
Encoder = Callable[[SourceFile], dict[str, bytes | str]]


def walk_sorted(root: str | Path, suffixes: tuple[str, ...]) -> Iterator[str]:
    """Files under `root` whose lower-cased name ends in one of `suffixes`, depth first, sorted per directory.

    Only one directory listing is held at a time per level, so a tree of millions of files streams.
    """
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue  # hidden files and folders (.DS_Store, our own .parts records) are not data
        if entry.is_dir(follow_symlinks=True):
            yield from walk_sorted(entry.path, suffixes)
        elif entry.name.lower().endswith(suffixes):
            yield entry.path


def sample_key(relative_path: str) -> str:
    """A WebDataset key from a path relative to the source root: extension dropped, no dots left.

    WebDataset splits a member name at the first dot of its base name, so dots inside
    the stem become underscores ("a/b.c.jpg" -> "a/b_c").
    """
    stem = os.path.splitext(relative_path.replace(os.sep, "/"))[0]
    return stem.replace(".", "_")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _chunks(sources: Iterable[SourceFile], size: int) -> Iterator[list[SourceFile]]:
    chunk: list[SourceFile] = []
    for source in sources:
        chunk.append(source)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _chunk_digest(chunk: list[SourceFile]) -> str:
    """Identity of a shard's input: its files, keys, sizes and modification times."""
    h = hashlib.sha256()
    for s in chunk:
        try:
            st = os.stat(s.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{s.path}\0{s.key}\0{s.label}\0{stamp}\n".encode())
    return h.hexdigest()


def _write_shard(encode: Encoder, chunk: list[SourceFile], out_dir: str, prefix: str, index: int,
                 digest: str, settings: dict) -> dict:
    """Encode one chunk into one shard (temp name, then rename) and write its record. Runs in a worker."""
    name = shard_name(prefix, index)
    final = os.path.join(out_dir, name)
    temp = final + ".tmp"
    skipped = []
    samples = 0
    with open(temp, "wb") as f:
        writer = wds.TarWriter(f, user="", group="", mtime=0, encoder=False)
        for source in chunk:
            try:
                fields = encode(source)
            except Skip as e:
                skipped.append({"path": source.path, "reason": str(e)})
                continue
            except OSError as e:
                skipped.append({"path": source.path, "reason": f"cannot read: {e}"})
                continue
            writer.write({"__key__": source.key, **fields})
            samples += 1
        writer.close()
    size = os.path.getsize(temp)
    os.replace(temp, final)
    record = {"file": name, "samples": samples, "bytes": size, "sources": len(chunk),
              "digest": digest, "settings": settings, "skipped": skipped}
    _atomic_write_json(_record_path(out_dir, prefix, index), record)
    return record


def _record_path(out_dir: str, prefix: str, index: int) -> str:
    return os.path.join(out_dir, f".{prefix}.parts", f"{index:06d}.json")


def _atomic_write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = path + ".tmp"
    with open(temp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(temp, path)


def _completed_record(out_dir: str, prefix: str, index: int, digest: str, settings: dict) -> dict | None:
    """The record of shard `index` if it was finished from the same input and settings and is intact."""
    try:
        with open(_record_path(out_dir, prefix, index)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    tar_path = os.path.join(out_dir, shard_name(prefix, index))
    if record.get("digest") != digest or record.get("settings") != settings:
        return None
    if not os.path.isfile(tar_path) or os.path.getsize(tar_path) != record.get("bytes"):
        return None
    errors: list[str] = []
    if count_samples(tar_path, lambda reason, key, detail: errors.append(detail)) != record["samples"] or errors:
        return None
    return record


def write_shard_set(sources: Iterable[SourceFile], encode: Encoder, out_dir: str | Path, prefix: str,
                    shard_size: int = 1000, workers: int = 0, total_hint: int | None = None,
                    settings: dict | None = None, manifest_extra: dict | None = None,
                    progress: bool = True) -> dict:
    """Write `<out_dir>/<prefix>-NNNNNN.tar` shards and `<out_dir>/<prefix>.json`; returns the manifest.

    `sources` must be a deterministic stream (e.g. from `walk_sorted`); `encode` must be a
    picklable top-level function (or functools.partial of one) when `workers` > 0.
    `settings` (e.g. the target sample rate) is part of each shard's identity for resume.
    Shards beyond the new last one, left by an older run over more files, are removed.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    settings = dict(settings or {})
    records: dict[int, dict] = {}
    reused = 0
    bar = tqdm(total=total_hint, unit="file", desc=prefix, disable=not progress, dynamic_ncols=True)

    def finish(record: dict, index: int) -> None:
        records[index] = record
        bar.update(record["sources"])

    # spawn, not fork: a forked child of a process whose torch/OpenMP thread pool is running can deadlock
    # (the audio encoder resamples with torch)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) if workers > 0 else None
    in_flight: dict[Future, int] = {}
    try:
        for index, chunk in enumerate(_chunks(sources, shard_size)):
            digest = _chunk_digest(chunk)
            done = _completed_record(out_dir, prefix, index, digest, settings)
            if done is not None:
                reused += 1
                finish(done, index)
                continue
            if pool is None:
                finish(_write_shard(encode, chunk, out_dir, prefix, index, digest, settings), index)
                continue
            in_flight[pool.submit(_write_shard, encode, chunk, out_dir, prefix, index, digest, settings)] = index
            while len(in_flight) >= 2 * workers:  # bound the chunks held in memory
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    finish(fut.result(), in_flight.pop(fut))
        for fut in list(in_flight):
            finish(fut.result(), in_flight.pop(fut))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()

    _remove_stale_shards(out_dir, prefix, len(records))
    ordered = [records[i] for i in range(len(records))]
    manifest = {
        "prefix": prefix,
        "shards": [{"file": r["file"], "samples": r["samples"], "bytes": r["bytes"]} for r in ordered],
        "num_shards": len(ordered),
        "total": sum(r["samples"] for r in ordered),
        "sources": sum(r["sources"] for r in ordered),
        "shard_size": shard_size,
        "settings": settings,
        **(manifest_extra or {}),
        "skipped": [s for r in ordered for s in r["skipped"]],
        "reused_shards": reused,
    }
    _atomic_write_json(os.path.join(out_dir, f"{prefix}.json"), manifest)
    return manifest


def _remove_stale_shards(out_dir: str, prefix: str, count: int) -> None:
    index = count
    while os.path.exists(os.path.join(out_dir, shard_name(prefix, index))):
        os.remove(os.path.join(out_dir, shard_name(prefix, index)))
        record = _record_path(out_dir, prefix, index)
        if os.path.exists(record):
            os.remove(record)
        index += 1
    for name in os.listdir(out_dir):  # temporaries of an interrupted run
        if name.startswith(prefix + "-") and name.endswith(".tar.tmp"):
            os.remove(os.path.join(out_dir, name))


def shard_pattern(manifest: dict, out_dir: str | Path) -> str:
    """Brace pattern naming every shard of a written set, for DataConfig.train_shards / val_shards."""
    n = manifest["num_shards"]
    last = f"{n - 1:06d}"
    return os.path.join(str(out_dir), f"{manifest['prefix']}-{{000000..{last}}}.tar")


def summary(manifest: dict, out_dir: str | Path, noun: str, details: str = "", examples: int = 10) -> str:
    """What a shard tool prints at the end: counts, the manifest's path, the first skipped files."""
    lines = [f"{manifest['total']} {noun} in {manifest['num_shards']} shards ({manifest['reused_shards']} kept from "
             f"an earlier run), {details}{len(manifest['skipped'])} files skipped -> {out_dir}/{manifest['prefix']}.json"]
    lines += [f"  skipped {item['path']}: {item['reason']}" for item in manifest["skipped"][:examples]]
    return "\n".join(lines)

