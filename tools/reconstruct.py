#!/usr/bin/env python
"""Reconstruct image or audio files through a tokenizer, for a side-by-side look.

    python tools/reconstruct.py --checkpoint runs/image_65k photo1.jpg photo2.png --out recon/
    python tools/reconstruct.py --checkpoint runs/audio_65k clip.flac --out recon/

Images are scaled (shorter side) and center-cropped to the model's data.image_size, exactly as the
evaluation loader does, and written as <stem>.compare.png (original | reconstruction) and
<stem>.recon.png. Audio files are read whole, mixed to mono, resampled to the model's rate, padded to
a whole number of tokens, and written as <stem>.orig.wav and <stem>.recon.wav (16-bit, model rate).
Each input's code count and PSNR (images) or mel distance (audio) is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from simvq_scale.data.decode import IMAGE_FIELDS, BadSample, decode_image, to_mono_at_rate
from simvq_scale.eval.audio import MelDistance
from simvq_scale.eval.image import psnr_per_image, to_unit
from simvq_scale.inference import Tokenizer, load_tokenizer

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def load_image(path: Path, size: int) -> torch.Tensor:
    suffix = path.suffix.lower().lstrip(".")
    field = suffix if suffix in IMAGE_FIELDS else "png"  # PIL detects the format from the bytes
    try:
        return decode_image({"__key__": str(path), field: path.read_bytes()}, size, False, False,
                            np.random.default_rng(0))
    except BadSample as e:
        raise SystemExit(f"cannot read image {path}: {e}") from None


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((to_unit(x) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def samples_per_token(tokenizer: Tokenizer) -> int:
    """Waveform samples per code, measured by encoding one training segment of silence."""
    length = round(tokenizer.config.data.segment_seconds * tokenizer.sample_rate)
    ids = tokenizer.encode(torch.zeros(1, length))
    return length // ids[0].numel()


def reconstruct_image(tokenizer: Tokenizer, path: Path, out: Path) -> str:
    x = load_image(path, tokenizer.config.data.image_size)[None]
    x_hat, ids = tokenizer.reconstruct(x)
    x_hat = x_hat.clamp(-1, 1).cpu()
    side = Image.new("RGB", (2 * x.shape[-1], x.shape[-2]))
    side.paste(to_pil(x[0]), (0, 0))
    side.paste(to_pil(x_hat[0]), (x.shape[-1], 0))
    side.save(out / f"{path.stem}.compare.png")
    to_pil(x_hat[0]).save(out / f"{path.stem}.recon.png")
    return f"{ids[0].numel()} codes, PSNR {float(psnr_per_image(x, x_hat)):.2f} dB"


def reconstruct_audio(tokenizer: Tokenizer, path: Path, out: Path, hop: int, mel: MelDistance) -> str:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(to_mono_at_rate(audio, rate, tokenizer.sample_rate))[None]
    n = wave.shape[-1]
    x_hat, ids = tokenizer.reconstruct(F.pad(wave, (0, -n % hop)))
    x_hat = x_hat.reshape(1, -1)[:, :n].clamp(-1, 1).cpu()
    sf.write(out / f"{path.stem}.orig.wav", wave[0].numpy(), tokenizer.sample_rate, subtype="PCM_16")
    sf.write(out / f"{path.stem}.recon.wav", x_hat[0].numpy(), tokenizer.sample_rate, subtype="PCM_16")
    return f"{ids[0].numel()} codes, mel distance {float(mel(wave, x_hat)):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training out_dir (its generator_ema.pt) or an export file")
    parser.add_argument("inputs", nargs="+", help="image files (images model) or audio files (audio model)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.checkpoint, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in args.inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"input files not found: {', '.join(missing)}")
    if tokenizer.modality == "audio":
        hop, mel = samples_per_token(tokenizer), MelDistance(tokenizer.sample_rate)
    for path in tqdm(paths, desc="reconstruct", unit="file", disable=len(paths) < 2):
        if tokenizer.modality == "image":
            summary = reconstruct_image(tokenizer, path, out)
        elif path.suffix.lower() in AUDIO_SUFFIXES:
            summary = reconstruct_audio(tokenizer, path, out, hop, mel)
        else:
            parser.error(f"{path}: an audio model takes {', '.join(AUDIO_SUFFIXES)} files")
        print(f"{path}: {summary}")
    print(f"wrote reconstructions to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
