"""Batched augmentation and normalisation in torch.

Everything works on a whole batch of uint8 NHWC pixels at once (one gather for crop+flip,
one fused multiply-add for normalisation): per-sample Python transforms would cost more than
the small supernet's forward pass on a two-core host.
"""

from __future__ import annotations

from typing import Sequence

import torch

from apq.toolchain.data.base import AugmentConfig


def random_crop_flip(images: torch.Tensor, cfg: AugmentConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``cfg.pad``, crop back to H x W at a random offset, mirror with p=0.5.

    ``images`` is (B, H, W, C) uint8; the result has the same shape and dtype. Crop offsets
    and flips are drawn per sample from ``generator``; the flip is folded into the column
    index, so crop and flip are a single gather.
    """
    b, h, w, c = images.shape
    p = cfg.pad
    if p > 0:
        padded = images.new_zeros((b, h + 2 * p, w + 2 * p, c))
        padded[:, p:p + h, p:p + w] = images
    else:
        padded = images
    oy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    rows = oy[:, None] + torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :].expand(b, w)
    if cfg.hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    cols = ox[:, None] + cols
    batch = torch.arange(b)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 ``(x/255 - mean) / std``.

    The permute is a view, so the result is laid out ``torch.channels_last`` in memory
    without a copy; elementwise ops below preserve that layout.
    """
    c = images.shape[-1]
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, c, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, c, 1, 1)
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    return x * scale - shift
