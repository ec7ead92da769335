"""ONNX emission of a :class:`StaticNet` in apq's QDQ convention (or plain float).

Why hand-built with ``onnx.helper`` instead of ``torch.onnx``: torch's exporter has no way to
say "4-bit value in an int8 container" (``QuantizeLinear`` followed by an integer ``Clip``),
and TVM 0.27 cannot import INT4/UINT4 tensors, so this convention is the only low-bit
encoding that onnxruntime and TVM both execute exactly. See docs/qdq_convention.md.

``qdq_format="onnx-int4"`` writes layers of <= 4 bits with standard opset-21 INT4/UINT4 QDQ
tensors instead, for tools that expect them; apq-compile reads it back through the pre-pass
in ``apq.toolchain.int4_onnx`` (exactly the same numbers as the default format).

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
FORMAT_KEY = "apq.qdq_format"


@dataclass(frozen=True)
class QdqFormat:
    """How b-bit values are typed in the ONNX file: the smallest ONNX integer type holding them."""

    name: str
    min_opset: int
    default_opset: int
    #: bits of the narrowest container this format uses; values of <= this many bits use it
    narrow_bits: int
    narrow_signed: int  # ONNX element types of the narrow container
    narrow_unsigned: int

    def container(self, bits: int, signed: bool) -> int:
        """ONNX element type holding a ``bits``-bit (un)signed value."""
        if bits <= self.narrow_bits:
            return self.narrow_signed if signed else self.narrow_unsigned
        return TensorProto.INT8 if signed else TensorProto.UINT8


#: Registry of export formats (``--qdq-format``): apq's int8 containers, or opset-21 INT4.
QDQ_FORMATS: dict[str, QdqFormat] = {
    "apq": QdqFormat("apq", MIN_OPSET, 17, 8, TensorProto.INT8, TensorProto.UINT8),
    "onnx-int4": QdqFormat("onnx-int4", 21, 21, 4, TensorProto.INT4, TensorProto.UINT4),
}
#: integer range of each container type
_TYPE_RANGE = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
               TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}
#: container types ONNX ``Clip`` accepts (it has no 4-bit types)
_CLIP_TYPES = (TensorProto.INT8, TensorProto.UINT8)


def get_qdq_format(name: str) -> QdqFormat:
    """The registered format ``name``, or a one-line InvalidInputError listing the known ones."""
    fmt = QDQ_FORMATS.get(name)
    if fmt is None:
        raise InvalidInputError(f"unknown QDQ format {name!r}; choose one of {', '.join(QDQ_FORMATS)}")
    return fmt


def _int_tensor(name: str, values: np.ndarray, onnx_type: int) -> onnx.TensorProto:
    """An integer initializer of ``onnx_type``; 4-bit types are stored packed (two per byte)."""
    arr = np.array(values, order="C")  # np.array keeps 0-d scalars 0-d
    if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
        import ml_dtypes  # onnx's own dependency for its 4-bit types

        arr = arr.astype(ml_dtypes.int4 if onnx_type == TensorProto.INT4 else ml_dtypes.uint4)
    else:
        arr = arr.astype(helper.tensor_dtype_to_np_dtype(onnx_type))
    return numpy_helper.from_array(arr, name)


@dataclass
class _Graph:
    """Accumulates nodes, initializers and the ``apq.bits`` map while walking the net."""

    quantized: bool
    fmt: QdqFormat = QDQ_FORMATS["apq"]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    bits: dict[str, int] = field(default_factory=dict)

    def const(self, name: str, value: np.ndarray) -> str:
        # np.array, not np.ascontiguousarray: the latter turns 0-d scales into shape (1,)
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def int_const(self, name: str, value: np.ndarray, onnx_type: int) -> str:
        self.inits.append(_int_tensor(name, value, onnx_type))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def quant_act(self, x: str, name: str, bits: int | None, signed: bool, scale: float) -> str:
        """``QuantizeLinear -> [Clip to the b-bit range] -> DequantizeLinear`` (or ``x`` if float).

        The Clip is needed when the container holds more levels than b bits. In an 8-bit
        container it is an integer Clip after QuantizeLinear; ONNX Clip has no 4-bit types, so
        in a 4-bit container it is a float Clip to ``[lo*s, hi*s]`` *before* QuantizeLinear,
        which gives the same codes (quantize is monotone and maps the bounds to lo and hi).
        """
        if not self.quantized or bits is None:
            return x
        ctype = self.fmt.container(bits, signed)
        lo, hi = act_qrange(bits, signed)
        s32 = np.array(scale, dtype=np.float32)
        s = self.const(f"{name}.in_scale", s32)
        zp = self.int_const(f"{name}.in_zp", np.array(0), ctype)
        narrow = (lo, hi) != _TYPE_RANGE[ctype]
        if narrow and ctype not in _CLIP_TYPES:
            fmin = self.const(f"{name}.in_fmin", np.float32(lo) * s32)
            fmax = self.const(f"{name}.in_fmax", np.float32(hi) * s32)
            x = self.node("Clip", [x, fmin, fmax], f"{name}.in_fclip")
        q = self.node("QuantizeLinear", [x, s, zp], f"{name}.in_q")
        self.bits[q] = bits
        if narrow and ctype in _CLIP_TYPES:
            qmin = self.int_const(f"{name}.in_qmin", np.array(lo), ctype)
            qmax = self.int_const(f"{name}.in_qmax", np.array(hi), ctype)
            q = self.node("Clip", [q, qmin, qmax], f"{name}.in_qclip")
        return self.node("DequantizeLinear", [q, s, zp], f"{name}.in_dq")

    def weight(self, name: str, w: torch.Tensor, bits: int | None) -> str:
        """Per-output-channel ``DequantizeLinear`` of an INT8 initializer (or a float one)."""
        if not self.quantized or bits is None:
            return self.const(f"{name}.weight", w.detach().float().numpy())
        q, scale = weight_quant_params(w, bits)
        ctype = self.fmt.container(bits, signed=True)
        wq = self.int_const(f"{name}.weight_q", q.numpy().astype(np.int8), ctype)
        self.bits[wq] = bits
        s = self.const(f"{name}.weight_scale", scale.float().numpy())
        zp = self.int_const(f"{name}.weight_zp", np.zeros(scale.shape, dtype=np.int8), ctype)
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
    net: StaticNet, input_shape: tuple[int, int, int, int], quantized: bool = True, opset: int | None = None,
    qdq_format: str = "apq",
) -> onnx.ModelProto:
    """The checked ONNX model of ``net`` (not written); see :func:`export_onnx`."""
    shape = _check_input_shape(net, input_shape)
    fmt = get_qdq_format(qdq_format)
    opset = fmt.default_opset if opset is None else int(opset)
    if opset < fmt.min_opset:
        raise InvalidInputError(f"opset {opset} too old for QDQ format {fmt.name!r}: use >= {fmt.min_opset}")
    g = _Graph(quantized=quantized, fmt=fmt)
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
        meta[FORMAT_KEY] = fmt.name
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(
    net: StaticNet,
    path: str | Path,
    input_shape: tuple[int, int, int, int],
    quantized: bool = True,
    opset: int | None = None,
    qdq_format: str = "apq",
) -> Path:
    """Write ``net`` to ``path`` as ONNX and return the path.

    ``quantized=True``: apq QDQ convention for every layer with bits (float layers stay
    float); ``quantized=False``: plain Conv/Gemm with BN folded, no Q/DQ. Eval semantics
    (running BN statistics) are used whatever ``net.training`` says. ``qdq_format`` is a key
    of :data:`QDQ_FORMATS` (``"apq"``: 8-bit containers, opset 17 by default; ``"onnx-int4"``:
    INT4/UINT4 tensors for <= 4-bit layers, opset 21); ``opset=None`` is the format's default.
    """
    model = build_onnx(net, input_shape, quantized=quantized, opset=opset, qdq_format=qdq_format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
