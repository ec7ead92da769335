"""Reader for an ImageFolder tree: ``root/train/<class>/*.png|jpg|jpeg`` plus ``root/test``
(or ``root/val``) with the same class folders.

Classes are the sorted folder names under ``train`` (the torchvision convention, so label
ids agree with models trained elsewhere). The whole tree is decoded once into one uint8
array: datasets this toolchain targets (small edge-model benchmarks) fit in memory, and
decoding JPEGs every epoch would dominate training time on two cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from apq.toolchain.data.base import RawSplits
from apq.toolchain.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
HELD_OUT_DIRS = ("test", "val")  # the first that exists is the reserved test split
EXPECTED_IMAGEFOLDER_LAYOUT = (
    "expected root/train/<class>/*.png|jpg|jpeg and root/test/<class>/... (or root/val/<class>/...)"
)
_GRAY_MODES = ("1", "L")
_PROGRESS_MIN_FILES = 2000


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _list_split(split_dir: Path, classes: list[str], require_all: bool) -> list[tuple[Path, int]]:
    """(file, label) pairs of one split; train must have every class non-empty."""
    index = {name: i for i, name in enumerate(classes)}
    items: list[tuple[Path, int]] = []
    for class_dir in _class_dirs(split_dir):
        if class_dir.name not in index:
            raise DatasetError(
                f"class folder {class_dir} is not among the train classes; {EXPECTED_IMAGEFOLDER_LAYOUT}"
            )
        files = _image_files(class_dir)
        if not files and require_all:
            raise DatasetError(f"class folder {class_dir} has no .png/.jpg/.jpeg images")
        items.extend((f, index[class_dir.name]) for f in files)
    if not items:
        raise DatasetError(f"{split_dir} holds no images; {EXPECTED_IMAGEFOLDER_LAYOUT}")
    return items


def _probe(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and (W, H) from the header only; PIL does not decode pixels here."""
    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def _decode(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != size:
                im = im.resize(size, Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from exc
    return arr[..., None] if arr.ndim == 2 else arr


def _decode_all(items: list[tuple[Path, int]], mode: str, size: tuple[int, int] | None,
                desc: str) -> tuple[np.ndarray, np.ndarray]:
    first = _decode(items[0][0], mode, size)
    images = np.empty((len(items), *first.shape), dtype=np.uint8)
    labels = np.fromiter((label for _, label in items), dtype=np.int64, count=len(items))
    images[0] = first
    for i, (path, _) in enumerate(tqdm(items[1:], desc=desc, unit="img", leave=False,
                                       disable=len(items) < _PROGRESS_MIN_FILES), start=1):
        arr = _decode(path, mode, size)
        if arr.shape != first.shape:  # only reachable without resizing
            raise DatasetError(
                f"image {path} is {arr.shape[1]}x{arr.shape[0]} but {items[0][0]} is "
                f"{first.shape[1]}x{first.shape[0]}; give the dataset an image_size to resize"
            )
        images[i] = arr
    return images, labels


def load_image_folder(root: Path, image_size: int | None = None) -> RawSplits:
    """Decode ``root/train`` and the held-out split into (N, H, W, C) uint8 arrays.

    Images are kept grayscale (C=1) when every file is 1-bit or 8-bit gray, else converted to
    RGB (C=3). Without ``image_size`` all images must share one size; with it each is resized
    (bilinear) to ``image_size`` x ``image_size``.
    """
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"no train folder in {root}; {EXPECTED_IMAGEFOLDER_LAYOUT}")
    held_out = next((root / d for d in HELD_OUT_DIRS if (root / d).is_dir()), None)
    if held_out is None:
        raise DatasetError(f"no test or val folder in {root}; {EXPECTED_IMAGEFOLDER_LAYOUT}")
    classes = [p.name for p in _class_dirs(train_dir)]
    if not classes:
        raise DatasetError(f"{train_dir} has no class folders; {EXPECTED_IMAGEFOLDER_LAYOUT}")
    train_items = _list_split(train_dir, classes, require_all=True)
    test_items = _list_split(held_out, classes, require_all=False)

    all_paths = [p for p, _ in train_items] + [p for p, _ in test_items]
    modes = {_probe(p)[0] for p in all_paths}
    mode = "L" if modes <= set(_GRAY_MODES) else "RGB"
    size = None if image_size is None else (image_size, image_size)
    train_x, train_y = _decode_all(train_items, mode, size, f"decode {train_dir}")
    test_x, test_y = _decode_all(test_items, mode, size, f"decode {held_out}")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetError(
            f"{held_out} images are {test_x.shape[2]}x{test_x.shape[1]} but {train_dir} images are "
            f"{train_x.shape[2]}x{train_x.shape[1]}; give the dataset an image_size to resize"
        )
    return RawSplits(train_x, train_y, test_x, test_y, class_names=tuple(classes))
