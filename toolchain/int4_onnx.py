"""ONNX-level pre-pass: opset-21 INT4/UINT4 QDQ -> apq's 8-bit-container QDQ convention.

Why: TVM 0.27's Relax ONNX frontend cannot import 4-bit tensors at all (measured:
``Check failed: arr_size == nbytes (54 vs. 108) : TensorCopyFromBytes: size mismatch`` on a
packed INT4 conv weight), yet INT4 QDQ is the standard way other tools (and apq's own
``onnx-int4`` export mode) write 4-bit networks. The 4-bit values fit losslessly in int8/uint8,
and ``QuantizeLinear`` to INT4 is exactly ``QuantizeLinear`` to int8 followed by a clip to
[-8, 7] (saturation is a clip), so the rewrite below changes the encoding, never a number:

* every INT4/UINT4 initializer or ``Constant`` (weights, zero points; packed or not) becomes an
  INT8/UINT8 tensor of the same name and values;
* every ``QuantizeLinear`` with a 4-bit output gets an 8-bit zero point and is followed by an
  integer ``Clip`` to the 4-bit range (or to a narrower range, see below), which its
  ``DequantizeLinear`` consumers then read;
* a float ``Clip(x, lo*s, hi*s)`` whose only consumer is such a ``QuantizeLinear`` (how apq's
  exporter writes b < 4 bits, since ONNX ``Clip`` has no 4-bit types) is folded into that
  integer ``Clip`` as ``[round(lo), round(hi)]``: ``quantize`` is monotone, so
  ``quantize(clip(x, a, b)) == clip(quantize(x), quantize(a), quantize(b))`` exactly;
* ``apq.bits`` metadata gains the bit-width of each rewritten weight and activation (declared
  values of 4 or fewer bits are kept), which is what ``read_bits_hint`` reads.

The result is exactly the graph apq's own exporter writes in its default convention
(docs/qdq_convention.md), so the existing QDQ lowering handles it unchanged. Anything 4-bit this
cannot express that way (a 4-bit tensor read by an op other than Q/DQ, blocked quantization,
4-bit graph inputs/outputs, 4-bit tensors inside subgraphs) is a one-line UnsupportedModelError.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from apq.toolchain.errors import UnsupportedModelError
from apq.toolchain.layers import range_bits

BITS_KEY = "apq.bits"  # same key as apq.toolchain.qdq_lowering.BITS_KEY (kept import-light)


@dataclass(frozen=True)
class Container:
    """The 8-bit type that holds one 4-bit ONNX type, and the 4-bit range it must be clipped to."""

    onnx_type: int
    dtype: type
    lo: int
    hi: int


#: 4-bit ONNX element type -> its 8-bit container (the registry of what this pass rewrites).
CONTAINERS: dict[int, Container] = {
    TensorProto.INT4: Container(TensorProto.INT8, np.int8, -8, 7),
    TensorProto.UINT4: Container(TensorProto.UINT8, np.uint8, 0, 15),
}
_TYPE_NAMES = {TensorProto.INT4: "INT4", TensorProto.UINT4: "UINT4"}
#: the only ops that may read 4-bit tensors, and at which input positions
_READS_4BIT: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (2,),  # the zero point
    "DequantizeLinear": (0, 2),  # the quantized values and the zero point
}
#: |c/s - round(c/s)| below this and a float clip bound is taken as the integer level round(c/s)
_LEVEL_TOL = 1e-3


@dataclass
class Int4Rewrite:
    """What :func:`rewrite_int4_qdq` changed: tensor names -> bits (empty: no 4-bit tensors)."""

    weights: dict[str, int] = field(default_factory=dict)  # initializers now in 8-bit containers
    activations: dict[str, int] = field(default_factory=dict)  # QuantizeLinear outputs now clipped
    folded_clips: list[str] = field(default_factory=list)  # float Clip nodes folded into integer ones

    @property
    def changed(self) -> bool:
        return bool(self.weights or self.activations)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- detection


def _graphs(graph: onnx.GraphProto) -> Iterator[tuple[onnx.GraphProto, str | None]]:
    """The graph and every subgraph, each with the op type that owns it (None: the main graph)."""
    yield graph, None
    for node in graph.node:
        for attr in node.attribute:
            subs = ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs)
            for sub in subs:
                for g, _ in _graphs(sub):
                    yield g, node.op_type


def _value_type(v: onnx.ValueInfoProto) -> int:
    return v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else 0


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant":
        return None
    return next((a.t for a in node.attribute if a.name == "value"), None)


def _int_attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _graph_has_4bit(graph: onnx.GraphProto) -> bool:
    if any(t.data_type in CONTAINERS for t in graph.initializer):
        return True
    if any(_value_type(v) in CONTAINERS for v in [*graph.input, *graph.output, *graph.value_info]):
        return True
    for node in graph.node:
        t = _constant_tensor(node)
        if t is not None and t.data_type in CONTAINERS:
            return True
        if node.op_type in ("QuantizeLinear", "Cast") and (
                _int_attr(node, "output_dtype") in CONTAINERS or _int_attr(node, "to") in CONTAINERS):
            return True
    return False


def has_4bit_tensors(model: onnx.ModelProto) -> bool:
    """True if any (sub)graph declares an INT4/UINT4 tensor, i.e. the pre-pass has work to do."""
    return any(_graph_has_4bit(g) for g, _ in _graphs(model.graph))


# --------------------------------------------------------------------------- rewrite


class _Rewriter:
    """One run of the pre-pass over a (copied) model's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.report = Int4Rewrite()
        self.names = {n for node in self.graph.node for n in [*node.input, *node.output, node.name]}
        self.names |= {t.name for t in self.graph.initializer} | {i.name for i in self.graph.input}
        self.inits = {t.name: t for t in self.graph.initializer}
        self.constants = {node.output[0]: node for node in self.graph.node if _constant_tensor(node) is not None}
        #: every 4-bit tensor of the main graph -> its ONNX type
        self.four_bit: dict[str, int] = {}

    # ---- helpers

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def _array(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.constants.get(name)
        return numpy_helper.to_array(_constant_tensor(node)) if node is not None else None

    def _consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                out.setdefault(name, []).append(node)
        return out

    # ---- 1. find and validate every 4-bit tensor

    def classify(self) -> None:
        for g, owner in _graphs(self.graph):
            if owner is not None and _graph_has_4bit(g):
                raise UnsupportedModelError(f"INT4/UINT4 tensors inside a subgraph of {owner} are not supported")
        for v in [*self.graph.input, *self.graph.output]:
            if _value_type(v) in CONTAINERS:
                raise UnsupportedModelError(
                    f"graph input/output {v.name!r} is {_TYPE_NAMES[_value_type(v)]}: only Q/DQ-internal "
                    "4-bit tensors are supported")
        for t in self.graph.initializer:
            if t.data_type in CONTAINERS:
                self.four_bit[t.name] = t.data_type
        for name, node in self.constants.items():
            t = _constant_tensor(node)
            if t is not None and t.data_type in CONTAINERS:
                self.four_bit[name] = t.data_type
        for node in self.graph.node:  # topological order: a Q's zero point is known before its readers
            if node.op_type == "QuantizeLinear":
                out_type = self._quantize_type(node)
                if out_type in CONTAINERS:
                    self.four_bit[node.output[0]] = out_type
            elif node.op_type == "Cast" and _int_attr(node, "to") in CONTAINERS:
                raise UnsupportedModelError(
                    f"Cast node {node.name or node.output[0]!r} casts to {_TYPE_NAMES[_int_attr(node, 'to')]}: "
                    "only QuantizeLinear may produce 4-bit tensors")
        for node in self.graph.node:
            self._check_use(node)
        for g, owner in _graphs(self.graph):  # a subgraph reading a 4-bit tensor of the main graph
            for node in g.node if owner is not None else ():
                bad = next((n for n in node.input if n in self.four_bit), None)
                if bad is not None:
                    raise UnsupportedModelError(
                        f"4-bit tensor {bad!r} is used by {node.op_type} inside a subgraph of {owner}")

    def _quantize_type(self, node: onnx.NodeProto) -> int:
        """ONNX type of a QuantizeLinear's output: its zero point's, else ``output_dtype``'s."""
        if len(node.input) >= 3 and node.input[2]:
            return self.four_bit.get(node.input[2], 0)
        return _int_attr(node, "output_dtype")

    def _check_use(self, node: onnx.NodeProto) -> None:
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        allowed = _READS_4BIT.get(node.op_type, ())
        for i, name in enumerate(node.input):
            if name in self.four_bit and i not in allowed:
                raise UnsupportedModelError(
                    f"{_TYPE_NAMES[self.four_bit[name]]} tensor {name!r} is used by {label} (input {i}); "
                    "only QuantizeLinear/DequantizeLinear may read 4-bit tensors")
        touches = any(n in self.four_bit for n in [*node.input, *node.output])
        if node.op_type in _READS_4BIT and touches and _int_attr(node, "block_size") > 0:
            raise UnsupportedModelError(
                f"{label}: blocked 4-bit quantization (block_size={_int_attr(node, 'block_size')}) is not supported")

    # ---- 2. move 4-bit constants into 8-bit containers

    def widen_constants(self) -> None:
        for i, t in enumerate(self.graph.initializer):
            if t.data_type in CONTAINERS:
                self.graph.initializer[i].CopyFrom(self._widened(t))
        for node in self.constants.values():
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in CONTAINERS:
                    attr.t.CopyFrom(self._widened(attr.t))
        for v in self.graph.value_info:
            et = _value_type(v)
            if et in CONTAINERS:
                v.type.tensor_type.elem_type = CONTAINERS[et].onnx_type
        self.inits = {t.name: t for t in self.graph.initializer}

    @staticmethod
    def _widened(t: onnx.TensorProto) -> onnx.TensorProto:
        c = CONTAINERS[t.data_type]
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(c.dtype), t.name)

    def record_weights(self) -> None:
        for node in self.graph.node:
            if node.op_type == "DequantizeLinear":
                name = node.input[0]
                if self.four_bit.get(name) is not None and (name in self.inits or name in self.constants):
                    self.report.weights[name] = 4

    # ---- 3. QuantizeLinear to 4 bits -> QuantizeLinear to 8 bits + integer Clip

    def clip_quantizers(self) -> None:
        consumers = self._consumers()
        nodes = list(self.graph.node)
        producer = {o: i for i, n in enumerate(nodes) for o in n.output}
        clips: dict[int, onnx.NodeProto] = {}  # node index -> the Clip to insert after it
        dropped: set[int] = set()  # indices of float Clips folded into their quantizer
        for idx, node in enumerate(nodes):
            if node.op_type != "QuantizeLinear" or node.output[0] not in self.four_bit:
                continue
            c = CONTAINERS[self.four_bit[node.output[0]]]
            self._container_zero_point(node, c)
            lo, hi = c.lo, c.hi
            src = producer.get(node.input[0])
            folded = self._foldable_clip(node, nodes[src] if src is not None else None, consumers, c)
            if folded is not None:
                clip_node, lo, hi = folded
                node.input[0] = clip_node.input[0]
                dropped.add(src)
                self.report.folded_clips.append(clip_node.name or clip_node.output[0])
            q = node.output[0]
            # apq's names when the tensor follows apq's convention (<layer>.in_q), else <q>_q...
            base = q.removesuffix("_q") if q.endswith(".in_q") else q
            qmin = self._const(f"{base}_qmin", np.array(lo, dtype=c.dtype))
            qmax = self._const(f"{base}_qmax", np.array(hi, dtype=c.dtype))
            clipped = self._fresh(f"{base}_qclip")
            for reader in consumers.get(q, []):
                for i, name in enumerate(reader.input):
                    if name == q:
                        reader.input[i] = clipped
            clips[idx] = helper.make_node("Clip", [q, qmin, qmax], [clipped], name=clipped)
            self.report.activations[q] = range_bits(lo, hi)
        bounds = {n for idx in dropped for n in nodes[idx].input[1:]}
        ordered = []
        for idx, node in enumerate(nodes):
            if idx in dropped:
                continue
            ordered.append(onnx.NodeProto())
            ordered[-1].CopyFrom(node)  # copies: clearing the repeated field below detaches `node`
            if idx in clips:
                ordered.append(clips[idx])
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        if bounds:  # the folded clips' float bounds, unless something else reads them
            used = {n for node in self.graph.node for n in node.input} | {o.name for o in self.graph.output}
            for i in reversed(range(len(self.graph.initializer))):
                name = self.graph.initializer[i].name
                if name in bounds and name not in used:
                    del self.graph.initializer[i]
            self.inits = {t.name: t for t in self.graph.initializer}

    def _const(self, base: str, value: np.ndarray) -> str:
        name = self._fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def _container_zero_point(self, node: onnx.NodeProto, c: Container) -> None:
        """Give the QuantizeLinear an 8-bit zero point (its 4-bit one was widened in place, or it
        had none and named the type with ``output_dtype``), and drop ``output_dtype``."""
        kept = [a for a in node.attribute if a.name != "output_dtype"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if len(node.input) >= 3 and node.input[2]:
            return
        scale = self._array(node.input[1])
        if scale is None:
            raise UnsupportedModelError(
                f"QuantizeLinear {node.name or node.output[0]!r}: 4-bit output_dtype without a zero point "
                "needs a constant scale")
        zp = self._const(f"{node.output[0]}_zero_point", np.zeros(scale.shape, dtype=c.dtype))
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(zp)
        else:
            node.input[2] = zp

    def _foldable_clip(self, q: onnx.NodeProto, clip: onnx.NodeProto | None,
                       consumers: dict[str, list[onnx.NodeProto]], c: Container
                       ) -> tuple[onnx.NodeProto, int, int] | None:
        """A float Clip feeding only ``q`` with bounds on ``q``'s integer grid, as integer levels."""
        if clip is None or clip.op_type != "Clip" or len(clip.input) < 3 or len(consumers.get(clip.output[0], [])) != 1:
            return None
        if any(o.name == clip.output[0] for o in self.graph.output):
            return None
        scale, zp = self._array(q.input[1]), self._array(q.input[2])
        lo_f, hi_f = self._array(clip.input[1]), self._array(clip.input[2])
        if any(a is None or a.size != 1 for a in (scale, zp, lo_f, hi_f)):
            return None
        s = np.float32(scale.reshape(()))
        if not s > 0 or lo_f.dtype.kind != "f":
            return None
        levels = []
        for bound in (lo_f, hi_f):
            r = np.float32(bound.reshape(())) / s
            if not np.isfinite(r) or abs(float(r) - round(float(r))) > _LEVEL_TOL:
                return None  # not on the grid: keep the float clip (still exact), clip to the 4-bit range
            levels.append(int(np.clip(round(float(r)) + int(zp.reshape(())), c.lo, c.hi)))
        lo, hi = levels
        return (clip, lo, hi) if lo <= hi else None

    # ---- 4. metadata

    def write_bits(self) -> None:
        props = {p.key: p.value for p in self.model.metadata_props}
        try:
            declared = {str(k): int(v) for k, v in json.loads(props.get(BITS_KEY, "{}")).items()}
        except (ValueError, TypeError, AttributeError):
            return  # malformed: read_bits_hint reports it as the one-line error it already has
        merged = dict(declared)
        for name, bits in {**self.report.weights, **self.report.activations}.items():
            if name in declared and declared[name] > bits:
                raise UnsupportedModelError(
                    f"metadata {BITS_KEY} gives {name!r} {declared[name]} bits but it is a {bits}-bit tensor")
            merged.setdefault(name, bits)
        for name in self.report.weights:  # keep the report and the metadata in agreement
            self.report.weights[name] = merged[name]
        for name in self.report.activations:
            self.report.activations[name] = min(merged[name], self.report.activations[name])
        kept = [p for p in self.model.metadata_props if p.key != BITS_KEY]
        del self.model.metadata_props[:]
        self.model.metadata_props.extend(kept)
        helper.set_model_props(self.model, {**{p.key: p.value for p in kept},
                                            BITS_KEY: json.dumps(merged, sort_keys=True)})


def rewrite_int4_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Int4Rewrite]:
    """``model`` with every INT4/UINT4 Q/DQ tensor moved into apq's 8-bit-container convention.

    Returns ``(model, report)``; the input is returned untouched (same object) when it has no
    4-bit tensors, otherwise a rewritten copy. Numerically identical in onnxruntime (the
    saturation to 4 bits becomes an explicit integer Clip). Raises UnsupportedModelError (one
    line, naming the op and tensor) for 4-bit uses that have no 8-bit-container equivalent.
    """
    if not has_4bit_tensors(model):
        return model, Int4Rewrite()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rw = _Rewriter(out)
    rw.classify()
    rw.widen_constants()
    rw.record_weights()
    rw.clip_quantizers()
    rw.write_bits()
    try:
        onnx.checker.check_model(out)
    except Exception as e:  # a bug here, but the user still deserves one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"INT4 QDQ rewrite produced an invalid model: {first}") from None
    return out, rw.report
