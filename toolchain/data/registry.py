"""Registry of dataset kinds and the one entry point :func:`load_dataset`.

A kind is one :class:`DatasetKind` entry (reader, default location, class names, whether
mirroring preserves the label); adding a dataset is one ``register_dataset_kind`` call, not
another branch in the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from apq.toolchain.data.base import AugmentConfig, LoadedDataset, RawSplits
from apq.toolchain.data.cifar import EXPECTED_CIFAR_LAYOUT, load_cifar10_dir
from apq.toolchain.data.idx import EXPECTED_IDX_LAYOUT, load_idx_dir
from apq.toolchain.data.imagefolder import EXPECTED_IMAGEFOLDER_LAYOUT, load_image_folder
from apq.toolchain.data.spec import DatasetSpec
from apq.toolchain.errors import DatasetError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))

Reader = Callable[[Path, DatasetSpec], RawSplits]


@dataclass(frozen=True)
class DatasetKind:
    """How to read one kind of dataset.

    ``class_names=None`` means the files name the classes (CIFAR meta, ImageFolder folders)
    or, for bare IDX, that they are the label values ``0..max``.
    """

    name: str
    reader: Reader
    layout: str
    default_path: str | None = None
    class_names: tuple[str, ...] | None = None
    hflip: bool = True
    description: str = ""


_KINDS: dict[str, DatasetKind] = {}


def register_dataset_kind(kind: DatasetKind) -> DatasetKind:
    if kind.name in _KINDS:
        raise ValueError(f"dataset kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def dataset_kinds() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def get_dataset_kind(name: str) -> DatasetKind:
    try:
        return _KINDS[name.lower()]
    except KeyError:
        raise DatasetError(
            f"unknown dataset kind {name!r}; known: {', '.join(dataset_kinds())} "
            f"(spec is KIND or KIND:PATH)"
        ) from None


def parse_dataset_spec(text: str | DatasetSpec) -> DatasetSpec:
    """Parse ``KIND[:PATH]`` and check that the kind exists and has a location."""
    spec = text if isinstance(text, DatasetSpec) else DatasetSpec.parse(text)
    kind = get_dataset_kind(spec.kind)
    if spec.path is None and kind.default_path is None:
        raise DatasetError(f"dataset kind {kind.name!r} needs a path: {kind.name}:PATH; {kind.layout}")
    return spec


def _read_idx(root: Path, spec: DatasetSpec) -> RawSplits:
    return load_idx_dir(root)


def _read_cifar10(root: Path, spec: DatasetSpec) -> RawSplits:
    return load_cifar10_dir(root)


def _read_imagefolder(root: Path, spec: DatasetSpec) -> RawSplits:
    return load_image_folder(root, image_size=spec.image_size)


register_dataset_kind(DatasetKind(
    "fashion-mnist", _read_idx, EXPECTED_IDX_LAYOUT, default_path=FASHION_MNIST_DIR,
    class_names=FASHION_MNIST_CLASSES, hflip=True,
    description="Fashion-MNIST, 28x28 gray, 10 classes (IDX files)"))
register_dataset_kind(DatasetKind(
    "mnist", _read_idx, EXPECTED_IDX_LAYOUT, class_names=DIGIT_CLASSES, hflip=False,
    description="MNIST digits, 28x28 gray, 10 classes (IDX files)"))
register_dataset_kind(DatasetKind(
    "idx", _read_idx, EXPECTED_IDX_LAYOUT, hflip=False,
    description="any IDX dataset laid out like MNIST; classes are the label values"))
register_dataset_kind(DatasetKind(
    "cifar10", _read_cifar10, EXPECTED_CIFAR_LAYOUT, hflip=True,
    description="CIFAR-10 python batches, 32x32 RGB, 10 classes"))
register_dataset_kind(DatasetKind(
    "imagefolder", _read_imagefolder, EXPECTED_IMAGEFOLDER_LAYOUT, hflip=True,
    description="root/train/<class>/*.png|jpg|jpeg + root/test or root/val"))


def _crop_pad(height: int, width: int) -> int:
    """Random-crop padding: 4 px is the CIFAR-32 standard; 2 px keeps 28 px digits/clothes whole."""
    return 4 if min(height, width) >= 32 else 2


def load_dataset(spec: str | DatasetSpec) -> LoadedDataset:
    """Read a whole dataset into memory (see :mod:`apq.toolchain.data.base` for the layout)."""
    spec = parse_dataset_spec(spec)
    kind = get_dataset_kind(spec.kind)
    root = Path(spec.path if spec.path is not None else kind.default_path).expanduser()
    if not root.exists():
        hint = " (apt-get install dataset-fashion-mnist)" if spec.path is None else ""
        raise DatasetError(f"dataset path {root} does not exist{hint}; {kind.layout}")
    raw = kind.reader(root, spec)
    class_names = kind.class_names or raw.class_names
    if class_names is None:
        top = int(max(raw.train_labels.max(), raw.test_labels.max()))
        class_names = tuple(str(i) for i in range(top + 1))
    h, w = raw.train_images.shape[1:3]
    return LoadedDataset(
        spec=spec,
        root=root,
        train_images=raw.train_images,
        train_labels=raw.train_labels,
        test_images=raw.test_images,
        test_labels=raw.test_labels,
        class_names=tuple(class_names),
        augment=AugmentConfig(pad=_crop_pad(h, w), hflip=kind.hflip),
    )
