"""Build small image and audio shard sets offline, for the README demo (no download needed).

    python tools/make_demo_data.py --out demo_data

Images: the real photos bundled with scikit-image (and scikit-learn's two sample photos when it is
installed) cut into many random crops, one class per photo, written as image-train / image-val
shards. Audio: English speech from espeak-ng when `espeak-ng` is on the PATH; otherwise a clearly
labelled SYNTHETIC fallback (formant-filtered vowel sequences, not speech). The audio manifest's
"speech_source" says which. Both go through the same shard writers as tools/shard_imagenet.py and
tools/shard_libritts.py; the printed summary (also demo_data/demo.json) names the shard patterns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from simvq_scale.data.audio_sources import shard_audio
from simvq_scale.data.image_sources import shard_images
from simvq_scale.data.shards import shard_pattern

SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
                  "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                  "moon.png", "retina.jpg", "rocket.jpg")
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A vector quantizer maps every frame to the nearest code.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "The frozen codebook is regenerated from its seed on every rank.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her.",
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
)
ESPEAK_VOICES = (("en-us", 150, 50), ("en-gb", 165, 40), ("en-us+f3", 140, 60), ("en-gb+m3", 175, 35))
# (F1, F2, F3) in Hz of a few vowels, for the synthetic fallback
VOWEL_FORMANTS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010),
                  "o": (570, 840, 2410), "u": (300, 870, 2240)}
HARMONICS_UP_TO_HZ = 4000.0
FORMANT_WIDTHS_HZ = np.array([60.0, 100.0, 140.0])
SYNTHETIC_SPEAKERS = (("synth-low", 105.0, 0.92), ("synth-mid", 150.0, 1.0), ("synth-high", 215.0, 1.12))


def photo_paths() -> list[tuple[str, Image.Image]]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    photos = [(Path(n).stem, Image.open(folder / n).convert("RGB")) for n in SKIMAGE_PHOTOS if (folder / n).is_file()]
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return photos
    for name, array in zip(("china", "flower"), load_sample_images().images):
        photos.append((name, Image.fromarray(array)))
    return photos


def write_crops(folder: Path, crops_per_photo: int, crop_size: int, rng: np.random.Generator) -> int:
    """Random square crops (side 1-3x crop_size, resized to crop_size) of each photo, one class folder each."""
    written = 0
    for name, photo in photo_paths():
        (folder / name).mkdir(parents=True, exist_ok=True)
        shorter = min(photo.size)
        for i in range(crops_per_photo):
            side = int(rng.integers(min(crop_size, shorter), min(3 * crop_size, shorter) + 1))
            left = int(rng.integers(0, photo.width - side + 1))
            top = int(rng.integers(0, photo.height - side + 1))
            crop = photo.resize((crop_size, crop_size), Image.BICUBIC, box=(left, top, left + side, top + side))
            crop.save(folder / name / f"{name}_{i:04d}.jpg", quality=92)
            written += 1
    return written


def espeak_version() -> str | None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    return result.stdout.strip() or "espeak-ng"


def write_espeak_speech(folder: Path, sentences: tuple[str, ...]) -> int:
    """One wav per (voice, sentence) at espeak-ng's own rate; the shard writer resamples to the target rate."""
    written = 0
    for voice, words_per_minute, pitch in ESPEAK_VOICES:
        chapter = folder / voice.replace("+", "-") / f"wpm{words_per_minute}"
        chapter.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(sentences):
            stem = chapter / f"{voice.replace('+', '-')}_wpm{words_per_minute}_{i:04d}"
            result = subprocess.run(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-p", str(pitch),
                                     "-w", f"{stem}.wav", text], capture_output=True, timeout=60)
            if result.returncode != 0:
                print(f"espeak-ng voice {voice} failed ({result.stderr.decode(errors='replace').strip()}); "
                      "leaving it out", file=sys.stderr)
                break
            Path(f"{stem}.normalized.txt").write_text(text + "\n")
            written += 1
    return written


def synth_vowels(vowels: str, f0: float, formant_scale: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A formant-like vowel sequence: harmonics of a wandering f0 weighted by resonances at the vowel's formants."""
    seconds = [float(rng.uniform(0.18, 0.4)) for _ in vowels]
    n = int(sum(seconds) * rate)
    t = np.arange(n) / rate
    pitch = f0 * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t)) * (1 - 0.1 * t / t[-1])
    phase = (2 * np.pi * np.cumsum(pitch) / rate).astype(np.float32)
    bounds = np.cumsum([0] + [int(s * rate) for s in seconds])
    formants = np.zeros((n, 3))
    for v, a, b in zip(vowels, bounds[:-1], bounds[1:]):
        formants[a:b] = np.array(VOWEL_FORMANTS[v]) * formant_scale
    kernel = np.hanning(int(0.04 * rate))  # 40 ms glides between vowels
    formants = np.stack([np.convolve(np.pad(formants[:, j], len(kernel), mode="edge"), kernel / kernel.sum(),
                                     mode="same")[len(kernel):-len(kernel)] for j in range(3)], axis=1)
    hop = 64  # resonance gains change slowly: compute them every 64 samples, hold them in between
    frames = formants[::hop]
    wave = np.zeros(n, dtype=np.float32)
    for k in range(1, int(HARMONICS_UP_TO_HZ / f0) + 1):
        freq = k * pitch[::hop, None]
        gain = (1.0 / (1.0 + ((freq - frames) / FORMANT_WIDTHS_HZ) ** 2) / np.arange(1, 4)).sum(axis=1)
        wave += np.repeat(gain.astype(np.float32), hop)[:n] * np.sin(k * phase, dtype=np.float32) / np.float32(k ** 0.5)
    syllables = np.zeros(n)
    for a, b in zip(bounds[:-1], bounds[1:]):  # each vowel its own loudness swell
        syllables[a:b] = np.hanning(b - a)
    wave = wave * (0.2 + 0.8 * syllables) + 0.003 * rng.standard_normal(n)
    return (0.8 * wave / np.abs(wave).max()).astype(np.float32)


def write_synthetic_speech(folder: Path, clips_per_speaker: int, rate: int, rng: np.random.Generator) -> int:
    written = 0
    for speaker, f0, formant_scale in SYNTHETIC_SPEAKERS:
        chapter = folder / speaker / "vowels"
        chapter.mkdir(parents=True, exist_ok=True)
        for i in range(clips_per_speaker):
            vowels = "".join(rng.choice(list(VOWEL_FORMANTS), size=int(rng.integers(4, 9))))
            stem = chapter / f"{speaker}_vowels_{i:04d}"
            sf.write(f"{stem}.wav", synth_vowels(vowels, f0, formant_scale, rate, rng), rate, subtype="PCM_16")
            Path(f"{stem}.normalized.txt").write_text(f"[synthetic vowels] {' '.join(vowels)}\n")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_data", help="output folder (default demo_data, git-ignored)")
    parser.add_argument("--crop-size", type=int, default=128, help="side of the image crops in px (default 128)")
    parser.add_argument("--train-crops", type=int, default=36, help="training crops per photo (default 36)")
    parser.add_argument("--val-crops", type=int, default=6, help="validation crops per photo (default 6)")
    parser.add_argument("--clips", type=int, default=30, help="synthetic fallback: clips per speaker (default 30)")
    parser.add_argument("--sample-rate", type=int, default=24000, help="audio rate of the shards (default 24000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops and the synthetic audio")
    parser.add_argument("--no-espeak", action="store_true", help="use the synthetic fallback even if espeak-ng exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        for split, crops in (("train", args.train_crops), ("val", args.val_crops)):
            n = write_crops(images / split, crops, args.crop_size, rng)
            print(f"images/{split}: {n} crops of {args.crop_size} px")
            manifest = shard_images(images, out, split=split, shard_size=64, prefix="image")
            summary[f"image_{split}"] = shard_pattern(manifest, out)

        speech = Path(tmp) / "speech"
        version = None if args.no_espeak else espeak_version()
        if version is not None:
            source = f"espeak-ng speech ({version})"
            held_out = 4  # the last sentences are the validation set, so no sentence is in both
            counts = {"train": write_espeak_speech(speech / "train", SENTENCES[:-held_out]),
                      "val": write_espeak_speech(speech / "val", SENTENCES[-held_out:])}
        else:
            source = "SYNTHETIC fallback: formant-filtered vowel sequences, not speech (espeak-ng not found)"
            print(f"NOTE: espeak-ng is not installed; the audio demo set is SYNTHETIC (vowel-like tones, not speech)")
            counts = {"train": write_synthetic_speech(speech / "train", args.clips, args.sample_rate, rng),
                      "val": write_synthetic_speech(speech / "val", max(1, args.clips // 5), args.sample_rate, rng)}
        for split, n in counts.items():
            print(f"audio/{split}: {n} clips, {source}")
            manifest = shard_audio(speech, out, split=split, sample_rate=args.sample_rate, shard_size=32,
                                   prefix="audio", manifest_extra={"speech_source": source})
            summary[f"audio_{split}"] = shard_pattern(manifest, out)
    summary["speech_source"] = source
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
