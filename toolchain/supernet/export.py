"""ONNX emission of a :class:`StaticNet` in apq's QDQ convention (or plain float).

Why hand-built with ``onnx.helper`` instead of ``torch.onnx``: torch's exporter has no way to
say "4-bit value in an int8 container" (``QuantizeLinear`` followed by an integer ``Clip``),
and TVM 0.27 cannot import INT4/UINT4 tensors, so this convention is the only low-bit
encoding that onnxruntime and TVM both execute exactly. See docs/qdq_convention.md.

The graph is a line-by-line transcription of the eval-mode forward: the same folded
weights (``QConvBNAct.folded_weight_bias``), the same integer levels and scales
(``weight_quant_params``, ``ActQuant.scale``). Shapes are static: ``input_shape`` is written
as given (batch 1 in practice), which is what TVM compiles best.

Per-layer emitters live in a registry keyed by module type, so a new layer kind is one
function, not another branch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from apq.toolchain.errors import InvalidInputError
from apq.toolchain.supernet.qlayers import InvertedResidual, QConvBNAct, QLinear, StaticNet
from apq.toolchain.supernet.quantizers import act_qrange, weight_quant_params

QDQ_CONVENTION_VERSION = "1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 13  # per-axis DequantizeLinear and integer Clip


@dataclass
class _Graph:
    """Accumulates nodes, initializers and the ``apq.bits`` map while walking the net."""

    quantized: bool
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    bits: dict[str, int] = field(default_factory=dict)

    def const(self, name: str, value: np.ndarray) -> str:
        # np.array, not np.ascontiguousarray: the latter turns 0-d scales into shape (1,)
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def quant_act(self, x: str, name: str, bits: int | None, signed: bool, scale: float) -> str:
        """``QuantizeLinear -> [Clip to the b-bit range] -> DequantizeLinear`` (or ``x`` if float)."""
        if not self.quantized or bits is None:
            return x
        dtype = np.int8 if signed else np.uint8
        s = self.const(f"{name}.in_scale", np.array(scale, dtype=np.float32))
        zp = self.const(f"{name}.in_zp", np.array(0, dtype=dtype))
        q = self.node("QuantizeLinear", [x, s, zp], f"{name}.in_q")
        self.bits[q] = bits
        if bits < 8:
            lo, hi = act_qrange(bits, signed)
            qmin = self.const(f"{name}.in_qmin", np.array(lo, dtype=dtype))
            qmax = self.const(f"{name}.in_qmax", np.array(hi, dtype=dtype))
            q = self.node("Clip", [q, qmin, qmax], f"{name}.in_qclip")
        return self.node("DequantizeLinear", [q, s, zp], f"{name}.in_dq")

    def weight(self, name: str, w: torch.Tensor, bits: int | None) -> str:
        """Per-output-channel ``DequantizeLinear`` of an INT8 initializer (or a float one)."""
        if not self.quantized or bits is None:
            return self.const(f"{name}.weight", w.detach().float().numpy())
        q, scale = weight_quant_params(w, bits)
        wq = self.const(f"{name}.weight_q", q.numpy().astype(np.int8))
        self.bits[wq] = bits
        s = self.const(f"{name}.weight_scale", scale.float().numpy())
        zp = self.const(f"{name}.weight_zp", np.zeros(scale.shape, dtype=np.int8))
        return self.node("DequantizeLinear", [wq, s, zp], f"{name}.weight_dq", axis=0)


_Emitter = Callable[[_Graph, nn.Module, str, str], str]
_EMITTERS: dict[type, _Emitter] = {}


def register_emitter(kind: type) -> Callable[[_Emitter], _Emitter]:
    """Decorator: ``fn(graph, module, name, input_name) -> output_name`` emits ``kind``."""

    def wrap(fn: _Emitter) -> _Emitter:
        _EMITTERS[kind] = fn
        return fn

    return wrap


def _emit(g: _Graph, module: nn.Module, name: str, x: str) -> str:
    emitter = _EMITTERS.get(type(module))
    if emitter is None:
        raise InvalidInputError(f"cannot export layer {name} of type {type(module).__name__}")
    return emitter(g, module, name, x)


def _act_scale(layer: QConvBNAct | QLinear) -> float:
    return float(layer.act_quant.scale(layer.a_bits)) if layer.a_bits is not None else 1.0


@register_emitter(QConvBNAct)
def _emit_conv(g: _Graph, layer: QConvBNAct, name: str, x: str) -> str:
    x = g.quant_act(x, name, layer.a_bits, layer.in_signed, _act_scale(layer))
    with torch.no_grad():
        w, b = layer.folded_weight_bias()
    wname = g.weight(name, w, layer.w_bits)
    bname = g.const(f"{name}.bias", b.detach().float().numpy())
    c = layer.conv
    p = c.padding[0]
    y = g.node(
        "Conv", [x, wname, bname], f"{name}.conv",
        kernel_shape=list(c.kernel_size), strides=list(c.stride), pads=[p, p, p, p], group=c.groups,
    )
    if layer.relu6:
        lo = g.const(f"{name}.relu6_min", np.array(0.0, dtype=np.float32))
        hi = g.const(f"{name}.relu6_max", np.array(6.0, dtype=np.float32))
        y = g.node("Clip", [y, lo, hi], f"{name}.relu6")
    return y


@register_emitter(QLinear)
def _emit_linear(g: _Graph, layer: QLinear, name: str, x: str) -> str:
    x = g.quant_act(x, name, layer.a_bits, layer.in_signed, _act_scale(layer))
    wname = g.weight(name, layer.linear.weight, layer.w_bits)
    bname = g.const(f"{name}.bias", layer.linear.bias.detach().float().numpy())
    return g.node("Gemm", [x, wname, bname], f"{name}.gemm", transB=1)


@register_emitter(InvertedResidual)
def _emit_block(g: _Graph, block: InvertedResidual, name: str, x: str) -> str:
    y = x
    for sub, layer in block.layers():
        y = _emit(g, layer, f"{name}.{sub}", y)
    return g.node("Add", [x, y], f"{name}.add") if block.use_residual else y


@register_emitter(StaticNet)
def _emit_net(g: _Graph, net: StaticNet, name: str, x: str) -> str:
    x = _emit(g, net.stem, "stem", x)
    for i, block in enumerate(net.blocks):
        x = _emit(g, block, f"blocks.{i}", x)
    x = _emit(g, net.head, "head", x)
    x = g.node("GlobalAveragePool", [x], "pool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    return _emit(g, net.classifier, "classifier", x)


def _check_input_shape(net: StaticNet, input_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise InvalidInputError(f"input_shape must be NCHW with positive dims, got {input_shape}")
    if shape[1] != net.stem.conv.in_channels:
        raise InvalidInputError(f"input has {shape[1]} channels but the stem expects {net.stem.conv.in_channels}")
    return shape  # type: ignore[return-value]


def build_onnx(
    net: StaticNet, input_shape: tuple[int, int, int, int], quantized: bool = True, opset: int = 17
) -> onnx.ModelProto:
    """The checked ONNX model of ``net`` (not written); see :func:`export_onnx`."""
    shape = _check_input_shape(net, input_shape)
    if opset < MIN_OPSET:
        raise InvalidInputError(f"opset {opset} too old for per-channel QDQ: use >= {MIN_OPSET}")
    g = _Graph(quantized=quantized)
    out = _emit(g, net, "", INPUT_NAME)
    g.nodes.append(helper.make_node("Identity", [out], [OUTPUT_NAME], name=OUTPUT_NAME))
    n_cls = net.classifier.linear.out_features
    graph = helper.make_graph(
        g.nodes,
        "apq_static_net",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [shape[0], n_cls])],
        initializer=g.inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opsets, producer_name="apq", ir_version=helper.find_min_ir_version_for(opsets)
    )
    meta = {"apq.input_shape": json.dumps(list(shape)), "apq.layers": json.dumps(net.describe(shape))}
    if quantized and g.bits:
        meta["apq.qdq_convention"] = QDQ_CONVENTION_VERSION
        meta["apq.bits"] = json.dumps(g.bits, sort_keys=True)
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(
    net: StaticNet,
    path: str | Path,
    input_shape: tuple[int, int, int, int],
    quantized: bool = True,
    opset: int = 17,
) -> Path:
    """Write ``net`` to ``path`` as ONNX and return the path.

    ``quantized=True``: apq QDQ convention for every layer with bits (float layers stay
    float); ``quantized=False``: plain Conv/Gemm with BN folded, no Q/DQ. Eval semantics
    (running BN statistics) are used whatever ``net.training`` says.
    """
    model = build_onnx(net, input_shape, quantized=quantized, opset=opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
