"""apq-compile parity with onnxruntime (and with the ONNX backend suite's expected outputs)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from apq.toolchain.artifact import open_artifact
from apq.toolchain.compile import compile_onnx
from apq.toolchain.runtime import run_artifact
from apq.toolchain.verify import verify_artifact


def _tiny(tmp_path: Path, name: str, nodes, inits, in_shape, out_shape) -> Path:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    p = tmp_path / f"{name}.onnx"
    onnx.save(model, p)
    return p


def _w(rng, *shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, f"w{len(shape)}_{shape[0]}")


def _op_family_models(tmp_path: Path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    dw = numpy_helper.from_array(rng.standard_normal((4, 1, 5, 5)).astype(np.float32), "dw")
    fc = numpy_helper.from_array(rng.standard_normal((6, 4 * 4 * 4)).astype(np.float32), "fc")
    scale = numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "s")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    mean = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m")
    var = numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "v")
    return {
        "conv_strided_dilated": _tiny(tmp_path, "conv", [
            helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[2, 2, 2, 2], dilations=[2, 2]),
            helper.make_node("Relu", ["c"], ["y"])], [w], [1, 4, 9, 9], [1, 8, 5, 5]),
        "depthwise_5x5_bn_relu6": _tiny(tmp_path, "dw", [
            helper.make_node("Conv", ["x", "dw"], ["c"], group=4, pads=[2, 2, 2, 2]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
            helper.make_node("Clip", ["n", "lo", "hi"], ["y"])],
            [dw, scale, bias, mean, var, numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")], [1, 4, 8, 8], [1, 4, 8, 8]),
        "pool_flatten_gemm_softmax": _tiny(tmp_path, "pool", [
            helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("AveragePool", ["p"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                             count_include_pad=0),
            helper.make_node("Flatten", ["a"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["g"], transB=1),
            helper.make_node("Softmax", ["g"], ["y"])], [fc], [1, 4, 8, 8], [1, 6]),
    }


def test_op_families_match_onnxruntime(tmp_path):
    for family, path in _op_family_models(tmp_path).items():
        res = compile_onnx(path, "host", tmp_path / f"{family}.apq")
        rep = verify_artifact(open_artifact(res.artifact_path, "host"), path, seed=1)
        assert rep.passed, (family, rep.to_json())
        assert rep.max_abs_err < 1e-4, family


def test_mobilenetv2_float_matches_onnxruntime(mbv2_host_artifact, mbv2_float):
    art = open_artifact(mbv2_host_artifact, "host")
    rep = verify_artifact(art, mbv2_float, seed=3)
    assert rep.passed and rep.argmax_agreement == 1.0
    kernels = {layer["kernel"] for layer in art.manifest["layers"]}
    assert all(layer["weight_bits"] == 32 for layer in art.manifest["layers"]), kernels
    assert sum(1 for layer in art.manifest["layers"] if layer["op"] == "conv2d") >= 20


def test_resnet_matches_onnxruntime(tmp_path, resnet_float):
    res = compile_onnx(resnet_float, "host", tmp_path / "resnet.apq")
    rep = verify_artifact(open_artifact(res.artifact_path), resnet_float)
    assert rep.passed, rep.to_json()


def test_qdq_fake_quant_is_reported_as_float(tmp_path, mbv2_qdq):
    """Without integer lowering, TVM runs QDQ as float: the manifest must say so, not 'int8'."""
    from apq.toolchain.compile import CompileOptions

    res = compile_onnx(mbv2_qdq, "host", tmp_path / "fq.apq", options=CompileOptions(lower_qdq=False))
    layers = res.manifest["layers"]
    assert layers and all(layer["weight_bits"] == 32 and layer["activation_bits"] == 32 for layer in layers)
    rep = verify_artifact(open_artifact(res.artifact_path), mbv2_qdq)
    assert rep.passed, rep.to_json()


# ONNX's own backend test models, checked against the expected outputs shipped with them.
BACKEND_CASES = [
    "pytorch-converted/test_Conv2d", "pytorch-converted/test_Conv2d_depthwise",
    "pytorch-converted/test_Conv2d_depthwise_strided", "pytorch-converted/test_Conv2d_depthwise_with_multiplier",
    "pytorch-converted/test_Conv2d_groups", "pytorch-converted/test_Conv2d_dilated",
    "pytorch-converted/test_Conv2d_strided", "pytorch-converted/test_Conv2d_padding",
    "pytorch-converted/test_Conv2d_no_bias", "pytorch-converted/test_AvgPool2d_stride",
    "pytorch-converted/test_MaxPool2d", "pytorch-converted/test_BatchNorm2d_eval",
    "pytorch-converted/test_Linear", "pytorch-converted/test_ReLU", "pytorch-converted/test_Sigmoid",
    "pytorch-converted/test_LeakyReLU", "pytorch-converted/test_Softmax", "pytorch-converted/test_PReLU_2d",
    "pytorch-operator/test_operator_maxpool", "pytorch-operator/test_operator_add_broadcast",
]
_BACKEND_ROOT = Path(onnx.__file__).parent / "backend" / "test" / "data"


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_onnx_backend_model(tmp_path, case):
    case_dir = _BACKEND_ROOT / case
    if not case_dir.exists():
        pytest.skip(f"{case} not shipped in this onnx wheel")
    model_path = case_dir / "model.onnx"
    data_dir = case_dir / "test_data_set_0"
    inputs = [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in sorted(data_dir.glob("input_*.pb"))]
    expected = [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in sorted(data_dir.glob("output_*.pb"))]
    res = compile_onnx(model_path, "host", tmp_path / "m.apq")
    got = run_artifact(open_artifact(res.artifact_path, "host"), inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_mobilenetv2_qdq_runs_integer_kernels_and_matches_onnxruntime(tmp_path, mbv2_qdq):
    res = compile_onnx(mbv2_qdq, "host", tmp_path / "q.apq")
    layers = res.manifest["layers"]
    assert len(layers) >= 20
    assert all(layer["weight_bits"] == 8 and layer["activation_bits"] == 8 for layer in layers), layers
    # integer operands (int32 accumulation, or float32 accumulation proven exact), never fake quant
    assert all(re.search(r"int8xu?int8->(int32|float32)$", layer["kernel"]) and layer["impl"] != "float" for layer in layers)
    art = open_artifact(res.artifact_path)
    for seed in range(6):  # several inputs: a rounding-order change (e.g. a folded requantize) fails only some
        rep = verify_artifact(art, mbv2_qdq, seed=seed)
        assert rep.passed, (seed, rep.to_json())
    assert rep.outputs[0].tolerance_rule == "output DequantizeLinear scale"


@pytest.mark.qemu
@pytest.mark.parametrize("which", ["float", "qdq"])
def test_arm_artifact_matches_onnxruntime_under_qemu(tmp_path, which, mbv2_float, mbv2_qdq):
    from apq.targets.qemu import qemu_available

    ok, why = qemu_available()
    if not ok:
        pytest.skip(why)
    model = mbv2_float if which == "float" else mbv2_qdq
    res = compile_onnx(model, "raspberry-pi/4b-aarch64", tmp_path / "arm.apq")
    art = open_artifact(res.artifact_path, "raspberry-pi/4b-aarch64")
    rep = verify_artifact(art, model, seed=4)
    assert rep.executed_on == "qemu-aarch64"
    assert rep.passed, rep.to_json()
