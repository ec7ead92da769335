"""QDQ lowering: integer kernels really execute, and match onnxruntime's QDQ execution.

Models are tiny (a few channels, 8x8 inputs) so that a compile takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from apq.targets.registry import get_target  # noqa: E402
from apq.toolchain.errors import InvalidInputError  # noqa: E402
from apq.toolchain.layers import describe_layers  # noqa: E402
from apq.toolchain.qdq_lowering import lower_qdq, read_bits_hint  # noqa: E402

X_SHAPE = (1, 3, 8, 8)


# --------------------------------------------------------------------------- model builders


def _float_net(seed: int = 0) -> onnx.ModelProto:
    """conv3x3 -> relu -> depthwise3x3/s2 -> relu -> conv1x1 -> flatten -> Gemm (float)."""
    rng = np.random.RandomState(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.randn(*shape) * 0.3).astype(np.float32), name)

    inits = [w("w1", 8, 3, 3, 3), w("b1", 8), w("w2", 8, 1, 3, 3), w("b2", 8), w("w3", 6, 8, 1, 1), w("b3", 6),
             w("wf", 5, 96), w("bf", 5)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=8),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"]),
        helper.make_node("Flatten", ["c3"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X_SHAPE))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


class _Calib(CalibrationDataReader):
    def __init__(self) -> None:
        self._it = iter([{"x": np.random.RandomState(i).randn(*X_SHAPE).astype(np.float32)} for i in range(8)])

    def get_next(self):
        return next(self._it, None)


def _ort_qdq(tmp_path: Path, per_channel: bool, act: QuantType) -> onnx.ModelProto:
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_float_net(), src)
    quantize_static(str(src), str(dst), _Calib(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=act, weight_type=QuantType.QInt8)
    return onnx.load(dst)


def _apq_low_bit() -> onnx.ModelProto:
    """apq's convention by hand: int8 in -> 4-bit clip -> conv(w4) -> relu -> uint8 2-bit -> conv(w2) -> Gemm(w8)."""
    rng = np.random.RandomState(1)

    def arr(name: str, a: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(a, name)

    inits = [
        arr("w1_q", rng.randint(-8, 8, size=(6, 3, 3, 3)).astype(np.int8)),
        arr("w1_s", (rng.rand(6) * 0.05 + 0.02).astype(np.float32)), arr("w1_zp", np.zeros(6, np.int8)),
        arr("b1", (rng.randn(6) * 0.1).astype(np.float32)),
        arr("w2_q", rng.randint(-2, 2, size=(4, 6, 1, 1)).astype(np.int8)),
        arr("w2_s", (rng.rand(4) * 0.1 + 0.05).astype(np.float32)), arr("w2_zp", np.zeros(4, np.int8)),
        arr("wf_q", rng.randint(-127, 128, size=(5, 64)).astype(np.int8)),
        arr("wf_s", (rng.rand(5) * 0.01 + 0.001).astype(np.float32)), arr("wf_zp", np.zeros(5, np.int8)),
        arr("bf", (rng.randn(5) * 0.1).astype(np.float32)),
        arr("x_s", np.array(0.3, np.float32)), arr("x_zp", np.array(0, np.int8)),
        arr("x_lo", np.array(-8, np.int8)), arr("x_hi", np.array(7, np.int8)),
        arr("a_s", np.array(0.4, np.float32)), arr("a_zp", np.array(0, np.uint8)),
        arr("a_lo", np.array(0, np.uint8)), arr("a_hi", np.array(3, np.uint8)),
        arr("g_s", np.array(0.2, np.float32)), arr("g_zp", np.array(0, np.int8)),
    ]
    mk = helper.make_node
    nodes = [
        mk("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"]), mk("Clip", ["xq", "x_lo", "x_hi"], ["xqc"]),
        mk("DequantizeLinear", ["xqc", "x_s", "x_zp"], ["xd"]),
        mk("DequantizeLinear", ["w1_q", "w1_s", "w1_zp"], ["w1"], axis=0),
        mk("Conv", ["xd", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        mk("Relu", ["c1"], ["r1"]),
        mk("QuantizeLinear", ["r1", "a_s", "a_zp"], ["aq"]), mk("Clip", ["aq", "a_lo", "a_hi"], ["aqc"]),
        mk("DequantizeLinear", ["aqc", "a_s", "a_zp"], ["ad"]),
        mk("DequantizeLinear", ["w2_q", "w2_s", "w2_zp"], ["w2"], axis=0),
        mk("Conv", ["ad", "w2"], ["c2"]),
        mk("Flatten", ["c2"], ["f"]),
        mk("QuantizeLinear", ["f", "g_s", "g_zp"], ["gq"]), mk("DequantizeLinear", ["gq", "g_s", "g_zp"], ["gd"]),
        mk("DequantizeLinear", ["wf_q", "wf_s", "wf_zp"], ["wf"], axis=0),
        mk("Gemm", ["gd", "wf", "bf"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "lowbit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X_SHAPE))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, {"apq.qdq_convention": "1",
                                   "apq.bits": json.dumps({"w1_q": 4, "xq": 4, "w2_q": 2, "aq": 2, "wf_q": 8})})
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- helpers


def _import(model: onnx.ModelProto):
    return from_onnx(model, {"x": list(X_SHAPE)})


def _run_tvm(mod, xs: list[np.ndarray]) -> list[np.ndarray]:
    mod = relax.transform.DecomposeOpsForInference()(mod)
    ex = tvm.compile(mod, get_target("host").tvm())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return [vm["main"](tvm.runtime.tensor(x)).numpy() for x in xs]


def _run_ort(model: onnx.ModelProto, xs: list[np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [sess.run(None, {"x": x})[0] for x in xs]


def _output_step(model: onnx.ModelProto) -> float:
    """Scale of the last QuantizeLinear feeding the output (one output quantization step)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    return float(inits[q[-1].input[1]].reshape(-1)[0])


def _calls(mod, op_name: str) -> list:
    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == op_name:
                out.append(b.value)
    return out


def _inputs(n: int = 3) -> list[np.ndarray]:
    return [np.random.RandomState(100 + i).randn(*X_SHAPE).astype(np.float32) for i in range(n)]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("per_channel,act", [(True, QuantType.QUInt8), (False, QuantType.QUInt8),
                                             (True, QuantType.QInt8), (False, QuantType.QInt8)])
def test_ort_quantized_model_runs_integer_kernels_and_matches_ort(tmp_path, per_channel, act):
    model = _ort_qdq(tmp_path, per_channel, act)
    mod = _import(model)
    assert all(r.kernel.endswith("(fake-quant QDQ)") for r in describe_layers(mod))  # the import is fake quant

    lowered = lower_qdq(mod, read_bits_hint(model))

    # (a) every conv/matmul is an integer kernel with int32 accumulation; no float conv/matmul is left
    layers = describe_layers(lowered)
    assert [r.op for r in layers] == ["conv2d", "conv2d", "conv2d", "matmul"]
    act_dtype = "uint8" if act == QuantType.QUInt8 else "int8"
    for r in layers:
        assert r.kernel == f"{r.op}.{act_dtype}xint8->int32", r
        assert (r.weight_bits, r.activation_bits) == (8, 8)
    for op in ("relax.nn.conv2d", "relax.matmul"):
        calls = _calls(lowered, op)
        assert calls and all(str(c.ty.dtype) == "int32" and str(c.args[0].ty.dtype) == act_dtype for c in calls)
    depthwise = [c for c in _calls(lowered, "relax.nn.conv2d") if int(c.attrs.groups) == 8]
    assert len(depthwise) == 1

    # the zero-point padding path must be exercised: ORT gives the uint8 input a nonzero zero point,
    # and with int8 activations also the ReLU output feeding the depthwise conv (zero point -128)
    pads = _calls(lowered, "relax.nn.pad")
    assert len(pads) == (1 if act == QuantType.QUInt8 else 2)
    assert all(float(p.attrs.pad_value) != 0.0 for p in pads)
    # the zero point's share and the bias are one int32 constant added once per layer
    assert not _calls(lowered, "relax.subtract")
    int_adds = [c for c in _calls(lowered, "relax.add") if str(c.ty.dtype) == "int32"]
    assert len(int_adds) == len(layers), [str(c.ty.dtype) for c in _calls(lowered, "relax.add")]

    # (b) parity with onnxruntime's QDQ execution within one output quantization step
    xs = _inputs()
    step = _output_step(model)
    for got, ref in zip(_run_tvm(lowered, xs), _run_ort(model, xs)):
        assert np.max(np.abs(got - ref)) <= step * 1.001 + 1e-6


def test_lowering_does_not_modify_its_input(tmp_path):
    model = _ort_qdq(tmp_path, True, QuantType.QUInt8)
    mod = _import(model)
    lower_qdq(mod)
    assert all(str(c.ty.dtype) == "float32" for c in _calls(mod, "relax.nn.conv2d"))


def test_apq_low_bit_convention_reports_bits_and_matches_ort():
    model = _apq_low_bit()
    hint = read_bits_hint(model)
    lowered = lower_qdq(_import(model), hint)
    layers = describe_layers(lowered)
    got = [(r.name, r.kernel, r.weight_bits, r.activation_bits) for r in layers]
    assert got == [("w1_q", "conv2d.int8xint8->int32", 4, 4),
                   ("w2_q", "conv2d.uint8xint8->int32", 2, 2),
                   ("wf_q", "matmul.int8xint8->int32", 8, 8)]
    assert not [c for c in _calls(lowered, "relax.nn.conv2d") if str(c.ty.dtype) != "int32"]

    xs = _inputs()
    for got_y, ref in zip(_run_tvm(lowered, xs), _run_ort(model, xs)):
        # the output is a float Gemm of exact integers: only float32 rescale rounding differs
        assert np.max(np.abs(got_y - ref)) <= 1e-4 * max(1.0, float(np.max(np.abs(ref))))


def test_read_bits_hint_trusts_metadata_else_infers_from_clip():
    model = _apq_low_bit()
    hint = read_bits_hint(model)
    assert {k: hint[k] for k in ("w1_q", "xq", "w2_q", "aq", "wf_q", "gq")} == \
        {"w1_q": 4, "xq": 4, "w2_q": 2, "aq": 2, "wf_q": 8, "gq": 8}
    assert sum("@" in k for k in hint) == 3  # one fingerprint alias per weight

    del model.metadata_props[:]
    inferred = read_bits_hint(model)
    assert (inferred["xq"], inferred["aq"], inferred["gq"]) == (4, 2, 8)  # from the Clip ranges
    assert (inferred["w1_q"], inferred["w2_q"]) == (8, 8)  # no metadata: weights are 8-bit


def test_bad_bits_metadata_and_out_of_range_weights_are_user_errors():
    model = _apq_low_bit()
    helper.set_model_props(model, {"apq.bits": "not json"})
    with pytest.raises(InvalidInputError):
        read_bits_hint(model)

    model = _apq_low_bit()
    helper.set_model_props(model, {"apq.bits": json.dumps({"w1_q": 2})})  # w1_q holds 4-bit values
    with pytest.raises(InvalidInputError, match="w1_q"):
        lower_qdq(_import(model), read_bits_hint(model))


def test_declared_weight_ranges_admit_binary_levels():
    """1 bit is binary {-1, +1} in apq's QDQ convention (or two's complement {-1, 0}); every other
    width is two's complement. Before, the 1-bit check was two's complement only and rejected every
    binary layer apq's own exporter writes."""
    from apq.toolchain.qdq_lowering import weight_range_problem

    assert weight_range_problem(np.array([-1, 1, 1, -1], np.int8), 1) == ""
    assert weight_range_problem(np.array([-1, 0, 0], np.int8), 1) == ""
    assert "1-bit levels" in weight_range_problem(np.array([-1, 0, 1], np.int8), 1)
    assert "1-bit levels" in weight_range_problem(np.array([0, 1], np.int8), 1)
    assert weight_range_problem(np.array([-2, 1], np.int8), 2) == ""
    assert "[-2, 1]" in weight_range_problem(np.array([-2, 2], np.int8), 2)
    assert weight_range_problem(np.array([-128, 127], np.int8), 8) == ""
    assert weight_range_problem(np.zeros(0, np.int8), 1) == ""


def test_unlowerable_layer_stays_float_and_is_reported_as_fake_quant():
    """A nonzero *weight* zero point has no exact int8 x int8 form here: it must stay float."""
    model = _apq_low_bit()
    zp = next(t for t in model.graph.initializer if t.name == "w2_zp")
    zp.CopyFrom(numpy_helper.from_array(np.ones(4, np.int8), "w2_zp"))
    layers = describe_layers(lower_qdq(_import(model), read_bits_hint(model)))
    assert layers[1].kernel == "conv2d.float32(fake-quant QDQ)"
    assert (layers[1].weight_bits, layers[1].activation_bits) == (32, 32)
    assert layers[0].kernel == "conv2d.int8xint8->int32"


def test_float_model_passes_through_and_report_survives_decompose():
    """lower_qdq on a float model changes no kernel; describe_layers works on the compile pipeline's IR."""
    mod = _import(_float_net())
    lowered = relax.transform.DecomposeOpsForInference()(lower_qdq(mod, None))
    layers = describe_layers(lowered)
    assert [(r.kernel, r.weight_bits) for r in layers] == [("conv2d.float32", 32)] * 3 + [("matmul.float32", 32)]


def test_int8_pointwise_inputs_rebiased_to_uint8_are_exact(tmp_path):
    """x + 128 with zero point + 128 is the same integer conv: outputs must be identical."""
    import tvm
    from tvm import relax

    from apq.kernels.pipeline import compile_relax
    from apq.targets.registry import get_target
    from apq.toolchain.examples import mobilenetv2_onnx, quantize_qdq
    from apq.toolchain.layers import describe_layers
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs
    from apq.toolchain.qdq_lowering import lower_qdq, read_bits_hint

    fp = mobilenetv2_onnx(tmp_path / "f.onnx", width=0.25)
    model = load_onnx(quantize_qdq(fp, tmp_path / "q.onnx", activation_type="QInt8"))
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    outs, kernels = [], []
    for flag in (False, True):
        mod = lower_qdq(import_to_relax(model, resolve_input_specs(model)), read_bits_hint(model),
                        uint8_pointwise=flag)
        kernels.append([r.kernel for r in describe_layers(mod)])
        mod = relax.transform.DecomposeOpsForInference()(mod)
        vm = relax.VirtualMachine(compile_relax(mod, get_target("host").tvm()), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    assert "conv2d.uint8xint8->int32" not in kernels[0]
    assert kernels[1].count("conv2d.uint8xint8->int32") >= 5  # the pointwise convs


# --------------------------------------------------------------------------- float accumulation


def test_float_accumulation_bound_uses_the_actual_weights():
    """The exactness bound xmax * max_c sum|w[c]| <= 2^24, checked at its edge."""
    from apq.toolchain.qdq_lowering import F32_EXACT_INT, float_accumulation_is_exact

    assert float_accumulation_is_exact(np.full((8, 1, 3, 3), -128, np.int8), "uint8")  # 9*128*255
    assert float_accumulation_is_exact(np.full((4, 3, 7, 7), -128, np.int8), "uint8")  # 147*128*255
    edge = np.full((2, 1024, 1, 1), -128, np.int8)  # 1024 * 128 * 128 == 2^24 exactly: still exact
    assert 1024 * 128 * 128 == F32_EXACT_INT and float_accumulation_is_exact(edge, "int8")
    over = np.concatenate([edge, np.ones((2, 1, 1, 1), np.int8)], axis=1)  # one more unit: not
    assert not float_accumulation_is_exact(over, "int8")
    assert not float_accumulation_is_exact(np.full((2, 600, 3, 3), -128, np.int8), "uint8")
    assert float_accumulation_is_exact(np.ones((2, 600, 3, 3), np.int8), "uint8")  # small weights pass
    assert not float_accumulation_is_exact(np.ones((2, 1, 3, 3), np.int8), "int32")


def _float_acc_conv(x_shape, w: np.ndarray, stride: int, groups: int):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(x_shape), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=1, groups=groups,
                                           out_dtype="float32"))
            y = bb.emit_output(bb.emit(relax.op.astype(y, "int32")))
        bb.emit_func_output(y)
    return bb.get()


def _int_conv_reference(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    oc, icg, kh, kw = w.shape
    oh, ow = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kw) // stride + 1
    out = np.zeros((1, oc, oh, ow), np.int64)
    for o in range(oc):
        g = o // (oc // groups)
        for i in range(icg):
            for r in range(kh):
                for c in range(kw):
                    out[0, o] += w[o, i, r, c] * xp[0, g * icg + i, r:r + stride * oh:stride, c:c + stride * ow:stride]
    return out


@pytest.mark.parametrize("channels,groups,stride", [(16, 16, 1), (16, 16, 2), (3, 1, 2)])
def test_float_accumulated_int8_convs_are_exact_at_the_extremes(channels, groups, stride):
    """u8 x s8 KxK convs accumulated in float32 by apq's schedules give the int32 sums exactly,
    for the largest sums 8-bit operands allow (x = 255, w = -128 / 127)."""
    from apq.kernels.pipeline import compile_relax

    rng = np.random.default_rng(channels + stride)
    oc = channels if groups > 1 else 32
    w = rng.choice(np.array([-128, 127], np.int8), (oc, channels // groups, 3, 3))
    w[0] = -128  # one channel at the worst case
    x = np.where(rng.random((1, channels, 20, 20)) < 0.9, 255, rng.integers(0, 256, (1, channels, 20, 20)))
    x = x.astype(np.uint8)
    vm = relax.VirtualMachine(compile_relax(_float_acc_conv(x.shape, w, stride, groups), get_target("host").tvm()),
                              tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, _int_conv_reference(x, w, stride, groups))


def test_float_accumulation_past_the_bound_would_not_be_exact():
    """Negative control: the same float kernel with sums far above 2^24 rounds, so the bound
    (and the exactness test above) is not vacuous."""
    from apq.kernels.pipeline import compile_relax
    from apq.toolchain.qdq_lowering import float_accumulation_is_exact

    rng = np.random.default_rng(0)
    w = rng.integers(100, 128, (2, 1200, 3, 3)).astype(np.int8)
    assert not float_accumulation_is_exact(w, "uint8")
    x = rng.integers(200, 256, (1, 1200, 4, 4)).astype(np.uint8)
    vm = relax.VirtualMachine(compile_relax(_float_acc_conv(x.shape, w, 1, 1), get_target("host").tvm()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert np.any(got != _int_conv_reference(x, w, 1, 1))


def test_lowering_accumulates_kxk_convs_in_float_only_when_asked_and_stays_exact(tmp_path):
    """float_accumulation: KxK convs (stem, depthwise) get float32 accumulators, 1x1 convs keep
    int32; the model's outputs are identical to the all-int32 lowering."""
    model = _ort_qdq(tmp_path, True, QuantType.QUInt8)
    xs = _inputs(3)
    outs, kernels = [], []
    for flag in (False, True):
        lowered = lower_qdq(_import(model), read_bits_hint(model), float_accumulation=flag)
        kernels.append([(r.kernel, r.weight_bits, r.activation_bits) for r in describe_layers(lowered)])
        outs.append(_run_tvm(lowered, xs))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    assert all(k.endswith("->int32") for k, _, _ in kernels[0])
    assert [k for k, _, _ in kernels[1]][:2] == ["conv2d.uint8xint8->float32"] * 2  # stem, depthwise
    assert kernels[1][2][0] == "conv2d.uint8xint8->int32"  # the 1x1 conv
    assert [(w, a) for _, w, a in kernels[0]] == [(w, a) for _, w, a in kernels[1]]  # still 8-bit layers


def test_float_accumulated_convs_add_their_bias_in_float_with_identical_outputs(tmp_path, monkeypatch):
    """Where exact (:func:`_float_offset_is_exact`), a float-accumulated conv adds its bias and
    zero-point offset in float32: no ``astype`` to int32 and back in its epilogue. Outputs are
    bit-identical to the int32 route, which a too-large offset still takes."""
    from apq.toolchain import qdq_lowering
    from apq.toolchain.qdq_lowering import F32_EXACT_INT, _float_offset_is_exact

    model = _ort_qdq(tmp_path, True, QuantType.QUInt8)
    xs = _inputs(3)
    fast = lower_qdq(_import(model), read_bits_hint(model), float_accumulation=True)
    to_int = [c for c in _calls(fast, "relax.astype") if str(c.attrs.dtype) == "int32"]
    float_convs = [c for c in _calls(fast, "relax.nn.conv2d") if str(c.attrs.out_dtype) == "float32"]
    assert len(float_convs) == 2 and not to_int  # stem and depthwise, no int32 round trip
    monkeypatch.setattr(qdq_lowering, "_float_offset_is_exact", lambda *a: False)
    slow = lower_qdq(_import(model), read_bits_hint(model), float_accumulation=True)
    assert len([c for c in _calls(slow, "relax.astype") if str(c.attrs.dtype) == "int32"]) == 2
    for a, b in zip(_run_tvm(fast, xs), _run_tvm(slow, xs)):
        np.testing.assert_array_equal(a, b)
    # the bound: |acc| <= 255 * 9 * 128 for this depthwise weight, plus the largest |offset|
    w = np.full((4, 1, 3, 3), -128, np.int8)
    room = F32_EXACT_INT - 255 * 9 * 128
    assert _float_offset_is_exact(w, "uint8", np.array([0, -room, 5, 0]))
    assert not _float_offset_is_exact(w, "uint8", np.array([0, -room - 1, 5, 0]))
    assert not _float_offset_is_exact(w, "int32", np.zeros(4, np.int64))
