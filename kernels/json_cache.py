"""A per-target JSON cache file of measured choices, shared by knob tuning and the kernel choice.

Why one implementation: both keep ``{"version": V, ..., "entries": {key: record}}`` per target
under apq's cache folder, written by concurrent compiles; the lock, the merge and the atomic write
(temp file + rename) must be the same in both, and a file of another version or from other
kernels (``stamp``) must be ignored, never half-trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``<file>.lock``: concurrent compiles merge, never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_entries(path: Path, version: int, stamp: dict[str, Any] | None = None) -> dict[str, Any]:
    """The file's entries as stored; {} when it is missing, unreadable, of another ``version``, or
    when any ``stamp`` field differs from the file's."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != version or any(data.get(k) != v for k, v in (stamp or {}).items()):
        return {}
    return dict(data.get("entries", {}))


def write_entries(path: Path, new: dict[str, Any], version: int, target: Any | None = None,
                  stamp: dict[str, Any] | None = None) -> None:
    """Merge ``new`` (JSON-ready entries) into the file under its lock, written atomically."""
    path = Path(path)
    with locked(path):
        entries = read_entries(path, version, stamp)
        entries.update(new)
        doc: dict[str, Any] = {"version": version, **(stamp or {}), "entries": dict(sorted(entries.items()))}
        if target is not None:
            doc["target"] = str(target)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
