"""Static (non-elastic) quantized layers: what a subnet extracted from the supernet is made of.

One class per layer kind, each carrying its own bit-widths, so a ``StaticNet`` *is* a
mixed-precision network: its eval-mode forward is the exact float model of the QDQ ONNX graph
that :func:`export_onnx` writes (same folded weights, same quantizer arithmetic).

Why BN is folded before weight fake-quant in eval mode only: per-output-channel symmetric
quantization commutes with a per-channel scale (``quant(c*w) == c*quant(w)`` for any
``c != 0``), so the training-mode path (quantize ``w``, conv, BN) and the deployed path
(fold BN, quantize, conv + bias) compute the same function up to float rounding, while the
deployed path is the one an integer kernel can run.

Bits ``None`` (or >= 32) mean float. Names in the contract (``fake_quant_weight``,
``ActQuant``, ``QConvBNAct``, ``QLinear``, ``InvertedResidual``, ``StaticNet``,
``export_onnx``) are importable from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apq.toolchain.supernet.quantizers import (
    act_qrange,
    act_scale_divisor,
    fake_quant_act,
    fake_quant_weight,
    normalize_bits,
    quantize_act_numpy,
    quantize_weight_numpy,
    weight_quant_params,
)

__all__ = [
    "fake_quant_weight",
    "ActQuant",
    "QConvBNAct",
    "QLinear",
    "InvertedResidual",
    "StaticNet",
    "export_onnx",
    "calibrate_net",
    "quantize_weight_numpy",
    "quantize_act_numpy",
    "weight_quant_params",
    "act_qrange",
    "act_scale_divisor",
]

_MIN_CLIP = 1e-4


class ActQuant(nn.Module):
    """Per-tensor activation quantizer with a learned clip (PACT range, LSQ step gradient).

    Unsigned inputs (after ReLU6) use ``[0, clip]`` in ``2^b-1`` steps; signed inputs use a
    symmetric grid of step ``clip / (2^(b-1)-1)`` over the full two's-complement range.
    """

    def __init__(self, signed: bool, init_clip: float = 6.0) -> None:
        super().__init__()
        self.signed = bool(signed)
        self.clip = nn.Parameter(torch.tensor(float(init_clip), dtype=torch.float32))

    def clip_value(self) -> Tensor:
        """The clip actually used (kept positive so the scale is a valid ONNX scale)."""
        return self.clip.clamp_min(_MIN_CLIP)

    def scale(self, bits: int) -> Tensor:
        """The float32 scale the exporter writes for ``bits`` (identical to the forward's)."""
        return (self.clip_value() / act_scale_divisor(bits, self.signed)).detach()

    def forward(self, x: Tensor, bits: int | None) -> Tensor:
        b = normalize_bits(bits)
        if b is None:
            return x
        return fake_quant_act(x, self.clip_value(), b, self.signed)

    @torch.no_grad()
    def calibrate(self, x: Tensor, percentile: float = 99.9) -> None:
        """Set the clip to the ``percentile`` of ``|x|`` (signed) or ``max(x, 0)`` (unsigned).

        Why a percentile, not the max: a few outliers would otherwise waste most levels of a
        2- or 4-bit grid.
        """
        v = x.detach().float().reshape(-1)
        v = v.abs() if self.signed else v.clamp_min(0.0)
        if v.numel() > 1 << 20:  # torch.quantile refuses huge inputs; a strided sample suffices
            v = v[:: v.numel() // (1 << 20) + 1]
        value = float(torch.quantile(v, percentile / 100.0)) if v.numel() else 0.0
        self.clip.fill_(max(value, 1e-3))

    def extra_repr(self) -> str:
        return f"signed={self.signed}, clip={float(self.clip.detach()):.4g}"


class _BitsMixin:
    """Validated ``w_bits`` / ``a_bits`` attributes (None = float)."""

    _w_bits: int | None
    _a_bits: int | None

    @property
    def w_bits(self) -> int | None:
        return self._w_bits

    @w_bits.setter
    def w_bits(self, bits: int | None) -> None:
        self._w_bits = normalize_bits(bits)

    @property
    def a_bits(self) -> int | None:
        return self._a_bits

    @a_bits.setter
    def a_bits(self, bits: int | None) -> None:
        self._a_bits = normalize_bits(bits)


class QConvBNAct(_BitsMixin, nn.Module):
    """Input quantizer -> conv (fake-quant weights) -> BN -> optional ReLU6.

    In ``eval()`` BN is folded into the conv (running statistics) before the weight is
    fake-quantized: exactly the graph :func:`export_onnx` emits.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        relu6: bool = True,
        w_bits: int | None = 8,
        a_bits: int | None = 8,
        in_signed: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act_quant = ActQuant(signed=in_signed)
        self.relu6 = bool(relu6)
        self.w_bits = w_bits
        self.a_bits = a_bits

    @property
    def in_signed(self) -> bool:
        return self.act_quant.signed

    def folded_weight_bias(self) -> tuple[Tensor, Tensor]:
        """Conv weight and bias with BN (running stats) folded in, before fake-quant.

        The single source of the deployed float parameters: the eval forward and the ONNX
        exporter both call this, so they see bit-identical tensors.
        """
        bn = self.bn
        inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = self.conv.weight * inv.view(-1, 1, 1, 1)
        b = bn.bias - bn.running_mean * inv
        return w, b

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_quant(x, self.a_bits)
        if self.training:
            y = self.bn(self._conv(x, fake_quant_weight(self.conv.weight, self.w_bits), None))
        else:
            w, b = self.folded_weight_bias()
            y = self._conv(x, fake_quant_weight(w, self.w_bits), b)
        return F.relu6(y) if self.relu6 else y

    def describe(self, name: str, in_hw: tuple[int, int] | None = None) -> dict[str, Any]:
        """One row of :meth:`StaticNet.describe`."""
        c = self.conv
        row: dict[str, Any] = {
            "name": name,
            "op": "dwconv" if c.groups == c.in_channels and c.groups > 1 else "conv",
            "kernel": c.kernel_size[0],
            "in_ch": c.in_channels,
            "out_ch": c.out_channels,
            "stride": c.stride[0],
            "groups": c.groups,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "in_signed": self.in_signed,
            "relu6": self.relu6,
        }
        if in_hw is not None:
            k, s, p = c.kernel_size[0], c.stride[0], c.padding[0]
            row["in_hw"] = list(in_hw)
            row["out_hw"] = [(d + 2 * p - k) // s + 1 for d in in_hw]
        return row


class QLinear(_BitsMixin, nn.Module):
    """Input quantizer -> linear layer with per-output-row fake-quant weights (float bias)."""

    def __init__(
        self, in_f: int, out_f: int, w_bits: int | None = 8, a_bits: int | None = 8, in_signed: bool = False
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_f, out_f, bias=True)
        self.act_quant = ActQuant(signed=in_signed)
        self.w_bits = w_bits
        self.a_bits = a_bits

    @property
    def in_signed(self) -> bool:
        return self.act_quant.signed

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_quant(x, self.a_bits)
        return F.linear(x, fake_quant_weight(self.linear.weight, self.w_bits), self.linear.bias)

    def describe(self, name: str, in_hw: tuple[int, int] | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": name,
            "op": "linear",
            "kernel": 1,
            "in_ch": self.linear.in_features,
            "out_ch": self.linear.out_features,
            "stride": 1,
            "groups": 1,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "in_signed": self.in_signed,
            "relu6": False,
        }
        if in_hw is not None:
            row["in_hw"] = [1, 1]
            row["out_hw"] = [1, 1]
        return row


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand, ReLU6] -> kxk depthwise, ReLU6 -> 1x1 project (+ x).

    Signedness follows the data: the block input comes from a linear projection (signed), so
    the first conv of the block (expand, or depthwise when there is no expand) quantizes a
    signed tensor; everything after a ReLU6 is unsigned.
    """

    def __init__(
        self,
        in_ch: int,
        mid_ch: int,
        out_ch: int,
        kernel: int,
        stride: int,
        pw_w_bits: int | None,
        pw_a_bits: int | None,
        dw_w_bits: int | None,
        dw_a_bits: int | None,
    ) -> None:
        super().__init__()
        self.expand: QConvBNAct | None = None
        if mid_ch != in_ch:
            self.expand = QConvBNAct(in_ch, mid_ch, 1, 1, 1, True, pw_w_bits, pw_a_bits, in_signed=True)
        self.depthwise = QConvBNAct(
            mid_ch, mid_ch, kernel, stride, mid_ch, True, dw_w_bits, dw_a_bits, in_signed=self.expand is None
        )
        self.project = QConvBNAct(mid_ch, out_ch, 1, 1, 1, False, pw_w_bits, pw_a_bits, in_signed=False)
        self.use_residual = stride == 1 and in_ch == out_ch

    def layers(self) -> Iterator[tuple[str, QConvBNAct]]:
        """The convs in execution order, with their attribute names."""
        if self.expand is not None:
            yield "expand", self.expand
        yield "depthwise", self.depthwise
        yield "project", self.project

    def forward(self, x: Tensor) -> Tensor:
        y = x
        for _, layer in self.layers():
            y = layer(y)
        return x + y if self.use_residual else y


class StaticNet(nn.Module):
    """A fixed mixed-precision MobileNetV2-style network (a subnet extracted from the supernet)."""

    def __init__(self, stem: QConvBNAct, blocks: list[InvertedResidual], head: QConvBNAct, classifier: QLinear) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.head(x)
        x = x.mean(dim=(2, 3))
        return self.classifier(x)

    def quant_layers(self) -> Iterator[tuple[str, QConvBNAct | QLinear]]:
        """Every quantizable layer in execution order, named as in ``named_modules()``."""
        yield "stem", self.stem
        for i, block in enumerate(self.blocks):
            for sub, layer in block.layers():
                yield f"blocks.{i}.{sub}", layer
        yield "head", self.head
        yield "classifier", self.classifier

    def describe(self, input_shape: tuple[int, int, int, int] | None = None) -> list[dict[str, Any]]:
        """Per layer: name, op, kernel, in/out channels, stride, groups, w_bits, a_bits, ...

        With ``input_shape`` (NCHW) each row also gets ``in_hw``/``out_hw``, which is what
        latency cost features need.
        """
        hw = tuple(input_shape[2:]) if input_shape is not None else None
        rows = []
        for name, layer in self.quant_layers():
            row = layer.describe(name, hw)  # type: ignore[arg-type]
            if hw is not None:
                hw = tuple(row["out_hw"])
            rows.append(row)
        return rows


@torch.no_grad()
def randomize_batchnorm(net: nn.Module, generator: torch.Generator, negative_gamma: bool = False) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms (for random-weight nets in
    tests and benchmarks, so folding BN into the conv is actually exercised)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            if negative_gamma:
                m.weight.data[0] *= -1.0  # a negative gamma must fold correctly too
            m.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


@torch.no_grad()
def calibrate_net(net: StaticNet, x: Tensor, percentile: float = 99.9) -> None:
    """Set every activation clip from one batch ``x`` (percentile of the layer's input).

    Calibration happens in a pre-forward hook during a single forward pass, so each layer is
    calibrated on the inputs produced by the already-calibrated (quantized) layers before it.
    """
    handles = []
    for _, layer in net.quant_layers():
        def hook(mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            mod.act_quant.calibrate(args[0], percentile)  # type: ignore[union-attr, operator]

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()


def export_onnx(
    net: StaticNet,
    path: str | Path,
    input_shape: tuple[int, int, int, int],
    quantized: bool = True,
    opset: int = 17,
) -> Path:
    """Write ``net`` as ONNX (apq QDQ convention, or plain float); see ``export.py``."""
    from apq.toolchain.supernet.export import export_onnx as _export

    return _export(net, path, input_shape, quantized=quantized, opset=opset)
