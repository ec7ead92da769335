"""Kernel registry: name -> how to build a scheduled PrimFunc, which precisions, which archs.

Lowering and the benchmark look kernels up here instead of branching on op/precision, so a new
kernel (a tuned VNNI int8 conv, an ARM sdot variant) is one :func:`register_kernel` call; give it
a ``priority`` above 0 and ``bench/kernels.py`` compares the bit-serial kernels against it.
Bit-widths mean: ``a_bits``/``w_bits`` the kernel accepts; 32 = float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from apq.toolchain.errors import InvalidInputError, UnsupportedModelError

ALL_ARCHS = ("x86_64", "aarch64")
LOW_BITS = tuple(range(1, 9))


@dataclass(frozen=True)
class KernelSpec:
    """One registered kernel.

    ``builder(x_shape, w_shape, **params) -> PrimFunc`` returns a scheduled PrimFunc taking
    ``(x, w) -> out``; ``w_shape`` is the packed shape for bit-serial kernels.
    """

    name: str
    op: str  # "conv2d" | "depthwise_conv2d" | "dense"
    builder: Callable[..., Any]
    a_bits: tuple[int, ...]
    w_bits: tuple[int, ...]
    archs: tuple[str, ...] = ALL_ARCHS
    layout: str = "NHWC"
    description: str = ""
    tags: tuple[str, ...] = field(default=())
    priority: int = 0  # among kernels supporting the same precision, the highest wins (a tuned one)

    def supports(self, op: str, a_bits: int, w_bits: int, arch: str) -> bool:
        return op == self.op and a_bits in self.a_bits and w_bits in self.w_bits and arch in self.archs

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "a_bits": list(self.a_bits), "w_bits": list(self.w_bits),
                "archs": list(self.archs), "layout": self.layout, "description": self.description,
                "tags": list(self.tags), "priority": self.priority}


_KERNELS: dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    if spec.name in _KERNELS:
        raise ValueError(f"kernel {spec.name!r} registered twice")
    _KERNELS[spec.name] = spec
    return spec


def kernel_names() -> list[str]:
    return sorted(_KERNELS)


def get_kernel(name: str) -> KernelSpec:
    try:
        return _KERNELS[name]
    except KeyError:
        raise InvalidInputError(f"unknown kernel {name!r}; valid kernels: {', '.join(kernel_names())}") from None


def find_kernel(op: str, a_bits: int, w_bits: int, arch: str) -> KernelSpec:
    """The kernel for ``op`` at this precision on ``arch``: highest ``priority`` first, then the
    narrowest (most specialised) precision range, then the name (deterministic)."""
    cands = [k for k in _KERNELS.values() if k.supports(op, a_bits, w_bits, arch)]
    if not cands:
        raise UnsupportedModelError(f"no kernel for {op} with a{a_bits}/w{w_bits} on {arch}")
    return min(cands, key=lambda k: (-k.priority, len(k.a_bits) * len(k.w_bits), k.name))


# ----------------------------------------------------------------------------- entries


def _bs_conv(x_shape, w_shape, *, cfg, target=None, sched=None, scheduled=True, **_):
    from apq.kernels import bitserial

    return bitserial.conv2d_primfunc(x_shape, w_shape, cfg, target, sched, scheduled=scheduled)


def _bs_dw(x_shape, w_shape, *, cfg, kernel_size, target=None, sched=None, dw_pack="rows", **_):
    from apq.kernels import bitserial

    return bitserial.depthwise_primfunc(x_shape, kernel_size, cfg, target, sched, pack=dw_pack)


def _bs_dense(x_shape, w_shape, *, cfg, target=None, sched=None, **_):
    from apq.kernels import bitserial

    return bitserial.dense_primfunc(x_shape, w_shape, cfg, target, sched)


def _direct(dtype: str, depthwise: bool) -> Callable[..., Any]:
    def build(x_shape, w_shape, *, stride=1, padding=0, target=None, sched=None, **_):
        from apq.kernels import bitserial

        return bitserial.direct_conv2d_primfunc(x_shape, w_shape, stride, padding, dtype, target, sched,
                                                depthwise=depthwise)

    return build


register_kernel(KernelSpec("bitserial_conv2d_nhwc", "conv2d", _bs_conv, LOW_BITS, LOW_BITS,
                           description="bit-serial popcount conv, channel-packed, vectorised over O",
                           tags=("bit-serial",)))
register_kernel(KernelSpec("bitserial_depthwise_conv2d_nhwc", "depthwise_conv2d", _bs_dw, LOW_BITS, LOW_BITS,
                           description="bit-serial popcount depthwise conv, window-packed (K*K <= 64)",
                           tags=("bit-serial",)))
register_kernel(KernelSpec("bitserial_dense", "dense", _bs_dense, LOW_BITS, LOW_BITS, layout="MK",
                           description="bit-serial popcount dense", tags=("bit-serial",)))
register_kernel(KernelSpec("direct_conv2d_nhwc_int8", "conv2d", _direct("int8", False), (8,), (8,),
                           description="uint8 x int8 -> int32 direct conv, simple schedule (not VNNI-tuned)",
                           tags=("baseline",)))
register_kernel(KernelSpec("direct_depthwise_conv2d_nhwc_int8", "depthwise_conv2d", _direct("int8", True), (8,),
                           (8,), description="uint8 x int8 -> int32 direct depthwise conv, simple schedule",
                           tags=("baseline",)))
register_kernel(KernelSpec("direct_conv2d_nhwc_float32", "conv2d", _direct("float32", False), (32,), (32,),
                           description="float32 direct conv, simple schedule", tags=("baseline",)))
register_kernel(KernelSpec("direct_depthwise_conv2d_nhwc_float32", "depthwise_conv2d", _direct("float32", True),
                           (32,), (32,), description="float32 direct depthwise conv, simple schedule",
                           tags=("baseline",)))
