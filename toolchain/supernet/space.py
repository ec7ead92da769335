"""The search space: the one dataclass the supernet, the encoder, the exporter and the cost
features all read.

A subnet is MobileNetV2-style: a fixed 3x3 stem, stages of inverted-residual blocks, a fixed
1x1 head and a linear classifier. Per stage the depth is elastic; per block the depthwise
kernel, the expand ratio (the "pruning" dimension: how many hidden channels survive) and four
bit-widths (pointwise weights/activations, depthwise weights/activations) are elastic. The
stem, head and classifier stay at ``fixed_bits`` as in APQ, because the first and last layers
are the most sensitive to quantization and the cheapest to keep wide.

Why only active blocks are stored in :class:`SubnetConfig`: a config then *is* the network
(no dead entries that silently disagree between two equal subnets), and the fixed-length
view the predictors need is produced by :meth:`SearchSpace.encode`, which zero-fills the
inactive slots (as APQ's encoder does).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

SPACE_VERSION = 1
FLOAT_TOKEN = "f"
"""Bit-width token for float (no quantization) in the compact string form."""

Bits = int | None


@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block: depthwise kernel, expand ratio and its four bit-widths.

    Bits ``None`` mean float (quantization off), the reference every quantized policy is
    compared against.
    """

    kernel: int
    expand: int
    pw_w: Bits = 8
    pw_a: Bits = 8
    dw_w: Bits = 8
    dw_a: Bits = 8

    @property
    def bits(self) -> tuple[Bits, Bits, Bits, Bits]:
        return (self.pw_w, self.pw_a, self.dw_w, self.dw_a)

    def to_string(self) -> str:
        """``k3e4w8a8d4a4``: kernel, expand, pointwise w/a bits, depthwise w/a bits."""
        t = [_bit_token(b) for b in self.bits]
        return f"k{self.kernel}e{self.expand}w{t[0]}a{t[1]}d{t[2]}a{t[3]}"

    @classmethod
    def from_string(cls, text: str) -> "BlockConfig":
        m = _BLOCK_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"bad block config {text!r}; expected e.g. k3e4w8a8d4a4 ('f' = float bits)")
        k, e, pw_w, pw_a, dw_w, dw_a = m.groups()
        return cls(int(k), int(e), _parse_bit(pw_w), _parse_bit(pw_a), _parse_bit(dw_w), _parse_bit(dw_a))


_BLOCK_RE = re.compile(r"k(\d+)e(\d+)w(\d+|f)a(\d+|f)d(\d+|f)a(\d+|f)")


def _bit_token(b: Bits) -> str:
    return FLOAT_TOKEN if b is None else str(b)


def _parse_bit(tok: str) -> Bits:
    return None if tok == FLOAT_TOKEN else int(tok)


@dataclass(frozen=True)
class SubnetConfig:
    """Depth per stage and the configs of the active blocks, in execution order.

    ``blocks`` has exactly ``sum(depths)`` entries; stage ``s`` owns the slice
    ``blocks[sum(depths[:s]) : sum(depths[:s+1])]``.
    """

    depths: tuple[int, ...]
    blocks: tuple[BlockConfig, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if len(self.blocks) != sum(self.depths):
            raise ValueError(f"subnet has {len(self.blocks)} blocks but depths {self.depths} sum to {sum(self.depths)}")

    def stages(self) -> list[tuple[BlockConfig, ...]]:
        """The blocks grouped per stage."""
        out, i = [], 0
        for d in self.depths:
            out.append(self.blocks[i:i + d])
            i += d
        return out

    def with_bits(self, w: Bits, a: Bits) -> "SubnetConfig":
        """The same architecture with one uniform policy (``None`` = float), e.g. W4A4."""
        return replace(self, blocks=tuple(replace(b, pw_w=w, pw_a=a, dw_w=w, dw_a=a) for b in self.blocks))

    def to_string(self) -> str:
        """``d2,3,4|k3e4w8a8d4a4,...``: compact, human-readable, and parseable back."""
        return "d" + ",".join(map(str, self.depths)) + "|" + ",".join(b.to_string() for b in self.blocks)

    @classmethod
    def from_string(cls, text: str) -> "SubnetConfig":
        head, sep, body = text.strip().partition("|")
        if not sep or not head.startswith("d"):
            raise ValueError(f"bad subnet config {text!r}; expected 'd2,3,4|k3e4w8a8d4a4,...'")
        try:
            depths = tuple(int(t) for t in head[1:].split(","))
        except ValueError:
            raise ValueError(f"bad depths {head!r} in subnet config; expected e.g. d2,3,4") from None
        blocks = tuple(BlockConfig.from_string(t) for t in body.split(",")) if body else ()
        return cls(depths, blocks)

    def to_dict(self) -> dict[str, Any]:
        return {"depths": list(self.depths), "blocks": [asdict(b) for b in self.blocks], "string": self.to_string()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubnetConfig":
        if "depths" in d and "blocks" in d:
            return cls(tuple(d["depths"]), tuple(BlockConfig(**b) for b in d["blocks"]))
        if "string" in d:
            return cls.from_string(d["string"])
        raise ValueError("subnet config JSON needs 'depths' and 'blocks' (or 'string')")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SubnetConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> "SubnetConfig":
        return cls.from_json(Path(path).read_text())


@dataclass(frozen=True)
class SearchSpace:
    """The elastic MobileNetV2 space, sized for 28-32 px inputs and a two-core CPU.

    Default geometry: stem 3x3 stride 1 (28 px), stages of widths 16/32/48 at strides 2/2/1
    (28 -> 14 -> 7 -> 7 px: the first block's expand conv runs at 28 px, its depthwise conv
    strides to 14), head 1x1 to 192 channels. Why the stride-1 stem (was stride 2, with stage
    strides 1/2/1): the largest subnet plateaued at 91.7% on Fashion-MNIST when the stem threw
    away 3 of every 4 pixels; seeing them costs 6% more MACs on the largest subnet (18.8M vs
    17.8M; 3.5M vs 3.0M on the smallest) and ~5% per training step, and the same schedule then
    reached the 92% goal. Every later stage keeps its resolution, so
    training still fits in about 100 CPU minutes. Why 32/48 and 192 (were 24/32 and 128): the
    narrower space plateaued at 91.1% with 94% training accuracy under augmentation, a
    capacity limit; the wider late stages cost ~1.2x per training step because they run at 7 px.
    """

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    stem_width: int = 16
    stem_stride: int = 1
    stage_widths: tuple[int, ...] = (16, 32, 48)
    stage_strides: tuple[int, ...] = (2, 2, 1)
    depth_choices: tuple[int, ...] = (2, 3, 4)
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    expand_choices: tuple[int, ...] = (3, 4, 6)
    bit_choices: tuple[int, ...] = (2, 4, 8)
    head_width: int = 192
    fixed_bits: int = 8
    version: int = SPACE_VERSION

    def __post_init__(self) -> None:
        for name in ("stage_widths", "stage_strides", "depth_choices", "kernel_choices", "expand_choices", "bit_choices"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("depth_choices", "kernel_choices", "expand_choices", "bit_choices"):
            v = getattr(self, name)
            if not v or list(v) != sorted(set(v)):
                raise ValueError(f"search space {name} must be non-empty, sorted and unique, got {v}")
        if len(self.stage_widths) != len(self.stage_strides):
            raise ValueError("search space needs one stride per stage width")
        if any(k % 2 == 0 for k in self.kernel_choices):
            raise ValueError(f"kernel choices must be odd, got {self.kernel_choices}")
        if min(self.depth_choices) < 1:
            raise ValueError("depth choices must be >= 1")

    # ------------------------------------------------------------------ geometry
    @property
    def num_stages(self) -> int:
        return len(self.stage_widths)

    @property
    def max_depth(self) -> int:
        return max(self.depth_choices)

    @property
    def num_slots(self) -> int:
        """Blocks of the largest subnet (the fixed length of the encoding)."""
        return self.num_stages * self.max_depth

    def block_in_channels(self, stage: int, index: int) -> int:
        """Input channels of block ``index`` of ``stage`` (width of the stage before, or its own)."""
        if index > 0:
            return self.stage_widths[stage]
        return self.stem_width if stage == 0 else self.stage_widths[stage - 1]

    def block_stride(self, stage: int, index: int) -> int:
        return self.stage_strides[stage] if index == 0 else 1

    def mid_channels(self, in_ch: int, expand: int) -> int:
        """Hidden width of a block: ``in_ch * expand`` (the channels that pruning keeps)."""
        return in_ch * expand

    def restrict_bits(self, bits: tuple[int, ...] | list[int]) -> "SearchSpace":
        """This space with only the bit-widths a target can run (``TargetSpec.bits``).

        Why an intersection: a supernet is trained for its own bit choices; a target can only
        narrow them (e.g. {4, 8} without popcount), never add untrained ones.
        """
        keep = tuple(b for b in self.bit_choices if b in set(bits))
        if not keep:
            raise ValueError(f"no bit-width in common between the target's {tuple(bits)} and the space's {self.bit_choices}")
        return replace(self, bit_choices=keep)

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.in_channels, self.image_size, self.image_size)

    # ------------------------------------------------------------------ canonical configs
    def largest(self, bits: Bits = -1) -> SubnetConfig:
        """Deepest, widest, largest kernels; ``bits`` default = the highest bit choice."""
        b = max(self.bit_choices) if bits == -1 else bits
        blk = BlockConfig(max(self.kernel_choices), max(self.expand_choices), b, b, b, b)
        return SubnetConfig((self.max_depth,) * self.num_stages, (blk,) * self.num_slots)

    def smallest(self, bits: Bits = -1) -> SubnetConfig:
        """Shallowest, narrowest, smallest kernels; ``bits`` default = the lowest bit choice."""
        b = min(self.bit_choices) if bits == -1 else bits
        d = min(self.depth_choices)
        blk = BlockConfig(min(self.kernel_choices), min(self.expand_choices), b, b, b, b)
        return SubnetConfig((d,) * self.num_stages, (blk,) * (d * self.num_stages))

    # ------------------------------------------------------------------ sampling
    def sample_block(self, rng: np.random.Generator, quantized: bool = True) -> BlockConfig:
        k = int(rng.choice(self.kernel_choices))
        e = int(rng.choice(self.expand_choices))
        if not quantized:
            return BlockConfig(k, e, None, None, None, None)
        b = [int(rng.choice(self.bit_choices)) for _ in range(4)]
        return BlockConfig(k, e, *b)

    def sample(self, rng: np.random.Generator, quantized: bool = True) -> SubnetConfig:
        """A uniformly random subnet (and, if ``quantized``, a random bit policy)."""
        depths = tuple(int(rng.choice(self.depth_choices)) for _ in range(self.num_stages))
        blocks = tuple(self.sample_block(rng, quantized) for _ in range(sum(depths)))
        return SubnetConfig(depths, blocks)

    def _slots(self, cfg: SubnetConfig) -> list[list[BlockConfig]]:
        return [list(s) for s in cfg.stages()]

    def mutate(self, cfg: SubnetConfig, prob: float, rng: np.random.Generator) -> SubnetConfig:
        """Resample each depth and each block field independently with probability ``prob``.

        New blocks (a grown depth) are sampled fresh; float bits stay float, so mutating a
        float architecture never invents a bit policy.
        """
        quantized = any(b is not None for blk in cfg.blocks for b in blk.bits)
        stages = self._slots(cfg)
        for s, blocks in enumerate(stages):
            if rng.random() < prob:
                d = int(rng.choice(self.depth_choices))
                while len(blocks) < d:
                    blocks.append(self.sample_block(rng, quantized))
                del blocks[d:]
            for i, b in enumerate(blocks):
                kw: dict[str, Any] = {}
                if rng.random() < prob:
                    kw["kernel"] = int(rng.choice(self.kernel_choices))
                if rng.random() < prob:
                    kw["expand"] = int(rng.choice(self.expand_choices))
                for name in ("pw_w", "pw_a", "dw_w", "dw_a"):
                    if getattr(b, name) is not None and rng.random() < prob:
                        kw[name] = int(rng.choice(self.bit_choices))
                blocks[i] = replace(b, **kw)
        return SubnetConfig(tuple(len(b) for b in stages), tuple(b for s in stages for b in s))

    def crossover(self, a: SubnetConfig, b: SubnetConfig, rng: np.random.Generator) -> SubnetConfig:
        """Per stage pick one parent's depth; per slot and field pick either parent's value.

        Slots only one parent has (its stage is deeper) are copied from that parent.
        """
        sa, sb = self._slots(a), self._slots(b)
        stages = []
        for x, y in zip(sa, sb):
            d = len(x) if rng.random() < 0.5 else len(y)
            blocks = []
            for i in range(d):
                if i >= len(x) or i >= len(y):
                    blocks.append((x if i < len(x) else y)[i])
                    continue
                fields = {n: getattr(x[i] if rng.random() < 0.5 else y[i], n) for n in BlockConfig.__dataclass_fields__}
                blocks.append(BlockConfig(**fields))
            stages.append(blocks)
        return SubnetConfig(tuple(len(s) for s in stages), tuple(blk for s in stages for blk in s))

    def validate(self, cfg: SubnetConfig) -> SubnetConfig:
        """Raise ``ValueError`` naming the first choice that is not in this space."""
        if len(cfg.depths) != self.num_stages:
            raise ValueError(f"subnet has {len(cfg.depths)} stages, the search space has {self.num_stages}")
        for s, d in enumerate(cfg.depths):
            if d not in self.depth_choices:
                raise ValueError(f"stage {s} depth {d} not in depth choices {self.depth_choices}")
        for i, b in enumerate(cfg.blocks):
            if b.kernel not in self.kernel_choices:
                raise ValueError(f"block {i} kernel {b.kernel} not in kernel choices {self.kernel_choices}")
            if b.expand not in self.expand_choices:
                raise ValueError(f"block {i} expand {b.expand} not in expand choices {self.expand_choices}")
            for name in ("pw_w", "pw_a", "dw_w", "dw_a"):
                v = getattr(b, name)
                if v is not None and v not in self.bit_choices:
                    raise ValueError(f"block {i} {name} bits {v} not in bit choices {self.bit_choices} (or float)")
        return cfg

    # ------------------------------------------------------------------ encoding
    @property
    def slot_width(self) -> int:
        return len(self.kernel_choices) + len(self.expand_choices) + 4 * len(self.bit_choices)

    @property
    def encoding_size(self) -> int:
        return self.num_slots * self.slot_width

    def encode(self, cfg: SubnetConfig) -> np.ndarray:
        """Fixed-length one-hot vector (float32) for the predictors, as in APQ.

        Per slot (stage-major, ``max_depth`` slots per stage): one-hot kernel, one-hot expand
        ratio, then one-hot of each of the four bit-widths. Inactive slots are all zero;
        float bits are all zero too (the kernel one-hot still marks the slot active).
        """
        self.validate(cfg)
        out = np.zeros((self.num_slots, self.slot_width), dtype=np.float32)
        nk, ne, nb = len(self.kernel_choices), len(self.expand_choices), len(self.bit_choices)
        for s, blocks in enumerate(cfg.stages()):
            for i, b in enumerate(blocks):
                row = out[s * self.max_depth + i]
                row[self.kernel_choices.index(b.kernel)] = 1.0
                row[nk + self.expand_choices.index(b.expand)] = 1.0
                for j, v in enumerate(b.bits):
                    if v is not None:
                        row[nk + ne + j * nb + self.bit_choices.index(v)] = 1.0
        return out.reshape(-1)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown search space fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SearchSpace":
        return cls.from_dict(json.loads(text))


def parse_bits(text: str) -> tuple[Bits, Bits]:
    """``"W8A8"`` -> ``(8, 8)``; ``"float"`` -> ``(None, None)``."""
    t = text.strip().upper()
    if t in ("FLOAT", "FP32", "F"):
        return None, None
    m = re.fullmatch(r"W(\d+)A(\d+)", t)
    if m is None:
        raise ValueError(f"bad bit policy {text!r}; expected e.g. W8A8, W4A4, W2A2 or float")
    return int(m.group(1)), int(m.group(2))


__all__ = ["BlockConfig", "SubnetConfig", "SearchSpace", "parse_bits", "FLOAT_TOKEN", "SPACE_VERSION"]
