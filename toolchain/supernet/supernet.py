"""The elastic, quantization-aware supernet: set a subnet, run it, or extract it.

Usage is "set, then run / extract" (once-for-all): ``net.set_active(cfg)`` picks depths,
kernels, widths and the bit policy; ``net(x)`` runs that subnet with fake quantization;
``net.extract(cfg)`` returns a plain :class:`StaticNet` (copied tensors, no dynamic code) that
computes exactly the same function in eval mode.

The stem, head and classifier are ordinary static quantized layers (their shapes never
change). They run at the space's ``fixed_bits`` whenever the active policy quantizes any
block, and in float when the whole policy is float, so "float" means the float reference.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apq.toolchain.errors import ArtifactError
from apq.toolchain.supernet.elastic import DynamicBlock
from apq.toolchain.supernet.qlayers import QConvBNAct, QLinear, StaticNet
from apq.toolchain.supernet.space import SearchSpace, SubnetConfig

CHECKPOINT_FORMAT = "apq-supernet"
CHECKPOINT_VERSION = 1


class Supernet(nn.Module):
    """All subnets of a :class:`SearchSpace`, sharing one set of weights."""

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        s = space
        fb = s.fixed_bits
        self.stem = QConvBNAct(s.in_channels, s.stem_width, 3, s.stem_stride, 1, True, fb, fb, in_signed=True)
        self.stages = nn.ModuleList()
        for st in range(s.num_stages):
            self.stages.append(nn.ModuleList(
                DynamicBlock(s.block_in_channels(st, i), s.stage_widths[st], s.block_stride(st, i),
                             s.kernel_choices, s.expand_choices, self.low_bit_choices(s))
                for i in range(s.max_depth)
            ))
        self.head = QConvBNAct(s.stage_widths[-1], s.head_width, 1, 1, 1, True, fb, fb, in_signed=True)
        self.classifier = QLinear(s.head_width, s.num_classes, fb, fb, in_signed=False)
        self.active: SubnetConfig = s.largest(bits=None)
        self.set_active(self.active)

    @staticmethod
    def low_bit_choices(space: SearchSpace) -> tuple[int, ...]:
        """Bit choices below ``fixed_bits``: each gets its own activation clips in every block."""
        return tuple(b for b in space.bit_choices if b < space.fixed_bits)

    # ------------------------------------------------------------------ subnet selection
    def _fixed_bits(self, cfg: SubnetConfig) -> int | None:
        quantized = any(b is not None for blk in cfg.blocks for b in blk.bits)
        return self.space.fixed_bits if quantized else None

    def set_active(self, cfg: SubnetConfig) -> SubnetConfig:
        """Select the subnet (and bit policy) that ``forward`` runs; validated against the space."""
        self.space.validate(cfg)
        self.active = cfg
        fb = self._fixed_bits(cfg)
        for layer in (self.stem, self.head, self.classifier):
            layer.w_bits = fb
            layer.a_bits = fb
        return cfg

    def active_blocks(self, cfg: SubnetConfig | None = None) -> list[tuple[DynamicBlock, Any]]:
        """(shared block, its config) pairs of a subnet, in execution order."""
        cfg = cfg or self.active
        out = []
        for stage, blocks in zip(self.stages, cfg.stages()):
            out.extend((stage[i], b) for i, b in enumerate(blocks))
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block, bcfg in self.active_blocks():
            x = block(x, bcfg)
        x = self.head(x)
        x = x.mean(dim=(2, 3))  # as StaticNet.forward
        return self.classifier(x)

    # ------------------------------------------------------------------ extraction
    @torch.no_grad()
    def extract(self, cfg: SubnetConfig | None = None) -> StaticNet:
        """A standalone :class:`StaticNet` for ``cfg`` (default: the active subnet).

        Tensors are copied, so fine-tuning the result never touches the shared weights.
        """
        cfg = self.space.validate(cfg or self.active)
        fb = self._fixed_bits(cfg)
        stem, head, classifier = (copy.deepcopy(m) for m in (self.stem, self.head, self.classifier))
        for layer in (stem, head, classifier):
            layer.w_bits = fb
            layer.a_bits = fb
        blocks = [block.extract(b) for block, b in self.active_blocks(cfg)]
        return StaticNet(stem, blocks, head, classifier).train(self.training)

    @torch.no_grad()
    def sort_channels(self) -> None:
        """Sort every block's hidden channels by importance (before elastic width)."""
        for stage in self.stages:
            for block in stage:
                block.sort_channels()

    # ------------------------------------------------------------------ persistence
    def checkpoint_dict(self, **extra: Any) -> dict[str, Any]:
        """What a weights-only checkpoint holds: format tag, space and state (plus ``extra``)."""
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "space": self.space.to_dict(), "model": self.state_dict(), **extra}

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> tuple["Supernet", dict[str, Any]]:
        """Load a supernet from a weights-only or a training checkpoint; returns (net, raw dict)."""
        ck = load_checkpoint(path, map_location)
        net = cls(SearchSpace.from_dict(ck["space"]))
        net.load_state_dict(ck["model"])
        return net, ck


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Read and check an apq supernet checkpoint (raises :class:`ArtifactError`)."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"supernet checkpoint {p} does not exist")
    try:
        ck = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, not a torch file, unsafe pickle
        raise ArtifactError(f"cannot read supernet checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{p} is not an apq supernet checkpoint")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ArtifactError(f"{p}: checkpoint version {ck.get('version')} unsupported (expected {CHECKPOINT_VERSION})")
    return ck


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["Supernet", "load_checkpoint", "file_sha256", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]
