"""Registering apq's TVM tensor intrinsics: once per process, by name.

Why one helper: ``TensorIntrin.register`` refuses a name registered before, and every kernel
module (VNNI, sdot, movemask packing) registers lazily from its schedule rule, so each needs the
same "register unless present" step; the (desc, impl) PrimFuncs are built only when registering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def register_once(name: str, make: Callable[[], tuple[Any, Any]]) -> str:
    """Register ``make()``'s (desc, impl) pair as ``name`` unless it is registered; returns ``name``."""
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *make())
    return name
