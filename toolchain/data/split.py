"""The fixed train/validation split carved out of a training set.

Architecture search ranks subnets by validation accuracy, so the split must be identical on
every run and machine (or accuracy samples collected on two hosts are not comparable), and
disjoint from the test set, which is only read for the final report. NumPy's
``Generator(PCG64)`` is specified bit-for-bit across platforms, unlike the legacy global RNG.
"""

from __future__ import annotations

import numpy as np

from apq.toolchain.errors import InvalidInputError


def split_train_val(n: int, val_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..n-1`` into (train, val), both sorted int64 and disjoint.

    ``val_size`` indices are drawn uniformly without replacement by a PCG64 stream seeded
    with ``seed``; the rest are training indices. Sorting keeps memory access sequential and
    makes the result independent of how the permutation happens to be ordered.
    """
    if n < 1:
        raise InvalidInputError(f"cannot split an empty training set (n={n})")
    if not 0 <= val_size < n:
        raise InvalidInputError(
            f"val_size={val_size} must be in [0, {n - 1}] for a training set of {n} samples"
        )
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    val = np.sort(perm[:val_size]).astype(np.int64)
    train = np.sort(perm[val_size:]).astype(np.int64)
    return train, val
