"""Reading WebDataset shards by URL: expand a shard pattern, read a shard's samples, count them.

A shard is a local path or any URL that webdataset's `gopen` opens: `pipe:CMD` (the shard is the
command's standard output, e.g. `pipe:curl -s -L https://host/a-000000.tar` or
`pipe:aws s3 cp s3://bucket/a-000000.tar -`), `http(s)://`, `gs://`, `ais://`, `file:`.
A pipe: URL runs a shell command, so a config holding one is as trusted as a script
(webdataset refuses them when WDS_SECURE=1 is set).

A sample is the group of consecutive tar members that share a key (`<key>.<ext>`, the
WebDataset convention), grouped by webdataset's own `group_by_keys` (suffixes lower-cased) and
returned undecoded as {"__key__", "__url__", ext: bytes, ...}. The tar members are walked by
`tar_members` below rather than by webdataset's `tar_file_iterator`, which goes through Python's
tarfile: on this project's 2-core CPU this walker reads 2.5-3x as many three-member audio samples
per CPU-second (22,000-28,000 against 8,500-9,700; tools/bench_data.py prints both), and with
~2,000 one-second FLAC crops decoded per CPU-second tarfile's share alone kept the shard reader
behind a folder of files.

Damage is never fatal: a member whose data is cut short marks its sample "__damaged__" (the
decoder then skips it as truncated_sample), and a header that cannot be read, a shard that cannot
be opened or a pipe command that fails end the shard early; those are reported through the
`on_problem(reason, key, detail)` callback. Counting walks the headers exactly as reading does
(seeking over the payloads of local files), so a damaged shard yields as many samples as it counts.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = (b"0", b"\0", b"7")  # regular and contiguous files, as tarfile.REGULAR_TYPES (without GNU sparse)
SKIP_CHUNK = 1 << 20
DAMAGED = "__damaged__"  # the field a damaged sample carries, with what happened

# on_problem(reason, key, detail): reason is the counter's name; key "" when no sample is concerned
ProblemCallback = Callable[[str, str, str], None]


class ShardPatternError(ValueError):
    """A shard pattern that names no readable shard."""


def _ignore(reason: str, key: str, detail: str) -> None:
    return None


def is_url(shard: str) -> bool:
    """True for `scheme:...` shards other than `file:` (a scheme of one letter is a Windows drive)."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", shard)) and not shard.startswith("file:")


def _local_path(shard: str) -> str:
    return urlparse(shard).path if shard.startswith("file:") else shard


def expand_shards(pattern: str) -> list[str]:
    """Sorted, de-duplicated shard list for brace patterns ("a-{000..009}.tar"), globs and URLs, several
    joined by "::" (webdataset's expand_urls: `::` lists, ${WDS_*} variables, braces). Local shards must
    exist; a URL must have a scheme webdataset can open (checked here, read later)."""
    if not pattern or not pattern.strip():
        raise ShardPatternError("shard pattern is empty: set data.train_shards / data.val_shards "
                                "to e.g. 'data/imagenet-train-{000000..000127}.tar'")
    shards: list[str] = []
    missing: list[str] = []
    for item in expand_urls(pattern.strip()):
        item = item.strip()
        if is_url(item):
            scheme = item.split(":", 1)[0]
            if scheme not in gopen_schemes:
                raise ShardPatternError(
                    f"shard {item!r}: webdataset cannot open {scheme}: URLs (it opens "
                    f"{', '.join(sorted(s + ':' for s in gopen_schemes if s != '__default__'))}); for S3 use "
                    f"'pipe:aws s3 cp s3://bucket/shard.tar -'")
            shards.append(item)
        elif any(ch in item for ch in "*?["):
            shards.extend(sorted(glob.glob(_local_path(item))))
        elif os.path.isfile(_local_path(item)):
            shards.append(item)
        else:
            missing.append(item)
    if not shards:
        raise ShardPatternError(f"shard pattern {pattern!r} matches no file")
    if missing:
        raise ShardPatternError(f"shard pattern {pattern!r}: {len(missing)} of {len(shards) + len(missing)} shards "
                                f"do not exist, first missing: {missing[0]}")
    return sorted(dict.fromkeys(shards))


def _number(field: bytes) -> int:
    """A tar number field: octal text, or base-256 when the high bit of the first byte is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    """The header checksum, unsigned or (as some old tars wrote it) signed, as tarfile accepts it."""
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as eight spaces
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b >= 128)
    return stored == signed


def _pax_records(data: bytes) -> dict[str, str]:
    """The "<length> <key>=<value>\\n" records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _skip(stream, count: int) -> bool:
    """Move `count` bytes on (seeking where the stream allows); False when the stream ends first."""
    if count <= 0:
        return True
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        stream.seek(count - 1, os.SEEK_CUR)
        return len(stream.read(1)) == 1
    while count > 0:
        got = len(stream.read(min(count, SKIP_CHUNK)))
        if got == 0:
            return False
        count -= got
    return True


def tar_members(stream, url: str, on_problem: ProblemCallback = _ignore,
                wanted: Callable[[int], bool] | None = None) -> Iterator[dict]:
    """{"fname", "data", "__url__"} for each regular file of an uncompressed tar stream that belongs to a sample,
    in order (the items of webdataset's tar_file_iterator that group_by_keys keeps). ustar, pax (path, size)
    and GNU long names are understood; other member types are passed over. Sample i is the i-th run of
    members sharing a key, as group_by_keys groups them; where wanted(i) is False its members come with
    data b"" and their payloads are skipped (seeked over in local files). A member cut short is yielded as
    "<key>.__damaged__"; damage ends the walk through on_problem."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    offset, index, last_key, read = 0, -1, None, True
    try:
        while True:
            header = stream.read(BLOCK)
            if len(header) < BLOCK:
                if header or offset == 0:  # (an archive that ends at a member boundary without its zero blocks is whole)
                    on_problem("unreadable_tar" if offset == 0 else "truncated_tar", "",
                               f"{url}: {len(header)} bytes where a tar header of {BLOCK} should be, at byte {offset}")
                return
            if header == ZERO_BLOCK:
                return
            if not _checksum_ok(header):
                what = "gzip-compressed (read it through 'pipe:gzip -dc FILE')" if header[:2] == b"\x1f\x8b" else \
                    "not a tar header"
                on_problem("unreadable_tar" if offset == 0 else "truncated_tar", "",
                           f"{url}: bad header checksum at byte {offset}: {what}")
                return
            kind = header[156:157]
            size = int(pax["size"]) if "size" in pax else _number(header[124:136])
            padding = -size % BLOCK
            at, offset = offset, offset + BLOCK + size + padding
            if kind in REGULAR:
                name = long_name or pax.get("path")
                if name is None:
                    name, prefix = _text(header[0:100]), _text(header[345:500])
                    name = f"{prefix}/{name}" if prefix else name
                long_name, pax = None, {}
                key = base_plus_ext(name)[0]
                if key is None or (kind == b"\0" and name.endswith("/")):  # no sample's member; an old-style directory
                    if not _skip(stream, size + padding):
                        on_problem("truncated_tar", "", f"{url}: {name} cut short")
                        return
                    continue
                if key != last_key:
                    index, last_key = index + 1, key
                    read = wanted is None or wanted(index)
                if not read:
                    whole = _skip(stream, size + padding)
                    yield {"fname": name, "data": b"", "__url__": url}
                    if not whole:
                        on_problem("truncated_tar", "", f"{url}: {name} cut short")
                        return
                    continue
                data = stream.read(size)
                if len(data) < size:
                    yield {"fname": f"{key}.{DAMAGED}", "data": f"{name}: {len(data)} of {size} bytes", "__url__": url}
                    on_problem("truncated_tar", "", f"{url}: {name} cut short ({len(data)} of {size} bytes)")
                    return
                if padding and len(stream.read(padding)) < padding:
                    yield {"fname": name, "data": data, "__url__": url}
                    on_problem("truncated_tar", "", f"{url}: ends inside the padding after {name}")
                    return
                yield {"fname": name, "data": data, "__url__": url}
            elif kind in (b"L", b"x"):  # GNU long name / pax header: they describe the next member
                data = stream.read(size)
                if len(data) < size or not _skip(stream, padding):
                    on_problem("truncated_tar", "", f"{url}: extended header cut short at byte {at}")
                    return
                if kind == b"L":
                    long_name = _text(data)
                else:
                    pax = _pax_records(data)
            elif kind == b"S":
                on_problem("truncated_tar", "", f"{url}: GNU sparse member at byte {at}, not supported")
                return
            elif not _skip(stream, size + padding):  # directories, links, global pax headers, ...
                on_problem("truncated_tar", "", f"{url}: cut short at byte {at}")
                return
    except (OSError, ValueError) as e:  # a read error, a failing pipe: command, a malformed number or pax record
        on_problem("truncated_tar" if offset else "unreadable_tar", "", f"{url}: {e}")


def _grouped(url: str, on_problem: ProblemCallback, read: Callable[[int], bool],
             end: float = float("inf")) -> Iterator[tuple[int, dict]]:
    """(index, sample) for every sample of one shard before `end`; payloads only where read(index)."""
    def duplicate(exn: Exception) -> bool:  # group_by_keys's handler: a second member of one name is left out
        fname = str(exn.args[0]).split(":", 1)[0] if exn.args else ""
        on_problem("duplicate_member", base_plus_ext(fname)[0] or "", f"{url}: {exn.args[0] if exn.args else exn}")
        return True

    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - whatever opening fails with (missing file, bad scheme), the shard is unreadable
        on_problem("unreadable_tar", "", f"{url}: {e}")
        return
    damage: list[str] = []

    def on_damage(reason: str, key: str, detail: str) -> None:
        damage.append(reason)
        on_problem(reason, key, detail)

    finished = False
    try:
        for index, sample in enumerate(group_by_keys(tar_members(stream, url, on_damage, read), handler=duplicate)):
            if index >= end:
                return
            yield index, sample
        finished = True
    finally:
        try:
            stream.close()
        except OSError as e:  # a failed pipe: command; news only when the walk ended as if the shard were whole
            if finished and not damage:
                on_problem("unreadable_tar", "", f"{url}: {e}")


def iter_samples(url: str | Path, on_problem: ProblemCallback = _ignore, start: int = 0, stop: int | None = None,
                 wanted: Callable[[int], bool] | None = None) -> Iterator[dict]:
    """Raw samples number `start` (inclusive) to `stop` (exclusive) of one shard, in tar order; with `wanted`,
    only those whose index it accepts. The payloads of the others are not read where the stream can seek."""
    end = float("inf") if stop is None else stop

    def read(index: int) -> bool:
        return start <= index < end and (wanted is None or wanted(index))

    for index, sample in _grouped(str(url), on_problem, read, end):
        if read(index):
            yield sample


def count_samples(url: str | Path, on_problem: ProblemCallback = _ignore) -> int:
    """Number of samples in one shard: headers only for local files (payloads are seeked over); a URL
    is streamed once."""
    return sum(1 for _ in _grouped(str(url), on_problem, lambda index: False))
