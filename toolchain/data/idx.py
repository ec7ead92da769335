"""Reader for the IDX format of MNIST and Fashion-MNIST (raw or gzip-compressed).

IDX is tiny and fully specified (LeCun et al.): a big-endian header ``0x00 0x00 <dtype>
<ndim>``, ``ndim`` uint32 sizes, then the row-major payload. We parse it ourselves with NumPy
(torchvision does not import beside this torch) and check every field, because a truncated
download or a swapped file name otherwise turns into silently wrong training data.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from apq.toolchain.data.base import RawSplits
from apq.toolchain.errors import DatasetError

# IDX dtype codes (third header byte) -> NumPy dtype of the payload (big-endian).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

EXPECTED_IDX_LAYOUT = (
    "expected IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each raw or .gz)"
)


def _read_bytes(path: Path) -> bytes:
    """Whole file, gunzipped when it starts with the gzip magic (the extension may lie)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file into an array of its declared shape and dtype.

    Raises :class:`DatasetError` (naming ``path``) on a bad magic number, an unknown dtype
    code, or a payload whose length does not match the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path} is not an IDX file: only {len(data)} bytes")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        magic = int.from_bytes(data[:4], "big")
        raise DatasetError(
            f"{path} has bad IDX magic 0x{magic:08x}; expected 0x000008NN "
            f"(0x00000801 labels, 0x00000803 images)"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path} is truncated inside its IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        raise DatasetError(
            f"{path} payload is {got} bytes but its IDX header {dims} needs {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def find_idx_file(root: Path, prefix: str, kind: str) -> Path:
    """Locate ``<prefix>-<kind>`` in ``root``, accepting the spellings found in the wild.

    ``kind`` is e.g. ``images-idx3-ubyte``; mirrors ship ``train-images-idx3-ubyte``,
    ``train-images.idx3-ubyte`` (a dot instead of the second dash), with or without ``.gz``.
    """
    stem_dash = f"{prefix}-{kind}"
    stem_dot = f"{prefix}-{kind.replace('-', '.', 1)}"
    for stem in (stem_dash, stem_dot):
        for name in (stem, stem + ".gz"):
            candidate = root / name
            if candidate.is_file():
                return candidate
    raise DatasetError(f"no {stem_dash}[.gz] in {root}; {EXPECTED_IDX_LAYOUT}")


def _load_split(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    img_path = find_idx_file(root, prefix, "images-idx3-ubyte")
    lbl_path = find_idx_file(root, prefix, "labels-idx1-ubyte")
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{img_path} holds a {images.ndim}-d {images.dtype} array; expected 3-d uint8 (N,H,W)"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(
            f"{lbl_path} holds a {labels.ndim}-d {labels.dtype} array; expected 1-d uint8 (N,)"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DatasetError(f"{img_path} holds no images")
    return images[..., None], labels.astype(np.int64)


def load_idx_dir(root: Path) -> RawSplits:
    """Load the train (``train-*``) and test (``t10k-*``) splits of an IDX directory.

    Images come back as (N, H, W, 1) uint8, labels as int64. Class names are left to the
    registry entry (IDX files carry none).
    """
    if not root.is_dir():
        raise DatasetError(f"IDX dataset directory {root} does not exist; {EXPECTED_IDX_LAYOUT}")
    train_x, train_y = _load_split(root, "train")
    test_x, test_y = _load_split(root, "t10k")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetError(
            f"{root}: train images are {train_x.shape[1:3]} but test images are {test_x.shape[1:3]}"
        )
    return RawSplits(train_x, train_y, test_x, test_y, class_names=None)
