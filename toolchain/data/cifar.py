"""Reader for the CIFAR-10 "python version" batch directory.

The official distribution (``cifar-10-batches-py``) is a set of pickled dicts: ``b'data'``
(N x 3072 uint8, channel-planar R, G, B rows of 32x32), ``b'labels'`` and, in
``batches.meta``, ``b'label_names'``. Pickle can run arbitrary code, so we unpickle with an
allow-list that admits only what those files contain (NumPy array reconstruction); anything
else is refused as a malformed dataset instead of being executed.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from apq.toolchain.data.base import RawSplits
from apq.toolchain.errors import DatasetError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
EXPECTED_CIFAR_LAYOUT = (
    "expected the CIFAR-10 python batches data_batch_1..data_batch_5, test_batch, batches.meta"
)
_SIDE = 32
_ROW = 3 * _SIDE * _SIDE

# (module, name) pairs the official pickles reference; numpy 1.x and 2.x spell the module differently.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2; pure str -> bytes, harmless
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only NumPy array globals (see module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module == "numpy.core.multiarray":  # numpy 2 keeps a deprecated alias; avoid its warning
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _unpickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise DatasetError(f"no {path.name} in {path.parent}; {EXPECTED_CIFAR_LAYOUT}")
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise DatasetError(f"cannot read CIFAR batch {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} holds a {type(obj).__name__}, expected a CIFAR batch dict")
    return obj


def _get(d: dict[bytes, Any], key: str, path: Path) -> Any:
    """Batches pickled under Python 3 may use str keys; the official ones use bytes."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetError(f"{path} has no {key!r} entry; {EXPECTED_CIFAR_LAYOUT}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (N, 32, 32, 3) uint8 images and (N,) int64 labels."""
    d = _unpickle(path)
    data = np.asarray(_get(d, "data", path))
    labels = np.asarray(_get(d, "labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise DatasetError(f"{path}: 'data' is {data.dtype} {data.shape}; expected uint8 (N, {_ROW})")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path} has {data.shape[0]} images but {labels.size} labels")
    images = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _read_meta(root: Path) -> tuple[str, ...]:
    path = root / META_FILE
    names = _get(_unpickle(path), "label_names", path)
    try:
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    except (TypeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: label_names is not a list of strings") from exc


def load_cifar10_dir(root: Path) -> RawSplits:
    """Load all five training batches and the test batch of a CIFAR-10 python directory."""
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 directory {root} does not exist; {EXPECTED_CIFAR_LAYOUT}")
    class_names = _read_meta(root)
    parts = [read_cifar_batch(root / name) for name in TRAIN_BATCHES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = read_cifar_batch(root / TEST_BATCH)
    return RawSplits(train_x, train_y, test_x, test_y, class_names=class_names)
