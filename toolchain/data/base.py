"""In-memory dataset containers shared by every loader.

Layout decision: images are kept as **(N, H, W, C) uint8** NumPy arrays. That is how PIL,
IDX and (after one transpose) CIFAR store pixels, it is 4x smaller than float, and a batch
turned into a tensor and permuted to (N, C, H, W) is already ``torch.channels_last`` in
memory, which is the layout the CPU convolution kernels (oneDNN, our TVM schedules) prefer.
Labels are int64 (what ``torch.nn.functional.cross_entropy`` wants).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from apq.toolchain.data.spec import DatasetSpec
from apq.toolchain.errors import DatasetError


class RawSplits(NamedTuple):
    """What a format reader returns: train and test arrays, class names if the files hold them."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] | None


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation: zero-padded random crop and optional horizontal flip.

    ``hflip`` is a property of the dataset, not a taste: mirrored clothes and CIFAR objects
    are still the same class, a mirrored digit is not a digit.
    """

    pad: int = 2
    hflip: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"pad": self.pad, "hflip": self.hflip}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AugmentConfig":
        return cls(pad=int(d["pad"]), hflip=bool(d["hflip"]))


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units.

    Computed from a 256-bin histogram per channel: exact, and it never materialises a float
    copy of the dataset (Fashion-MNIST would need 376 MB in float64).
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for c in range(images.shape[-1]):
        hist = np.bincount(np.ascontiguousarray(images[..., c]).ravel(), minlength=256)
        n = hist.sum()
        mean = float((hist * values).sum() / n)
        var = float((hist * (values - mean) ** 2).sum() / n)
        means.append(mean)
        stds.append(max(var, 1e-12) ** 0.5)
    return tuple(means), tuple(stds)


@dataclass
class LoadedDataset:
    """A whole dataset in memory, with what a trainer needs to normalise and augment it.

    ``mean``/``std`` are per channel in [0, 1] units, measured on the full training set (so
    they do not move with the validation split's seed or size). The test set is reserved for
    the final report; model selection uses :func:`apq.toolchain.data.split.split_train_val`.
    """

    spec: DatasetSpec
    root: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    augment: AugmentConfig
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        for name, x, y in (
            ("train", self.train_images, self.train_labels),
            ("test", self.test_images, self.test_labels),
        ):
            if x.ndim != 4 or x.dtype != np.uint8:
                raise DatasetError(
                    f"{self.root}: {name} images must be (N,H,W,C) uint8, got {x.shape} {x.dtype}"
                )
            if y.shape != (x.shape[0],):
                raise DatasetError(f"{self.root}: {len(y)} {name} labels for {x.shape[0]} images")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.class_names)):
                raise DatasetError(
                    f"{self.root}: {name} labels span [{int(y.min())}, {int(y.max())}] "
                    f"but there are {len(self.class_names)} classes"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DatasetError(
                f"{self.root}: train images are {self.train_images.shape[1:]} "
                f"but test images are {self.test_images.shape[1:]}"
            )
        if not self.mean or not self.std:
            self.mean, self.std = channel_stats(self.train_images)

    @property
    def name(self) -> str:
        return self.spec.kind

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one stored image."""
        h, w, c = self.train_images.shape[1:]
        return int(h), int(w), int(c)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input, as the loaders yield it."""
        h, w, c = self.image_shape
        return c, h, w

    @property
    def channels(self) -> int:
        return self.image_shape[2]

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])

    def summary(self) -> dict[str, Any]:
        """JSON-able description (no arrays), for manifests and logs."""
        return {
            "spec": self.spec.to_dict(),
            "root": str(self.root),
            "num_train": self.num_train,
            "num_test": self.num_test,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "augment": self.augment.to_dict(),
        }
