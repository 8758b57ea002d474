"""Audio shard sets from LibriTTS's layout or any folder of audio files.

LibriTTS: `<split>/<speaker>/<chapter>/<utt>.wav` with `<utt>.normalized.txt` beside it; any
folder of wav / flac / ogg / mp3 files works too (speaker and chapter then come from whatever
folders there are, the transcript is empty when no text file sits beside the audio).
Each sample holds `flac` (mono, resampled to the target rate, 16-bit), `txt` (the transcript)
and `json` (speaker, chapter, duration_s, sample_rate, source_sample_rate, source).
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from simvq_scale.data.decode import to_mono_at_rate
from simvq_scale.data.shards import Skip, SourceFile, sample_key, walk_sorted, write_shard_set

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
TRANSCRIPT_SUFFIXES = (".normalized.txt", ".original.txt", ".txt")


class AudioLayoutError(ValueError):
    """A source folder with no audio the shard writer can use."""


def audio_root(src: str | Path, split: str | None) -> str:
    src = str(src)
    if not os.path.isdir(src):
        raise AudioLayoutError(f"--src {src} is not a folder")
    if split:
        candidate = os.path.join(src, split)
        if not os.path.isdir(candidate):
            raise AudioLayoutError(f"--split {split}: no folder {candidate}")
        return candidate
    return src


def list_audio(root: str) -> tuple[Iterator[SourceFile], int]:
    """(stream of audio files in a fixed order, their number) under `root`."""
    count = sum(1 for _ in walk_sorted(root, AUDIO_SUFFIXES))
    if count == 0:
        raise AudioLayoutError(
            f"{root} holds no audio files: expected LibriTTS layout <speaker>/<chapter>/<utt>.wav with "
            f"<utt>.normalized.txt beside it, or any folder tree of {'/'.join(AUDIO_SUFFIXES)} files")
    stream = (SourceFile(p, sample_key(os.path.relpath(p, root))) for p in walk_sorted(root, AUDIO_SUFFIXES))
    return stream, count


def read_transcript(audio_path: str) -> str:
    stem = os.path.splitext(audio_path)[0]
    for suffix in TRANSCRIPT_SUFFIXES:
        if os.path.isfile(stem + suffix):
            return Path(stem + suffix).read_text(encoding="utf-8").strip()
    return ""


def encode_audio(source: SourceFile, sample_rate: int = 24000) -> dict[str, bytes]:
    """`flac` + `txt` + `json` fields for one audio file; Skip for undecodable, empty or non-finite audio."""
    try:
        audio, rate = sf.read(source.path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise Skip(f"not decodable audio: {e}") from None
    if audio.shape[0] == 0:
        raise Skip("empty audio (0 frames)")
    if not np.isfinite(audio).all():
        raise Skip("audio holds NaN or infinite samples")
    mono = to_mono_at_rate(audio, rate, sample_rate)
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(mono, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    folders = source.key.split("/")[:-1]
    meta = {
        "speaker": folders[-2] if len(folders) >= 2 else (folders[-1] if folders else ""),
        "chapter": folders[-1] if len(folders) >= 2 else "",
        "duration_s": round(len(mono) / sample_rate, 4),
        "sample_rate": sample_rate,
        "source_sample_rate": int(rate),
        "source": source.key,
    }
    return {"flac": buffer.getvalue(), "txt": read_transcript(source.path).encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True).encode()}


def shard_audio(src: str | Path, out: str | Path, split: str | None = None, sample_rate: int = 24000,
                shard_size: int = 1000, workers: int = 0, prefix: str = "libritts", progress: bool = True,
                manifest_extra: dict | None = None) -> dict:
    """Write `<out>/<prefix>-<name>-NNNNNN.tar` and `<prefix>-<name>.json`, name = split or the folder's name."""
    if sample_rate < 1:
        raise AudioLayoutError(f"--sample-rate {sample_rate} must be a positive number of Hz")
    root = audio_root(src, split)
    name = split or os.path.basename(os.path.abspath(root))
    sources, count = list_audio(root)
    return write_shard_set(
        sources, functools.partial(encode_audio, sample_rate=sample_rate), out, f"{prefix}-{name}",
        shard_size=shard_size, workers=workers, total_hint=count, progress=progress,
        settings={"sample_rate": sample_rate},
        manifest_extra={"modality": "audio", "split": name, "source": os.path.abspath(root),
                        "sample_rate": sample_rate, **(manifest_extra or {})})
