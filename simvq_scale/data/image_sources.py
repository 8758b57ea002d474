"""Image shard sets from ImageNet's layout or any ImageFolder tree.

Layouts understood (`root` is `src/<split>` when that folder exists, else `src`):
  * class folders: root/<class>/**/<file>; classes are the sorted folder names (ImageFolder order,
    which for ImageNet's synset folders is the usual 0..999 order);
  * ImageNet's official flat validation folder: root/ILSVRC2012_val_*.JPEG plus a label file,
    either LOC_val_solution.csv (ImageId,PredictionString "<wnid> ...") or
    ILSVRC2012_validation_ground_truth.txt (1-based ILSVRC ids in file order) with the devkit's
    meta.mat beside it, or any "<file name> <class name>" text file.
Each sample holds `jpg` (the original JPEG bytes; other formats, and resized images, are
re-encoded as JPEG quality 95) and `cls` (the class index as text).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from simvq_scale.data.shards import Skip, SourceFile, sample_key, walk_sorted, write_shard_set

ANY_FILE = ("",)  # every file is listed, so a stray non-image is reported as skipped, not silently ignored
VAL_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt")


class LayoutError(ValueError):
    """A source folder that is not in a layout the image shard writer understands."""


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _has_files(path: str) -> bool:
    return next(walk_sorted(path, ANY_FILE), None) is not None


def image_root(src: str | Path, split: str) -> str:
    src = str(src)
    if not os.path.isdir(src):
        raise LayoutError(f"--src {src} is not a folder")
    candidate = os.path.join(src, split)
    return candidate if os.path.isdir(candidate) else src


def find_val_labels(root: str) -> str | None:
    for folder in (root, os.path.dirname(os.path.abspath(root))):
        for name in VAL_LABEL_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def _read_meta_wnids(meta_path: str) -> tuple[dict[int, str], list[str]]:
    """ILSVRC id -> wnid, and the sorted wnids of the 1000 leaf classes, from the devkit's meta.mat."""
    import scipy.io  # only this layout needs it

    synsets = scipy.io.loadmat(meta_path, squeeze_me=True)["synsets"]
    ids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    leaves = sorted(str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0)
    return ids, leaves


def read_val_labels(label_file: str, image_names: list[str]) -> tuple[dict[str, str], list[str]]:
    """(image file stem -> class name, sorted class names) for a flat validation folder."""
    name = os.path.basename(label_file)
    lines = Path(label_file).read_text().splitlines()
    if name.endswith(".csv"):
        labels = {}
        for line in lines[1:]:
            if line.strip():
                image_id, _, prediction = line.partition(",")
                labels[image_id.strip()] = prediction.split()[0]
        return labels, sorted(set(labels.values()))
    if "ground_truth" in name:
        meta = os.path.join(os.path.dirname(label_file), "meta.mat")
        if not os.path.isfile(meta):
            raise LayoutError(f"{label_file} holds ILSVRC ids; their class names need the devkit's meta.mat "
                              f"next to it at {meta}")
        ids, leaves = _read_meta_wnids(meta)
        stems = sorted(os.path.splitext(n)[0] for n in image_names)
        values = [int(v) for v in lines if v.strip()]
        if len(values) != len(stems):
            raise LayoutError(f"{label_file} has {len(values)} labels but the folder has {len(stems)} images")
        return {stem: ids[v] for stem, v in zip(stems, values)}, leaves
    labels = {}
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise LayoutError(f"{label_file}:{number}: expected '<file name> <class name>', got {line!r}")
        labels[os.path.splitext(parts[0])[0]] = parts[1]
    return labels, sorted(set(labels.values()))


def list_images(src: str | Path, split: str = "train", val_labels: str | None = None
                ) -> tuple[Iterator[SourceFile], dict[str, int], int]:
    """(stream of source files in a fixed order, class name -> index, number of files) for `src`."""
    root = image_root(src, split)
    classes = _subdirs(root)
    if classes:
        if not any(_has_files(os.path.join(root, c)) for c in classes):
            raise LayoutError(f"{root}: the class folders {classes[:5]} contain no files; expected images in "
                              f"<class>/ folders, e.g. {root}/n01440764/n01440764_10026.JPEG")
        class_to_idx = {c: i for i, c in enumerate(classes)}
        count = sum(sum(1 for _ in walk_sorted(os.path.join(root, c), ANY_FILE)) for c in classes)

        def folder_stream() -> Iterator[SourceFile]:
            for c in classes:
                for path in walk_sorted(os.path.join(root, c), ANY_FILE):
                    yield SourceFile(path, sample_key(os.path.relpath(path, root)), class_to_idx[c])

        return folder_stream(), class_to_idx, count

    files = sorted(e.name for e in os.scandir(root) if e.is_file() and not e.name.startswith(".")
                   and e.name not in VAL_LABEL_FILES and e.name != "meta.mat")
    label_file = val_labels or find_val_labels(root)
    if not files or label_file is None:
        what = "is empty" if not files else "has files but no class folders and no label file"
        raise LayoutError(
            f"{root} {what}: expected ImageNet/ImageFolder layout, one folder per class with images inside "
            f"(e.g. {root}/n01440764/n01440764_10026.JPEG), or for the official validation set the flat "
            f"folder of ILSVRC2012_val_*.JPEG with --val-labels LOC_val_solution.csv (or "
            f"ILSVRC2012_validation_ground_truth.txt with the devkit's meta.mat beside it)")
    labels, classes = read_val_labels(label_file, files)
    class_to_idx = {c: i for i, c in enumerate(classes)}

    def flat_stream() -> Iterator[SourceFile]:
        for name in files:
            stem = os.path.splitext(name)[0]
            label = class_to_idx.get(labels.get(stem, ""), -1)
            yield SourceFile(os.path.join(root, name), sample_key(name), label)

    return flat_stream(), class_to_idx, len(files)


def encode_image(source: SourceFile, resize_shorter: int = 0) -> dict[str, bytes]:
    """`jpg` + `cls` fields for one image file; Skip for anything that does not fully decode."""
    if source.label < 0:
        raise Skip("no class label for this file in the label file")
    with open(source.path, "rb") as f:
        data = f.read()
    try:
        image = Image.open(io.BytesIO(data))
        fmt = image.format
        image.load()  # a full decode: truncated or corrupt files fail here, not in training
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise Skip(f"not a decodable image: {e}") from None
    shorter = min(image.size)
    if shorter < 1:
        raise Skip(f"empty image of size {image.size}")
    resize = 0 < resize_shorter < shorter
    if fmt != "JPEG" or resize:
        image = image.convert("RGB")
        if resize:
            scale = resize_shorter / shorter
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
    return {"jpg": data, "cls": str(source.label).encode()}


def shard_images(src: str | Path, out: str | Path, split: str = "train", shard_size: int = 1000,
                 workers: int = 0, resize_shorter: int = 0, val_labels: str | None = None,
                 prefix: str = "imagenet", progress: bool = True) -> dict:
    """Write `<out>/<prefix>-<split>-NNNNNN.tar` and the manifest `<prefix>-<split>.json`; returns the manifest."""
    sources, class_to_idx, count = list_images(src, split, val_labels)
    return write_shard_set(
        sources, functools.partial(encode_image, resize_shorter=resize_shorter), out, f"{prefix}-{split}",
        shard_size=shard_size, workers=workers, total_hint=count, progress=progress,
        settings={"resize_shorter": resize_shorter},
        manifest_extra={"modality": "image", "split": split, "source": os.path.abspath(image_root(src, split)),
                        "class_to_idx": class_to_idx})
