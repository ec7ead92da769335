"""Verifying an artifact against onnxruntime on the same ONNX file.

Tolerance policy (why): a float model compiled by TVM should agree with onnxruntime to
float rounding (1e-4 absolute, or relative to the output's magnitude). A quantized model
legitimately differs where a value sits on a rounding boundary and the two runtimes round
an intermediate differently (1-LSB flips), so the bound is one quantization step of the
output: the output DequantizeLinear's scale, or, when the output is a float layer fed by
quantized activations, one input step propagated through that layer's weights.
The reference is onnxruntime with graph optimizations disabled, i.e. the ONNX operators'
own semantics (see onnxruntime_outputs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from apq.toolchain.artifact import LoadedArtifact
from apq.toolchain.errors import InvalidInputError
from apq.toolchain.onnx_import import is_qdq_model, load_inputs_npz, load_onnx
from apq.toolchain.runtime import run_artifact

FLOAT_ATOL = 1e-4


@dataclass
class OutputCheck:
    name: str
    max_abs_err: float
    tolerance: float
    tolerance_rule: str
    passed: bool


@dataclass
class VerifyReport:
    target: str
    executed_on: str
    quantized: bool
    outputs: list[OutputCheck]
    argmax_agreement: float | None

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    def to_json(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        d["max_abs_err"] = self.max_abs_err
        return d


def ort_session(onnx_path: str | Path, threads: int = 1, reference_semantics: bool = False):
    """An onnxruntime CPU session with ``threads`` intra-op threads (benchmarks compare at equal
    threads). With ``reference_semantics`` graph optimizations are off, so QDQ runs as the ONNX
    spec defines it (dequantize -> float op -> quantize); ORT's optimized path fuses QDQ into
    QLinearConv, whose different requantization rounding flips LSBs (measured: optimized vs
    unoptimized ORT differ by 2 output steps on an int8 MobileNetV2 for some inputs, while apq
    matched unoptimized ORT exactly)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if reference_semantics:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def onnxruntime_outputs(onnx_path: str | Path, input_names: list[str], inputs: list[np.ndarray],
                        threads: int = 1, reference_semantics: bool = True) -> list[np.ndarray]:
    """onnxruntime's outputs, by default with the operators' reference semantics (see ort_session)."""
    sess = ort_session(onnx_path, threads, reference_semantics)
    return sess.run(None, dict(zip(input_names, inputs)))


def _initializer(model, name):
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def quantized_output_step(model, output_name: str) -> tuple[float, str]:
    """One quantization step of ``output_name`` (see module docstring), and how it was found."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(output_name)
    # Look through shape-only ops between the last quantized layer and the output.
    while node is not None and node.op_type in ("Reshape", "Flatten", "Squeeze", "Identity", "Transpose"):
        node = producers.get(node.input[0])
    if node is None:
        return FLOAT_ATOL, "no producer: float tolerance"
    if node.op_type == "DequantizeLinear":
        scale = _initializer(model, node.input[1])
        if scale is not None:
            return float(np.max(scale)), "output DequantizeLinear scale"
    if node.op_type in ("Gemm", "MatMul", "Conv") and len(node.input) >= 2:
        x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
        if x_dq is not None and x_dq.op_type == "DequantizeLinear":
            s_x = _initializer(model, x_dq.input[1])
            if w_dq is not None and w_dq.op_type == "DequantizeLinear":
                w_q, s_w = _initializer(model, w_dq.input[0]), _initializer(model, w_dq.input[1])
                w = None if w_q is None or s_w is None else w_q.astype(np.float64) * _per_axis(s_w, w_q, node)
            else:
                w = _initializer(model, node.input[1])
            if s_x is not None and w is not None:
                axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and _trans_b(node)) else -1
                l1 = np.abs(w).reshape(w.shape[0], -1).sum(1) if axis == 0 else np.abs(w).sum(0)
                return float(np.max(s_x) * np.max(l1)), "one input step through the output layer's weights"
    return FLOAT_ATOL, "float tolerance"


def _trans_b(node) -> bool:
    return any(a.name == "transB" and a.i == 1 for a in node.attribute)


def _per_axis(scale: np.ndarray, q: np.ndarray, node) -> np.ndarray:
    if scale.ndim == 0 or scale.size == 1:
        return scale.astype(np.float64)
    shape = [1] * q.ndim
    shape[0] = scale.size
    return scale.reshape(shape).astype(np.float64)


def verify_artifact(art: LoadedArtifact, onnx_path: str | Path, inputs_npz: str | Path | None = None,
                    seed: int = 0) -> VerifyReport:
    """Run the artifact and onnxruntime on the same inputs and compare every output."""
    model = load_onnx(onnx_path)
    specs = art.input_specs
    inputs = load_inputs_npz(inputs_npz, specs) if inputs_npz else art.random_inputs(seed)
    ref = onnxruntime_outputs(onnx_path, [s.name for s in specs], inputs)
    got = run_artifact(art, inputs)
    if len(ref) != len(got):
        raise InvalidInputError(f"artifact has {len(got)} outputs but {onnx_path} has {len(ref)}: wrong model?")
    quantized = is_qdq_model(model)
    checks, agreement = [], None
    for spec_name, r, g in zip([o.name for o in model.graph.output], ref, got):
        if tuple(r.shape) != tuple(g.shape):
            raise InvalidInputError(f"output {spec_name!r}: shape {list(g.shape)} vs onnxruntime {list(r.shape)}")
        err = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
        if quantized:
            tol, rule = quantized_output_step(model, spec_name)
            tol = max(tol, FLOAT_ATOL)
        else:
            tol = max(FLOAT_ATOL, FLOAT_ATOL * float(np.max(np.abs(r)))) if r.size else FLOAT_ATOL
            rule = "float: 1e-4 absolute or relative to max |output|"
        checks.append(OutputCheck(spec_name, err, tol, rule, bool(err <= tol * (1 + 1e-6))))
        if agreement is None and r.ndim == 2 and r.shape[1] > 1:
            agreement = float(np.mean(np.argmax(r, 1) == np.argmax(g, 1)))
    from apq.targets.registry import get_target

    executor = get_target(art.target).executor
    where = {"local": "host CPU", "simulator": "host CPU (bit-serial kernels)", "qemu": "qemu-aarch64"}.get(
        executor, executor)
    return VerifyReport(art.target, where, quantized, checks, agreement)
