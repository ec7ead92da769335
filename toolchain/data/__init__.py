"""Datasets for the supernet, read from local files only (no downloads at run time).

``load_dataset("fashion-mnist")`` (or ``mnist:PATH``, ``idx:PATH``, ``cifar10:PATH``,
``imagefolder:PATH``) reads a whole dataset into (N, H, W, C) uint8 arrays;
``make_loaders(ds, batch_size)`` gives seeded train / validation / test DataLoaders of
normalised float batches.
"""

from apq.toolchain.data.base import AugmentConfig, LoadedDataset, RawSplits, channel_stats
from apq.toolchain.data.loaders import ArrayDataset, Loaders, make_loaders
from apq.toolchain.data.registry import (
    DatasetKind,
    dataset_kinds,
    get_dataset_kind,
    load_dataset,
    parse_dataset_spec,
    register_dataset_kind,
)
from apq.toolchain.data.spec import DatasetSpec
from apq.toolchain.data.split import split_train_val

__all__ = [
    "ArrayDataset",
    "AugmentConfig",
    "DatasetKind",
    "DatasetSpec",
    "LoadedDataset",
    "Loaders",
    "RawSplits",
    "channel_stats",
    "dataset_kinds",
    "get_dataset_kind",
    "load_dataset",
    "make_loaders",
    "parse_dataset_spec",
    "register_dataset_kind",
    "split_train_val",
]
