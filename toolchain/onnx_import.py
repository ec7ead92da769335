"""Reading user ONNX files and turning them into a Relax IRModule, with one-line errors.

Why a module of its own: every user-facing command (compile, profile, verify) starts from a
file the user typed, and each way that file can be wrong (missing, not ONNX, unsupported
ops, unknown dynamic dims) must become one clear ApqError instead of a TVM traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apq.toolchain.errors import InvalidInputError, UnsupportedModelError

# ONNX TensorProto element type -> numpy dtype name (the ones a CNN input can have).
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64"}


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of a model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> "TensorSpec":
        return TensorSpec(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"])


def load_onnx(path: str | Path):
    """Load and check an ONNX file; any failure is an UnsupportedModelError/InvalidInputError.

    INT4/UINT4 QDQ tensors (opset 21) are rewritten here into apq's 8-bit-container convention
    (:func:`apq.toolchain.int4_onnx.rewrite_int4_qdq`, numerically identical), because TVM's
    importer cannot read 4-bit tensors and everything downstream (Relax import, QDQ lowering,
    bit-width report, verify tolerances) works on the returned model.
    """
    import onnx

    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"{p}: no such file")
    if not p.is_file():
        raise InvalidInputError(f"{p}: not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InvalidInputError(f"{p}: cannot read ({e.strerror})") from None
    try:
        model = onnx.load_from_string(data)
    except Exception:
        raise UnsupportedModelError(f"{p}: not an ONNX model (protobuf parse failed)") from None
    if len(model.graph.node) == 0:
        raise UnsupportedModelError(f"{p}: not an ONNX model (empty graph)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"{p}: invalid ONNX model: {first}") from None
    from apq.toolchain.int4_onnx import rewrite_int4_qdq

    try:
        model, _ = rewrite_int4_qdq(model)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{p}: {e}") from None
    return model


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def supported_ops() -> set[str]:
    """Op types the TVM Relax ONNX frontend converts (its converter registry)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return set(onnx_frontend._get_convert_map().keys())


def unsupported_ops(model) -> list[str]:
    """Sorted op types in the model (incl. subgraphs) that TVM cannot import."""
    known = supported_ops()
    bad = set()
    for node in _all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            bad.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
    return sorted(bad)


_SHAPE_RE = re.compile(r"^(?P<name>.+):(?P<dims>\d+(x\d+)*)$")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name:1x3x32x32`` as given to ``--input-shape``."""
    m = _SHAPE_RE.match(text.strip())
    if not m:
        raise InvalidInputError(f"bad --input-shape {text!r}; expected NAME:DxDxD, e.g. input:1x3x32x32")
    return m.group("name"), tuple(int(d) for d in m.group("dims").split("x"))


def graph_inputs(model) -> list:
    """Real inputs: graph inputs that are not initializers (old exporters list both)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def resolve_input_specs(model, overrides: dict[str, tuple[int, ...]] | None = None,
                        default_batch: int = 1) -> list[TensorSpec]:
    """Static shapes for every input: overrides first, then the file; a symbolic first dim
    (batch) defaults to ``default_batch``; any other unknown dim is an error asking for
    ``--input-shape``."""
    overrides = dict(overrides or {})
    specs = []
    inputs = graph_inputs(model)
    names = {i.name for i in inputs}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InvalidInputError(f"--input-shape names unknown input(s) {unknown}; model inputs: {sorted(names)}")
    for inp in inputs:
        tt = inp.type.tensor_type
        dtype = _ONNX_DTYPES.get(tt.elem_type)
        if dtype is None:
            raise UnsupportedModelError(f"input {inp.name!r} has unsupported element type {tt.elem_type}")
        if inp.name in overrides:
            shape = overrides[inp.name]
            if tt.HasField("shape") and len(tt.shape.dim) != len(shape):
                raise InvalidInputError(
                    f"--input-shape {inp.name}: rank {len(shape)} but the model says rank {len(tt.shape.dim)}")
            specs.append(TensorSpec(inp.name, tuple(shape), dtype))
            continue
        if not tt.HasField("shape"):
            raise InvalidInputError(
                f"input {inp.name!r} has no shape in the model; pass --input-shape {inp.name}:1x3x32x32 (your dims)")
        shape = []
        for axis, dim in enumerate(tt.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(int(dim.dim_value))
            elif axis == 0:
                shape.append(default_batch)
            else:
                label = dim.dim_param or "?"
                raise InvalidInputError(
                    f"input {inp.name!r} dim {axis} ({label}) is dynamic; pass --input-shape "
                    f"{inp.name}:{'x'.join(str(s) if s else 'N' for s in shape + [0])}... with all dims")
        specs.append(TensorSpec(inp.name, tuple(shape), dtype))
    return specs


def output_names(model) -> list[str]:
    return [o.name for o in model.graph.output]


def is_qdq_model(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def import_to_relax(model, input_specs: list[TensorSpec]):
    """Run TVM's Relax ONNX frontend; unsupported ops are named, other failures summarised."""
    from tvm.relax.frontend.onnx import from_onnx

    bad = unsupported_ops(model)
    if bad:
        raise UnsupportedModelError(f"unsupported ONNX op(s): {', '.join(bad)}")
    shape_dict = {s.name: list(s.shape) for s in input_specs}
    dtype_dict = {s.name: s.dtype for s in input_specs}
    try:
        return from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, sanitize_input_names=False)
    except Exception as e:  # TVM raises many types; the user needs one line
        msg = " ".join(str(e).strip().split())[:300] or type(e).__name__
        raise UnsupportedModelError(f"TVM could not import the model: {msg}") from None


def random_inputs(specs: list[TensorSpec], seed: int = 0) -> list[np.ndarray]:
    """Seeded inputs covering the dtype's useful range (normal floats, full-range ints)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        if s.dtype.startswith("float"):
            out.append(rng.standard_normal(s.shape).astype(s.dtype))
        elif s.dtype == "bool":
            out.append(rng.integers(0, 2, s.shape).astype(bool))
        else:
            info = np.iinfo(s.dtype)
            lo, hi = max(info.min, -128), min(info.max, 127)
            out.append(rng.integers(lo, hi + 1, s.shape).astype(s.dtype))
    return out


def load_inputs_npz(path: str | Path, specs: list[TensorSpec]) -> list[np.ndarray]:
    """Inputs from an .npz keyed by input name (or arr_0, arr_1, ... in input order)."""
    p = Path(path)
    try:
        data = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidInputError(f"{p}: no such file") from None
    except Exception:
        raise InvalidInputError(f"{p}: not a readable .npz file") from None
    out = []
    for i, s in enumerate(specs):
        key = s.name if s.name in data.files else f"arr_{i}" if f"arr_{i}" in data.files else None
        if key is None:
            raise InvalidInputError(f"{p}: no array for input {s.name!r} (keys: {data.files})")
        arr = np.asarray(data[key])
        if tuple(arr.shape) != tuple(s.shape):
            raise InvalidInputError(f"{p}: input {s.name!r} has shape {list(arr.shape)}, expected {list(s.shape)}")
        out.append(arr.astype(s.dtype, copy=False))
    return out
