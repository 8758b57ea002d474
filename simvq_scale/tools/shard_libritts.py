"""Write LibriTTS (or any folder of audio files) as WebDataset shards: libritts-{name}-NNNNNN.tar + .json.

    python tools/shard_libritts.py --src /data/LibriTTS --split train-clean-100 --out /data/shards

Reads <speaker>/<chapter>/<utt>.{wav,flac,ogg,mp3} with <utt>.normalized.txt beside it (or any
tree of audio files). Each sample: `flac` (mono, resampled to --sample-rate, 16-bit), `txt`
(transcript, empty when there is none), `json` (speaker, chapter, duration_s, rates, source),
`__key__` (the path below the split folder). The name is --split or the folder's own name.
Rerunning keeps finished shards that are intact; undecodable or empty files are skipped and listed.
"""

from __future__ import annotations

import argparse
import sys

from simvq_scale.data.audio_sources import AudioLayoutError, shard_audio
from simvq_scale.data.shards import summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="LibriTTS root, a split folder, or any folder of audio")
    parser.add_argument("--out", required=True, help="folder for the shards and the manifest")
    parser.add_argument("--split", default=None, help="sub-folder of --src to shard, e.g. train-clean-100")
    parser.add_argument("--sample-rate", type=int, default=24000, help="target rate in Hz (default 24000)")
    parser.add_argument("--shard-size", type=int, default=1000, help="source files per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=4, help="encoding processes; 0 = in this process (default 4)")
    parser.add_argument("--prefix", default="libritts", help="shard name prefix (default libritts)")
    args = parser.parse_args(argv)
    try:
        manifest = shard_audio(args.src, args.out, split=args.split, sample_rate=args.sample_rate,
                               shard_size=args.shard_size, workers=args.workers, prefix=args.prefix)
    except (AudioLayoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, args.out, "clips"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
