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

from apq.toolchain.supernet.qlayers import ActQuant
from apq.toolchain.supernet.space import SubnetConfig


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


__all__ = ["calibrate_clips", "recalibrate_bn"]
