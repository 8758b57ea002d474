"""Write ImageNet (or any ImageFolder tree) as WebDataset shards: imagenet-{split}-NNNNNN.tar + imagenet-{split}.json.

    python tools/shard_imagenet.py --src /data/imagenet --out /data/shards --split train --workers 16

`--src` may be the ImageNet root (holding train/ and val/) or the split folder itself. For the
official validation release (a flat folder of ILSVRC2012_val_*.JPEG) pass --val-labels (or put
LOC_val_solution.csv, or ILSVRC2012_validation_ground_truth.txt with the devkit's meta.mat, next to
the folder). Each sample: `jpg` (original bytes unless --resize-shorter), `cls`, `__key__`
(the file's path below the split folder, extension dropped). Rerunning keeps finished shards that
are intact; corrupt or non-image files are skipped and listed in the manifest.
"""

from __future__ import annotations

import argparse
import sys

from simvq_scale.data.image_sources import LayoutError, shard_images
from simvq_scale.data.shards import summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="ImageNet root, split folder or any ImageFolder tree")
    parser.add_argument("--out", required=True, help="folder for the shards and the manifest")
    parser.add_argument("--split", default="train", help="split name; src/<split> is used when it exists (default train)")
    parser.add_argument("--shard-size", type=int, default=1000, help="source files per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=4, help="encoding processes; 0 = in this process (default 4)")
    parser.add_argument("--resize-shorter", type=int, default=0, metavar="PX",
                        help="shrink images whose shorter side exceeds PX to PX and re-encode (default 0: keep bytes)")
    parser.add_argument("--val-labels", default=None, help="label file for a flat validation folder")
    parser.add_argument("--prefix", default="imagenet", help="shard name prefix (default imagenet)")
    args = parser.parse_args(argv)
    try:
        manifest = shard_images(args.src, args.out, split=args.split, shard_size=args.shard_size,
                                workers=args.workers, resize_shorter=args.resize_shorter,
                                val_labels=args.val_labels, prefix=args.prefix)
    except (LayoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, args.out, "samples", f"{len(manifest['class_to_idx'])} classes, "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
