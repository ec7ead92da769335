"""Calibration of a sampled subnet: BN statistics and activation clips.

Why BN re-calibration: the supernet's shared BN running statistics are an average over all
the subnets trained through them, which matches none of them; a subnet must re-estimate its
own statistics (once-for-all) before it is evaluated, or its accuracy is meaningless.
Why clip calibration: an activation quantizer's clip fixes its scale; before the
quantization-aware phase (and optionally per subnet) clips are set from observed data.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from apq.toolchain.supernet.quantizers import act_qrange, act_scale_divisor
from apq.toolchain.supernet.qlayers import ActQuant
from apq.toolchain.supernet.space import SubnetConfig

MSE_CLIP_GRID = 64
"""Candidate clips tried per layer by :func:`mse_clip` (fractions of the observed maximum)."""


def _quantized_layers(net: nn.Module) -> list[nn.Module]:
    """Modules whose forward quantizes its first input with its own ``act_quant``."""
    return [m for m in net.modules() if isinstance(getattr(m, "act_quant", None), ActQuant)]


@torch.no_grad()
def calibrate_clips(net: nn.Module, cfg: SubnetConfig | None, x: Tensor, percentile: float = 99.9) -> None:
    """Set every activation clip from the inputs each layer sees during one forward of ``x``.

    Works on a :class:`Supernet` (``cfg`` selects the subnet whose path is calibrated) and on
    a :class:`StaticNet` (``cfg=None``). Hooks run before each layer's quantizer, so each
    layer sees the already-quantized outputs of the layers before it.
    """
    if cfg is not None:
        net.set_active(cfg)  # type: ignore[operator]
    handles = [m.register_forward_pre_hook(lambda mod, args: mod.act_quant.calibrate(args[0], percentile))
               for m in _quantized_layers(net)]
    was_training = net.training
    net.eval()
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)


@torch.no_grad()
def mse_clip(x: Tensor, bits: int, signed: bool, grid: int = MSE_CLIP_GRID) -> float:
    """The clip minimising the mean squared quantization error of ``x`` at ``bits``.

    Why not a percentile: a percentile suits 8 bits, but at 2 bits the 99.9th percentile puts
    the first level so high that nearly every activation rounds to zero; the MSE-optimal clip
    of a 2-bit grid is a small fraction of the maximum, and it differs per bit-width.
    """
    v = x.detach().float().reshape(-1)
    if v.numel() > 1 << 18:  # a strided sample is plenty for a 1-D search
        v = v[:: v.numel() // (1 << 18) + 1]
    top = float((v.abs() if signed else v.clamp_min(0.0)).max()) if v.numel() else 0.0
    if top <= 1e-3:
        return 1e-3
    qmin, qmax = act_qrange(bits, signed)
    div = act_scale_divisor(bits, signed)
    clips = torch.linspace(top / grid, top, grid)
    scale = (clips / div).view(-1, 1)
    err = ((torch.clamp(torch.round(v.view(1, -1) / scale), qmin, qmax) * scale - v.view(1, -1)) ** 2).mean(dim=1)
    return float(clips[int(torch.argmin(err))])


@torch.no_grad()
def calibrate_bit_clips(net: nn.Module, x: Tensor, bits: tuple[int, ...] | None = None) -> dict[int, int]:
    """Set a :class:`Supernet`'s per-bit-width activation clips by MSE, one bit-width at a time.

    For each ``b`` (default: the space's low bit choices) the largest subnet runs with every
    block at ``WbAb`` and each elastic layer's ``b``-bit clip is set from the input it sees
    (already quantized by the layers before, as in deployment). Returns ``{bits: layers set}``.
    """
    from apq.toolchain.supernet.elastic import DynamicConvBNAct

    bits = tuple(bits) if bits is not None else net.low_bit_choices(net.space)  # type: ignore[attr-defined]
    layers = [m for m in net.modules() if isinstance(m, DynamicConvBNAct)]
    was_training, active = net.training, net.active  # type: ignore[attr-defined]
    net.eval()
    done: dict[int, int] = {}
    try:
        for b in bits:
            def hook(mod: nn.Module, args: tuple[Tensor, ...], b: int = b) -> None:
                mod.clip_param(b).fill_(mse_clip(args[0], b, mod.act_quant.signed))  # type: ignore[operator]
                done[b] = done.get(b, 0) + 1

            handles = [m.register_forward_pre_hook(hook) for m in layers]
            try:
                net.set_active(net.space.largest(bits=b))  # type: ignore[attr-defined, operator]
                net(x)
            finally:
                for h in handles:
                    h.remove()
    finally:
        net.set_active(active)  # type: ignore[operator]
        net.train(was_training)
    return done


@torch.no_grad()
def recalibrate_bn(net: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]], num_batches: int) -> int:
    """Re-estimate every BatchNorm's running statistics from ``num_batches`` batches.

    Statistics are reset and accumulated as an exact cumulative average (``momentum=None``),
    with the network in train mode so BN normalises with batch statistics as in training.
    Returns the number of batches used. Leaves ``net`` in eval mode.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    used = 0
    try:
        for b in batches:
            if used >= num_batches:
                break
            x = b[0] if isinstance(b, (tuple, list)) else b
            net(x)
            used += 1
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        net.eval()
    if used == 0:
        raise ValueError("BN re-calibration got no batches")
    return used


__all__ = ["calibrate_clips", "calibrate_bit_clips", "mse_clip", "recalibrate_bn"]
