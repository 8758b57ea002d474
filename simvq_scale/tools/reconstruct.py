"""Reconstruct image or audio files through a tokenizer, for a side-by-side look.

    python tools/reconstruct.py --checkpoint runs/image_65k photo1.jpg photo2.png --out recon/
    python tools/reconstruct.py --checkpoint runs/audio_65k clip.flac --out recon/

The model's modality reads, writes and scores the files (simvq_scale.modality: read_file,
write_reconstruction, fidelity). Images are scaled (shorter side) and center-cropped to the model's
data.image_size, exactly as the evaluation loader does, and written as <stem>.compare.png (original |
reconstruction) and <stem>.recon.png. Audio files are read whole, mixed to mono and resampled to the
model's rate (the model pads to a whole number of tokens and cuts its output back to the input's length),
and written as <stem>.orig.wav and <stem>.recon.wav (16-bit, model rate). Each input's code count and PSNR
(images) or mel distance (audio) is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from simvq_scale.inference import load_tokenizer
from simvq_scale.modality import get_modality
from simvq_scale.tools.user_errors import reports_user_errors


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training out_dir (its generator_ema.pt) or an export file")
    parser.add_argument("inputs", nargs="+", help="files of the model's modality (image or audio files)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.checkpoint, args.device)
    modality, data = get_modality(tokenizer.modality), tokenizer.config.data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in args.inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"input files not found: {', '.join(missing)}")
    for path in tqdm(paths, desc="reconstruct", unit="file", disable=len(paths) < 2):
        try:
            x = modality.read_file(path, data)
        except ValueError as e:
            parser.error(str(e))
        x_hat, ids = tokenizer.reconstruct(x[None])
        x_hat = x_hat[0].clamp(-1, 1).cpu()
        modality.write_reconstruction(out, path.stem, x, x_hat, data)
        print(f"{path}: {ids[0].numel()} codes, {modality.fidelity(x, x_hat, data)}")
    print(f"wrote reconstructions to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
