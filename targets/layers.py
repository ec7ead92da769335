"""A target-neutral description of one quantized layer, for analytic cost models and LUTs.

Why a separate dataclass: the simulated targets (BitFusion), latency lookup tables and the
search's cost features all need the same handful of numbers per layer (shape, stride,
groups, bit-widths) without importing torch, ONNX or TVM. Keeping them in one small,
JSON-round-trippable record means a lookup table can always be regenerated from the layer
list stored beside it.

Padding convention: "same"-style padding ``kernel // 2`` on each side (what MobileNetV2 /
once-for-all use), so ``out_h = (in_h + 2 * (kernel // 2) - kernel) // stride + 1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from apq.toolchain.errors import InvalidInputError

def check_json_fields(cls: type, data: Any, what: str) -> None:
    """Refuse a JSON value that is not an object or names fields the dataclass ``cls`` lacks
    (a typo in a config file must be an error, not a silently ignored key)."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"a {what} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise InvalidInputError(f"unknown {what} field(s): {', '.join(unknown)}")


LAYER_OPS: tuple[str, ...] = ("conv", "dwconv", "dense")
MIN_BITS, MAX_BITS = 1, 16


@dataclass(frozen=True)
class LayerShape:
    """One conv / depthwise conv / dense layer with its weight and activation bit-widths.

    ``a_bits`` is the precision of the layer's *input* activations; ``out_bits`` is the
    precision its output is written back at (None: the same as ``a_bits``, i.e. the
    output is requantized for a next layer of the same precision). Dense layers use
    ``in_h = in_w = kernel = stride = groups = 1``.
    """

    op: str
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    in_h: int
    in_w: int
    groups: int
    w_bits: int
    a_bits: int
    batch: int = 1
    out_bits: int | None = None

    def __post_init__(self) -> None:
        if self.op not in LAYER_OPS:
            raise InvalidInputError(f"unknown layer op {self.op!r}; expected one of {', '.join(LAYER_OPS)}")
        for name in ("in_ch", "out_ch", "kernel", "stride", "in_h", "in_w", "groups", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"layer field {name} must be a positive integer, got {value!r}")
        for name in ("w_bits", "a_bits", "out_bits"):
            value = getattr(self, name)
            if value is None and name == "out_bits":
                continue
            if not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
                raise InvalidInputError(f"layer field {name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {value!r}")
        if self.in_ch % self.groups or self.out_ch % self.groups:
            raise InvalidInputError(
                f"in_ch={self.in_ch} and out_ch={self.out_ch} must both be divisible by groups={self.groups}")
        if self.op == "dwconv" and self.groups != self.in_ch:
            raise InvalidInputError(f"dwconv needs groups == in_ch, got groups={self.groups}, in_ch={self.in_ch}")
        if self.op == "dense" and (self.in_h, self.in_w, self.kernel, self.stride, self.groups) != (1, 1, 1, 1, 1):
            raise InvalidInputError("dense layers need in_h = in_w = kernel = stride = groups = 1")

    # ------------------------------------------------------------------ derived sizes
    @property
    def out_h(self) -> int:
        return (self.in_h + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1

    @property
    def out_w(self) -> int:
        return (self.in_w + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1

    @property
    def ic_per_group(self) -> int:
        return self.in_ch // self.groups

    @property
    def oc_per_group(self) -> int:
        return self.out_ch // self.groups

    @property
    def output_bits(self) -> int:
        return self.a_bits if self.out_bits is None else self.out_bits

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the layer (all batch elements)."""
        return (self.batch * self.out_h * self.out_w * self.out_ch
                * self.ic_per_group * self.kernel * self.kernel)

    @property
    def num_weights(self) -> int:
        return self.out_ch * self.ic_per_group * self.kernel * self.kernel

    @property
    def num_inputs(self) -> int:
        return self.batch * self.in_ch * self.in_h * self.in_w

    @property
    def num_outputs(self) -> int:
        return self.batch * self.out_ch * self.out_h * self.out_w

    def with_bits(self, w_bits: int, a_bits: int, out_bits: int | None = None) -> "LayerShape":
        return dataclasses.replace(self, w_bits=w_bits, a_bits=a_bits, out_bits=out_bits)

    def key(self) -> str:
        """A stable, human-readable LUT key in once-for-all/APQ style (shape, then bits)."""
        return (f"{self.op}-input:{self.in_h}x{self.in_w}x{self.in_ch}"
                f"-output:{self.out_h}x{self.out_w}x{self.out_ch}"
                f"-kernel:{self.kernel}-stride:{self.stride}-groups:{self.groups}-batch:{self.batch}"
                f"-w{self.w_bits}a{self.a_bits}o{self.output_bits}")

    def shape_key(self) -> str:
        """The key without bit-widths: one LUT row per shape, one column per bit pair."""
        return self.key().rsplit("-w", 1)[0]

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerShape":
        check_json_fields(cls, data, "layer")
        try:
            return cls(**data)
        except TypeError as exc:  # missing required fields
            raise InvalidInputError(f"bad layer description: {exc}") from None


def layers_to_json(layers: Iterable[LayerShape]) -> list[dict[str, Any]]:
    return [layer.to_json() for layer in layers]


def layers_from_json(data: Iterable[dict[str, Any]]) -> list[LayerShape]:
    return [LayerShape.from_json(d) for d in data]


# (expand ratio t, output channels c, repeats n, first stride s) of MobileNetV2 (Sandler et al. 2018).
_MBV2_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def mobilenet_v2_layers(resolution: int = 224, width_mult: float = 1.0, w_bits: int = 8, a_bits: int = 8,
                        num_classes: int = 1000, batch: int = 1) -> list[LayerShape]:
    """The conv/dwconv/dense layers of MobileNetV2, all at one bit-width pair.

    APQ's search space is MobileNetV2-style, so this is the reference layer list for
    calibrating and sanity-checking cost models (and for LUT regeneration examples).
    """
    layers: list[LayerShape] = []
    size = resolution
    ch = _make_divisible(32 * width_mult)

    def add(op: str, cin: int, cout: int, k: int, s: int, groups: int = 1) -> None:
        nonlocal size
        layer = LayerShape(op, cin, cout, k, s, size, size, groups, w_bits, a_bits, batch)
        layers.append(layer)
        size = layer.out_h

    add("conv", 3, ch, 3, 2)
    for t, c, n, s in _MBV2_BLOCKS:
        cout = _make_divisible(c * width_mult)
        for i in range(n):
            hidden = ch * t
            if t != 1:
                add("conv", ch, hidden, 1, 1)
            add("dwconv", hidden, hidden, 3, s if i == 0 else 1, groups=hidden)
            add("conv", hidden, cout, 1, 1)
            ch = cout
    last = _make_divisible(1280 * max(1.0, width_mult))
    add("conv", ch, last, 1, 1)
    layers.append(LayerShape("dense", last, num_classes, 1, 1, 1, 1, 1, w_bits, a_bits, batch))
    return layers
