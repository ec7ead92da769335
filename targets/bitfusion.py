"""The ``bitfusion`` simulated target: an analytic latency/energy model of BitFusion.

BitFusion (Sharma et al., ISCA 2018) is a systolic array of *fusion units*; each fusion unit
holds 16 BitBricks (2-bit x 2-bit multipliers) that fuse into one 8x8-bit multiplier, four
4x4-bit ones or sixteen 2x2-bit ones. Narrow operands therefore buy throughput in power-of-two
steps: a fusion unit does ``floor(8/max(a,2)) * floor(8/max(w,2))`` MACs per cycle, so W6A6
runs exactly like W8A8 while W4A4 does 4x the MACs per cycle. APQ (Wang et al., CVPR 2020)
searched bit-widths against a BitFusion latency table but never released the code that built
it; :func:`lookup_table` regenerates such a table for any layer list, so apq's search can run
(and be tested) without hardware. Every figure here is labelled ``source="simulated"``.

The model, per layer (all choices documented where they are made):

* **Operand widths.** BitBricks compose in powers of two, so an operand of ``b`` bits occupies
  a *storage width* of the next power of two >= max(b, 2) (6 -> 8, 3 -> 4, 1 -> 2; 9..16 bits
  run as 16-bit words over 2 cycles per operand). The same width is used for DRAM/SRAM
  traffic: data is laid out in whole bricks, so a 6-bit tensor moves like an 8-bit one.
* **Compute.** The array has ``rows`` (N) reduction rows and ``cols`` (M) output columns. A
  dense or conv layer maps output channels onto columns and its reduction (kh*kw*ic per group,
  im2col order) onto ``N * lanes`` row slots, ``lanes = (8/a_s) * (8/w_s)``:
  ``cycles = batch*oh*ow*groups*ceil(oc_g/M)*ceil(kh*kw*ic_g/(N*lanes))``. This equals the
  direct formula ``kh*kw*ceil(ic_g/(N*lanes))`` whenever ``ic_g`` is a multiple of
  ``N*lanes`` and is never slower (BitFusion's own simulator uses im2col for the first layer,
  whose 3 input channels would otherwise leave 13 of 16 rows idle).
* **Depthwise.** A row broadcasts one input stream to every column, so output channel ``c``
  can only use rows that carry channel ``c``. We split the N rows into ``g`` groups of
  ``N//g`` rows, one channel per group and one column per channel (a block-diagonal weight
  layout), and pick the ``g <= min(N, M)`` with the fewest cycles:
  ``ceil(C/g) * ceil(kh*kw / ((N//g)*lanes))`` per output pixel. At 8 bits this is 16 channels
  at a time, one 3x3 tap per cycle: depthwise layers use ~1/32 of the array, which is the
  well-known weakness of systolic arrays on MobileNets, and lower bits help them by packing
  more taps per fusion unit.
* **Memory.** DRAM traffic comes from a two-order tiling model of double-buffered IBUF/WBUF/
  OBUF (half of each buffer holds the tile being computed): keep a weight chunk resident and
  re-stream the input once per chunk, or keep an input chunk resident and re-stream the
  weights; the cheaper order wins; outputs are written once at ``out_bits``. Halos of input
  tiles are ignored.
* **Latency.** Compute and DRAM transfers overlap through double buffering, except for the
  first load and last store: with ``n`` tiles, ``cycles = max(C, D) + min(C, D)/n`` (the
  pipeline formula ``n*max(c, d) + min(c, d)`` for ``n`` equal tiles). A layer that fits in
  one tile therefore costs ``C + D`` (no overlap), a large one tends to ``max(C, D)``. The
  tile count is the product of the weight and input chunk counts, and at least the number of
  OBUF-sized chunks of 32-bit partial sums. ``rows + cols`` pipeline fill/drain cycles are
  added per layer (BitFusion streams weights from per-fusion-unit WBUF banks every cycle, so
  there is no per-fold weight reload as in weight-stationary arrays).
* **Energy** (dynamic only, no leakage): ``MACs * e_mac(a, w)`` with ``e_mac`` = active
  BitBricks * ``e_brick_pj`` + one accumulate; on-chip buffer bytes (IBUF words and OBUF
  32-bit read-modify-writes per cycle, WBUF reads of every weight per output pixel, plus the
  DRAM fills/drains) * ``e_sram_pj_per_byte``; DRAM bytes * ``e_dram_pj_per_byte``.

Calibration (read this before quoting a number). APQ's anchors on MobileNetV2 are W4A4/W8A8
~ 0.48 and W6A6/W8A8 ~ 0.98 end to end. The array/buffer/energy constants are the authors'
simulator configuration for the paper's Eyeriss comparison (``bf_e_conf.ini`` in their
repository: 16x32 fusion units, 500 MHz, 32 KB IBUF / 64 KB WBUF / 16 KB OBUF, a 192-bit
memory interface) and Horowitz's 45 nm energies (ISSCC 2014); none of them is fitted. The pure-compute
W4A4 ratio on MobileNetV2 is 0.35, not 0.25, because reductions of 16..96 channels do not
fill the 64 4-bit row slots and depthwise layers use a fraction of the array. What moves the
end-to-end ratio towards 0.5 is DRAM (traffic halves with 4-bit tensors): with that
192-bit interface (12 GB/s, preset ``"paper-eyeriss"``) the network is compute-bound and the
ratio is 0.36; the default ``"edge"`` preset assumes a 4 GB/s edge-class DRAM (64 bits/cycle,
a 32-bit LPDDR/DDR3 part), which gives 0.42 with every layer quantized and 0.47 with the
first conv, last conv and classifier kept at 8 bits as APQ does. That DRAM width is the one
calibration choice in this model: it was picked among round bus widths (192/128/96/64/48/32
bits, which give 0.36/0.37/0.39/0.42/0.43/0.47) as the edge-class value that lands within
15% of APQ's anchor, not fitted to more digits. W6A6 == W8A8 exactly (power-of-two bricks);
APQ's 0.98 is within the same 15%.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

from apq.targets.layers import LayerShape, check_json_fields
from apq.toolchain.errors import InvalidInputError

MODEL_NAME = "bitfusion-analytic-v1"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class BitFusionConfig:
    """Parameters of the simulated BitFusion accelerator (defaults: ISCA 2018, Eyeriss-comparable).

    Field units are in the names. ``rows`` (N) x ``cols`` (M) fusion units; one fusion unit
    multiplies ``max_bits`` x ``max_bits`` per cycle from ``(max_bits/min_bits)**2`` BitBricks.
    """

    version: int = CONFIG_VERSION
    rows: int = 16  # N: reduction (input-channel) rows, each fed by one IBUF bank
    cols: int = 32  # M: output columns, each draining into one OBUF bank
    max_bits: int = 8  # widest operand a fusion unit multiplies in one cycle
    min_bits: int = 2  # BitBrick width: narrower operands are padded to it
    frequency_mhz: float = 500.0
    ibuf_kib: float = 32.0
    wbuf_kib: float = 64.0
    obuf_kib: float = 16.0
    double_buffered: bool = True  # half of each buffer computes while the other half loads
    accumulator_bits: int = 32  # partial sums kept in OBUF
    # DRAM bits per cycle: 64 @ 500 MHz = 4 GB/s, an edge-class DRAM (the calibration choice
    # explained in the module docstring); the paper's Eyeriss-comparison interface is 192.
    dram_bits_per_cycle: int = 64
    fill_drain: bool = True  # add rows + cols pipeline cycles per layer
    # Energies (Horowitz, ISSCC 2014, 45 nm): an 8x8-bit multiply is 0.2 pJ = 16 BitBricks.
    e_brick_pj: float = 0.2 / 16
    e_accumulate_pj: float = 0.1  # one 32-bit add per MAC
    e_sram_pj_per_byte: float = 10.0 / 8  # 8 KB SRAM, 64-bit read = 10 pJ (banks are <= 8 KB)
    e_dram_pj_per_byte: float = 1300.0 / 8  # DRAM, 64-bit access = 1.3 nJ (low end of 1.3-2.6)

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "max_bits", "min_bits", "accumulator_bits", "dram_bits_per_cycle"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"BitFusionConfig.{name} must be a positive integer, got {value!r}")
        for name in ("frequency_mhz", "ibuf_kib", "wbuf_kib", "obuf_kib"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"BitFusionConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_bits % self.min_bits or (self.max_bits // self.min_bits) & (self.max_bits // self.min_bits - 1):
            raise InvalidInputError("BitFusionConfig.max_bits / min_bits must be a power of two")
        if self.version != CONFIG_VERSION:
            raise InvalidInputError(f"BitFusionConfig version {self.version} is not supported (expected {CONFIG_VERSION})")

    # ------------------------------------------------------------------ derived hardware facts
    def storage_bits(self, bits: int) -> int:
        """Width an operand occupies: min_bits * 2**k >= bits (bricks fuse in powers of two)."""
        width = self.min_bits
        while width < bits:
            width *= 2
        return width

    def lanes(self, bits: int) -> Fraction:
        """Operands of this width per fusion-unit port per cycle (1/2 for 16-bit on an 8-bit unit)."""
        return Fraction(self.max_bits, self.storage_bits(bits))

    def macs_per_fu_cycle(self, a_bits: int, w_bits: int) -> Fraction:
        return self.lanes(a_bits) * self.lanes(w_bits)

    def e_mac_pj(self, a_bits: int, w_bits: int) -> float:
        """Energy of one MAC at this brick configuration: active BitBricks + one accumulate."""
        bricks = (self.storage_bits(a_bits) // self.min_bits) * (self.storage_bits(w_bits) // self.min_bits)
        return bricks * self.e_brick_pj + self.e_accumulate_pj

    def buffer_bytes(self, kib: float) -> float:
        """Usable tile size of a buffer (half of it when double-buffered)."""
        return kib * 1024 / (2 if self.double_buffered else 1)

    @property
    def dram_bytes_per_cycle(self) -> float:
        return self.dram_bits_per_cycle / 8

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BitFusionConfig":
        check_json_fields(cls, data, "BitFusion config")
        return cls(**data)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> "BitFusionConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"BitFusion config is not valid JSON: {exc}") from None
        return cls.from_json(data)


# Named configurations (a registry, like targets): "edge" is the default, see the docstring.
PRESETS: dict[str, BitFusionConfig] = {
    "edge": BitFusionConfig(),
    "paper-eyeriss": BitFusionConfig(dram_bits_per_cycle=192),
}


def preset(name: str) -> BitFusionConfig:
    """A named configuration; unknown names raise InvalidInputError listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInputError(f"unknown BitFusion preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None


@dataclass(frozen=True)
class LayerCost:
    """Simulated cost of one layer on BitFusion (cycle counts are at ``frequency_mhz``)."""

    latency_ms: float
    energy_uj: float
    compute_cycles: int
    memory_bytes: int  # DRAM traffic
    source: str = "simulated"
    model: str = MODEL_NAME
    memory_cycles: float = 0.0
    total_cycles: float = 0.0
    sram_bytes: int = 0
    macs: int = 0
    tiles: int = 1
    bound: str = "compute"  # which of compute / memory dominates

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NetworkCost:
    """Sum of per-layer costs (layers run one after another; no inter-layer overlap)."""

    latency_ms: float
    energy_uj: float
    layers: tuple[LayerCost, ...] = field(default_factory=tuple)
    source: str = "simulated"
    model: str = MODEL_NAME

    def to_json(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "energy_uj": self.energy_uj, "source": self.source,
                "model": self.model, "layers": [c.to_json() for c in self.layers]}


# --------------------------------------------------------------------------- compute model


def _ceil(x: Fraction | int) -> int:
    return math.ceil(x)


def compute_cycles(layer: LayerShape, config: BitFusionConfig) -> int:
    """Cycles the array is busy (no fill/drain, no stalls); see the module docstring."""
    lanes = config.macs_per_fu_cycle(layer.a_bits, layer.w_bits)
    n, m = config.rows, config.cols
    pixels = layer.batch * layer.out_h * layer.out_w
    taps = layer.kernel * layer.kernel
    if layer.op == "dwconv":
        per_pixel = min(
            _ceil(Fraction(layer.in_ch, g)) * _ceil(Fraction(taps) / ((n // g) * lanes))
            for g in range(1, min(n, m, layer.in_ch) + 1)
        )
        return pixels * per_pixel
    reduction = taps * layer.ic_per_group
    per_pixel = layer.groups * _ceil(Fraction(layer.oc_per_group, m)) * _ceil(Fraction(reduction) / (n * lanes))
    return pixels * per_pixel


# --------------------------------------------------------------------------- memory model


@dataclass(frozen=True)
class _Traffic:
    dram_bytes: int
    tiles: int


def _tensor_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def dram_traffic(layer: LayerShape, config: BitFusionConfig) -> _Traffic:
    """DRAM bytes under the cheaper of the two tiling orders, and the number of tiles."""
    w = _tensor_bytes(layer.num_weights, config.storage_bits(layer.w_bits))
    i = _tensor_bytes(layer.num_inputs, config.storage_bits(layer.a_bits))
    o = _tensor_bytes(layer.num_outputs, config.storage_bits(layer.output_bits))
    n_w = max(1, math.ceil(w / config.buffer_bytes(config.wbuf_kib)))
    n_i = max(1, math.ceil(i / config.buffer_bytes(config.ibuf_kib)))
    weights_resident = w + i * n_w + o  # weight chunk stays, input re-streamed per chunk
    inputs_resident = i + w * n_i + o  # input chunk stays, weights re-streamed per chunk
    psum_bytes = layer.num_outputs * config.accumulator_bits / 8
    n_o = max(1, math.ceil(psum_bytes / config.buffer_bytes(config.obuf_kib)))
    return _Traffic(min(weights_resident, inputs_resident), max(n_w * n_i, n_o))


def sram_bytes(layer: LayerShape, config: BitFusionConfig, busy_cycles: int, dram_bytes: int) -> int:
    """On-chip buffer traffic: per busy cycle every row reads one IBUF word (one activation per
    lane of a fusion unit) and every column read-modify-writes one partial sum; every MAC reads
    its weight from the fusion unit's WBUF bank; every DRAM byte enters or leaves a buffer once."""
    ibuf_word = float(config.macs_per_fu_cycle(layer.a_bits, layer.w_bits)) * config.storage_bits(layer.a_bits) / 8
    obuf_rmw = 2 * config.accumulator_bits / 8
    wbuf = layer.macs * config.storage_bits(layer.w_bits) / 8
    per_cycle = config.rows * ibuf_word + config.cols * obuf_rmw
    return math.ceil(busy_cycles * per_cycle + wbuf + dram_bytes)


# --------------------------------------------------------------------------- public API


def simulate_layer(layer: LayerShape, config: BitFusionConfig | None = None) -> LayerCost:
    """Latency and energy of one layer on the simulated BitFusion accelerator."""
    config = config or BitFusionConfig()
    busy = compute_cycles(layer, config)
    array_cycles = busy + (config.rows + config.cols if config.fill_drain else 0)
    traffic = dram_traffic(layer, config)
    mem_cycles = traffic.dram_bytes / config.dram_bytes_per_cycle
    total = max(array_cycles, mem_cycles) + min(array_cycles, mem_cycles) / traffic.tiles
    on_chip = sram_bytes(layer, config, busy, traffic.dram_bytes)
    energy_pj = (layer.macs * config.e_mac_pj(layer.a_bits, layer.w_bits)
                 + on_chip * config.e_sram_pj_per_byte
                 + traffic.dram_bytes * config.e_dram_pj_per_byte)
    return LayerCost(
        latency_ms=total / (config.frequency_mhz * 1e3),
        energy_uj=energy_pj * 1e-6,
        compute_cycles=busy,
        memory_bytes=traffic.dram_bytes,
        memory_cycles=mem_cycles,
        total_cycles=total,
        sram_bytes=on_chip,
        macs=layer.macs,
        tiles=traffic.tiles,
        bound="compute" if array_cycles >= mem_cycles else "memory",
    )


def simulate_network(layers: Iterable[LayerShape], config: BitFusionConfig | None = None) -> NetworkCost:
    """Registry-friendly entry point: the summed simulated cost of a layer list."""
    config = config or BitFusionConfig()
    costs = tuple(simulate_layer(layer, config) for layer in layers)
    return NetworkCost(latency_ms=sum(c.latency_ms for c in costs), energy_uj=sum(c.energy_uj for c in costs),
                       layers=costs)


BitPair = tuple[int, int]  # (w_bits, a_bits)


def normalize_bit_choices(bit_choices: Iterable[int] | Iterable[Sequence[int]]) -> list[BitPair]:
    """``[4, 6, 8]`` -> every (w, a) pair; ``[(4, 8), (8, 8)]`` -> those pairs, as given."""
    choices = list(bit_choices)
    if not choices:
        raise InvalidInputError("bit_choices is empty")
    if all(isinstance(b, int) for b in choices):
        bits = sorted(set(choices))  # type: ignore[arg-type]
        return [(w, a) for w in bits for a in bits]
    pairs: list[BitPair] = []
    for pair in choices:
        if isinstance(pair, int) or len(pair) != 2 or not all(isinstance(b, int) for b in pair):
            raise InvalidInputError(f"bit choice {pair!r} is neither an int nor a (w_bits, a_bits) pair")
        pairs.append((int(pair[0]), int(pair[1])))
    return pairs


def lookup_table(layers: Sequence[LayerShape], bit_choices: Iterable[int] | Iterable[Sequence[int]] = (4, 6, 8),
                 config: BitFusionConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """An APQ-style latency/energy lookup table for every (distinct layer shape, bit pair).

    Output bits follow the activation bits of the entry (the output is requantized for a next
    layer of the same precision). The table stores its config and layer list, so it can be
    regenerated and checked; keys are :meth:`LayerShape.key` strings.
    """
    config = config or BitFusionConfig()
    pairs = normalize_bit_choices(bit_choices)
    shapes: dict[str, LayerShape] = {}
    for layer in layers:
        shapes.setdefault(layer.shape_key(), layer.with_bits(8, 8))
    entries: dict[str, dict[str, Any]] = {}
    items = [(s, p) for s in shapes.values() for p in pairs]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="bitfusion LUT", unit="entry")
    for shape, (w_bits, a_bits) in items:
        layer = shape.with_bits(w_bits, a_bits)
        cost = simulate_layer(layer, config)
        entries[layer.key()] = {"layer": layer.to_json(), **cost.to_json()}
    return {
        "format": "apq-lut-v1",
        "target": "bitfusion",
        "source": "simulated",
        "model": MODEL_NAME,
        "config": config.to_json(),
        "bit_choices": [list(p) for p in pairs],
        "shapes": [s.shape_key() for s in shapes.values()],
        "entries": entries,
    }


def lut_latency_ms(table: dict[str, Any], layer: LayerShape) -> float:
    """Look a layer up in a table made by :func:`lookup_table` (missing -> InvalidInputError).

    Tables are built with output bits == activation bits, so ``layer.out_bits`` is ignored."""
    key = layer.with_bits(layer.w_bits, layer.a_bits, layer.a_bits).key()
    try:
        return float(table["entries"][key]["latency_ms"])
    except KeyError:
        raise InvalidInputError(f"layer {key} is not in the lookup table") from None


def save_lookup_table(table: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(table, indent=1, sort_keys=True), encoding="utf-8")


LUT_CSV_COLUMNS: tuple[str, ...] = ("key", "op", "in_ch", "out_ch", "kernel", "stride", "in_h", "in_w", "groups",
                                    "batch", "w_bits", "a_bits", "latency_ms", "energy_uj", "compute_cycles",
                                    "memory_bytes", "bound", "source", "model")


def lookup_table_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (one per entry) for CSV output."""
    rows = []
    for key, entry in table["entries"].items():
        row = {"key": key, **entry["layer"], **{k: v for k, v in entry.items() if k != "layer"}}
        rows.append({c: row[c] for c in LUT_CSV_COLUMNS})
    return rows
