"""apq's cache folder, resolved one way for every cache.

Why one function: the knob-tuning and kernel-choice caches honoured ``$XDG_CACHE_HOME`` while the
MetaSchedule database, the AArch64 runtime and the C++ runner did not, so with ``XDG_CACHE_HOME``
set one compile wrote to two folders.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The argument, else ``$APQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/apq``, else ``~/.cache/apq``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env, xdg = os.environ.get("APQ_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME")
    if env:
        return Path(env)
    return Path(xdg) / "apq" if xdg else Path.home() / ".cache" / "apq"
