"""Reading WebDataset shards: expand a shard pattern, count samples, iterate raw samples.

A sample is the group of consecutive tar members that share a key
(`<key>.<ext>`, the WebDataset convention); it is returned undecoded as
{"__key__": str, ext: bytes, ...}. Counting and reading walk the tar headers
the same way, so a truncated tar yields exactly as many samples as it counts.
Damage is never fatal: a member whose data is cut short marks its sample
"__damaged__", and a header that cannot be read ends the shard early; both
are reported through the `on_error` callback.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import braceexpand
from webdataset.tariterators import base_plus_ext


class ShardPatternError(ValueError):
    """A shard pattern that names no readable shard."""


def expand_shards(pattern: str) -> list[str]:
    """Sorted list of shard files for a brace pattern ("a-{000..009}.tar"), a glob, or several joined by "::"."""
    if not pattern or not pattern.strip():
        raise ShardPatternError("shard pattern is empty: set data.train_shards / data.val_shards "
                                "to e.g. 'data/imagenet-train-{000000..000127}.tar'")
    paths: list[str] = []
    for part in pattern.split("::"):
        for item in braceexpand.braceexpand(part.strip()):
            if any(ch in item for ch in "*?["):
                paths.extend(sorted(glob.glob(item)))
            else:
                paths.append(item)
    existing = [p for p in paths if os.path.isfile(p)]
    if not existing:
        raise ShardPatternError(f"shard pattern {pattern!r} matches no file")
    if len(existing) < len(paths):
        missing = [p for p in paths if not os.path.isfile(p)]
        raise ShardPatternError(f"shard pattern {pattern!r}: {len(missing)} of {len(paths)} shards do not exist, "
                                f"first missing: {missing[0]}")
    return sorted(dict.fromkeys(existing))


def _members(tar: tarfile.TarFile, path: str, on_error: Callable[[str, str], None]) -> Iterator[tarfile.TarInfo]:
    """Regular-file members in order; a header that cannot be read ends the walk (reported)."""
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            on_error("truncated_tar", f"{path}: {e}")
            return
        if info is None:
            return
        if info.isfile():
            yield info


def _grouped(members: Iterator[tarfile.TarInfo]) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) for runs of consecutive members with the same key."""
    key, group = None, []
    for info in members:
        split = base_plus_ext(info.name)
        if split[0] is None:
            continue  # a file without an extension belongs to no sample
        if split[0] != key and group:
            yield key, group
            group = []
        key = split[0]
        group.append(info)
    if group:
        yield key, group


def _ignore(kind: str, detail: str) -> None:
    return None


def count_samples(path: str | Path, on_error: Callable[[str, str], None] = _ignore) -> int:
    """Number of samples in one shard, from its headers only (no payload is read)."""
    path = str(path)
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        on_error("unreadable_tar", f"{path}: {e}")
        return 0
    with tar:
        return sum(1 for _ in _grouped(_members(tar, path, on_error)))


def iter_samples(path: str | Path, on_error: Callable[[str, str], None] = _ignore,
                 start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Raw samples number `start` (inclusive) to `stop` (exclusive) of one shard, in tar order."""
    path = str(path)
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        on_error("unreadable_tar", f"{path}: {e}")
        return
    with tar:
        for index, (key, members) in enumerate(_grouped(_members(tar, path, on_error))):
            if stop is not None and index >= stop:
                return
            if index < start:
                continue
            sample: dict = {"__key__": key, "__url__": path}
            for info in members:
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, OSError, EOFError) as e:
                    data, reason = b"", str(e)
                else:
                    reason = f"member cut short ({len(data)} of {info.size} bytes)"
                if len(data) != info.size:
                    sample["__damaged__"] = f"{info.name}: {reason}"
                    continue
                sample[base_plus_ext(info.name)[1]] = data
            yield sample
