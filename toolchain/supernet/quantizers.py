"""Quantizers: torch fake-quant with straight-through gradients, and NumPy references.

Why two implementations: the torch side trains (it needs gradients), the NumPy side is the
independent reference the tests and the ONNX exporter are checked against. Both follow the
arithmetic of ONNX ``QuantizeLinear`` / ``DequantizeLinear`` exactly (``x / scale``, round half
to even, saturate, ``q * scale``), so a fake-quant tensor in torch and the ORT run of the
exported QDQ graph agree bit for bit when they see the same input.

Conventions (see docs/qdq_convention.md):

* weights: per output channel (dim 0), symmetric, levels ``[-(2^(b-1)-1), 2^(b-1)-1]``,
  ``scale = max|w| / (2^(b-1)-1)``; ``b = 1`` is binary: ``{-1, +1} * mean|w|``.
* activations, unsigned (after ReLU6): levels ``[0, 2^b-1]``, ``scale = clip / (2^b-1)``.
* activations, signed: levels ``[-2^(b-1), 2^(b-1)-1]`` (the full two's-complement range, as
  ``QuantizeLinear`` + ``Clip`` saturate), ``scale = clip / max(2^(b-1)-1, 1)``.
* ``bits`` of ``None`` or >= 32 means float: no quantization at all.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from apq.toolchain.errors import InvalidInputError

FLOAT_BITS = 32
"""Bit-widths at or above this (or ``None``) mean "keep float"."""


def normalize_bits(bits: int | None) -> int | None:
    """Return ``None`` for float, else the validated bit-width in 1..8.

    Why: bit policies come from search configs and JSON files; one check here means no layer
    silently runs 12-bit "quantization" that no 8-bit container can hold.
    """
    if bits is None or bits >= FLOAT_BITS:
        return None
    if not 1 <= int(bits) <= 8:
        raise InvalidInputError(f"bit-width {bits} unsupported: use 1..8, or None/>=32 for float")
    return int(bits)


def weight_qmax(bits: int) -> int:
    """Largest weight level: ``2^(b-1)-1`` (1 for binary weights)."""
    return max((1 << (bits - 1)) - 1, 1)


def act_qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a b-bit activation: the Clip bounds of the QDQ convention."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def act_scale_divisor(bits: int, signed: bool) -> int:
    """Number of steps between 0 and +clip (``scale = clip / divisor``)."""
    if signed:
        return max((1 << (bits - 1)) - 1, 1)
    return (1 << bits) - 1


# --------------------------------------------------------------------------- torch side


class _RoundSTE(torch.autograd.Function):
    """Round half to even forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def round_ste(x: Tensor) -> Tensor:
    """``torch.round`` (half to even, like ``QuantizeLinear``) with an identity gradient."""
    return _RoundSTE.apply(x)


def weight_quant_params(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Integer levels and per-output-channel scales of ``w`` (no gradient).

    Returns ``(q, scale)`` with ``q`` float-valued integers shaped like ``w`` and ``scale`` of
    shape ``[w.shape[0]]`` (float32, strictly positive, so it is a valid ONNX scale).
    """
    with torch.no_grad():
        flat = w.detach().reshape(w.shape[0], -1)
        if bits == 1:
            # mean in float64 so torch and NumPy agree whatever their summation order
            scale = flat.double().abs().mean(dim=1).to(w.dtype)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.where(w.detach() >= 0, 1.0, -1.0).to(w.dtype)
            return q, scale
        qmax = weight_qmax(bits)
        amax = flat.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        shape = (-1,) + (1,) * (w.dim() - 1)
        q = torch.clamp(torch.round(w.detach() / scale.view(shape)), -qmax, qmax)
        return q, scale


def fake_quant_weight(w: Tensor, bits: int | None) -> Tensor:
    """Per-output-channel symmetric fake quantization with a straight-through gradient.

    The forward value is exactly ``q * scale`` (what ``DequantizeLinear`` computes); the
    gradient w.r.t. ``w`` is the identity. Written as ``wq + (w - w.detach())`` rather than
    ``w + (wq - w).detach()`` because the latter is not bit-exact in float32.
    """
    b = normalize_bits(bits)
    if b is None:
        return w
    q, scale = weight_quant_params(w, b)
    shape = (-1,) + (1,) * (w.dim() - 1)
    wq = q * scale.view(shape)
    return wq + (w - w.detach())


def fake_quant_act(x: Tensor, clip: Tensor, bits: int, signed: bool, grad_scale: bool = True) -> Tensor:
    """LSQ/PACT-style activation fake quantization with a learnable clip.

    ``y = clamp(round(x / s), qmin, qmax) * s`` with ``s = clip / divisor``. ``x`` gets the
    straight-through gradient inside the range and zero outside (PACT); ``clip`` gets the LSQ
    step-size gradient, scaled by ``1/sqrt(numel * qmax)`` so its update size does not depend
    on the tensor size.
    """
    qmin, qmax = act_qrange(bits, signed)
    divisor = act_scale_divisor(bits, signed)
    c = clip
    if grad_scale and clip.requires_grad:
        # Value-exact gradient scaling: forward is clip + 0.0, backward is g * d/dclip.
        g = 1.0 / float(np.sqrt(max(x.numel(), 1) * max(qmax, 1)))
        c = clip.detach() + (clip * g - (clip * g).detach())
    scale = c / divisor
    q = torch.clamp(round_ste(x / scale), qmin, qmax)
    return q * scale


# --------------------------------------------------------------------------- NumPy side


def quantize_weight_numpy(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference per-output-channel weight quantizer: ``(q_int8, scale_float32[out_ch])``.

    ``w ≈ q * scale[:, None, ...]``; ``q`` is int8 holding b-bit values (the container of the
    QDQ convention). Arithmetic in float32 like the torch path and ONNX.
    """
    b = normalize_bits(bits)
    if b is None:
        raise InvalidInputError("quantize_weight_numpy needs bits in 1..8")
    w = np.asarray(w, dtype=np.float32)
    flat = w.reshape(w.shape[0], -1)
    shape = (-1,) + (1,) * (w.ndim - 1)
    if b == 1:
        scale = np.abs(flat.astype(np.float64)).mean(axis=1).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        q = np.where(w >= 0, 1, -1).astype(np.int8)
        return q, scale
    qmax = weight_qmax(b)
    amax = np.abs(flat).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def quantize_act_numpy(x: np.ndarray, clip: float, bits: int, signed: bool) -> tuple[np.ndarray, np.float32]:
    """Reference activation quantizer: ``(q, scale)`` with ``x ≈ q * scale``.

    ``q`` is uint8 (unsigned) or int8 (signed), i.e. exactly what ONNX ``QuantizeLinear``
    followed by the convention's ``Clip`` produces. ``np.rint`` rounds half to even.
    """
    b = normalize_bits(bits)
    if b is None:
        raise InvalidInputError("quantize_act_numpy needs bits in 1..8")
    qmin, qmax = act_qrange(b, signed)
    scale = np.float32(np.float32(clip) / np.float32(act_scale_divisor(b, signed)))
    x = np.asarray(x, dtype=np.float32)
    q = np.clip(np.rint(x / scale), qmin, qmax)
    return q.astype(np.int8 if signed else np.uint8), scale
