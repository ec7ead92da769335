"""The dataset spec: which dataset, from where, as one small JSON-round-tripping config.

A spec string is what a user types (``--data cifar10:/data/cifar-10-batches-py``); the
dataclass is what gets saved beside checkpoints and artifacts, so a run can be reproduced
from its manifest. Parsing here is syntax only; :mod:`apq.toolchain.data.registry` checks
that the kind exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from apq.toolchain.errors import DatasetError

SPEC_VERSION = 1


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset kind plus an optional location.

    ``path=None`` means the kind's default location (only ``fashion-mnist`` has one on this
    machine). ``image_size`` resizes ImageFolder images to a square side; other kinds ignore
    it because their files fix the size.
    """

    kind: str
    path: str | None = None
    image_size: int | None = None
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise DatasetError(f"dataset image_size must be a positive side length, got {self.image_size}")

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        """``KIND`` or ``KIND:PATH`` (only the first colon splits, so paths may hold colons)."""
        text = text.strip()
        if not text:
            raise DatasetError("empty dataset spec; expected KIND or KIND:PATH, e.g. fashion-mnist")
        kind, sep, path = text.partition(":")
        kind = kind.strip().lower()
        if not kind:
            raise DatasetError(f"dataset spec {text!r} has no kind; expected KIND or KIND:PATH")
        if sep and not path.strip():
            raise DatasetError(f"dataset spec {text!r} has an empty path after ':'")
        return cls(kind=kind, path=path.strip() if sep else None)

    def to_string(self) -> str:
        """The inverse of :meth:`parse` (``image_size`` is not part of the string form)."""
        return self.kind if self.path is None else f"{self.kind}:{self.path}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetSpec":
        version = int(d.get("version", SPEC_VERSION))
        if version != SPEC_VERSION:
            raise DatasetError(f"dataset spec version {version} is not supported (expected {SPEC_VERSION})")
        unknown = set(d) - {"kind", "path", "image_size", "version"}
        if unknown:
            raise DatasetError(f"dataset spec has unknown fields {sorted(unknown)}")
        size = d.get("image_size")
        return cls(
            kind=str(d["kind"]).lower(),
            path=None if d.get("path") is None else str(d["path"]),
            image_size=None if size is None else int(size),
            version=version,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetSpec":
        return cls.from_dict(json.loads(text))
