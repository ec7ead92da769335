"""QDQ / float ONNX export of StaticNets: parity with onnxruntime, the ``apq.bits`` metadata,
and exact agreement of the quantized activation codes (the apq QDQ convention)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from apq.toolchain.errors import InvalidInputError
from apq.toolchain.supernet.qlayers import (
    InvertedResidual,
    QConvBNAct,
    QLinear,
    StaticNet,
    act_qrange,
    calibrate_net,
    randomize_batchnorm,
    export_onnx,
)

SHAPE = (1, 3, 24, 24)


def _make_net(bits: bool, seed: int = 0) -> StaticNet:
    """A tiny random MobileNetV2-style net; mixed 2/4/8 bits (or all float)."""
    torch.manual_seed(seed)

    def b(v: int) -> int | None:
        return v if bits else None

    stem = QConvBNAct(3, 8, 3, 2, in_signed=True, w_bits=b(8), a_bits=b(8))
    blocks = [
        InvertedResidual(8, 8, 8, 3, 1, b(4), b(4), b(2), b(2)),  # no expand, residual
        InvertedResidual(8, 24, 16, 5, 2, b(2), b(4), b(8), b(4)),
        InvertedResidual(16, 32, 16, 3, 1, b(4), b(2), b(4), b(8)),  # residual
    ]
    head = QConvBNAct(16, 32, 1, in_signed=True, w_bits=b(8), a_bits=b(8))
    net = StaticNet(stem, blocks, head, QLinear(32, 10, w_bits=b(8), a_bits=b(8)))
    g = torch.Generator().manual_seed(seed)
    randomize_batchnorm(net, g)
    net.eval()
    calibrate_net(net, torch.randn(8, *SHAPE[1:], generator=g))
    return net


def _session(model: onnx.ModelProto | Path, optimize: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:  # reference semantics, no QLinearConv fusion
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _inputs(n: int, seed: int = 1) -> list[np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*SHAPE, generator=g).numpy() for _ in range(n)]


def _torch(net: StaticNet, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def qnet() -> StaticNet:
    return _make_net(bits=True)


@pytest.fixture(scope="module")
def qmodel(qnet: StaticNet, tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    path = export_onnx(qnet, tmp_path_factory.mktemp("qdq") / "q.onnx", SHAPE)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_float_export_matches_eval_torch(tmp_path: Path) -> None:
    net = _make_net(bits=False)
    path = export_onnx(net, tmp_path / "f.onnx", SHAPE)  # all bits None -> float graph
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "BatchNormalization"}
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    sess = _session(path)
    for x in _inputs(3):
        np.testing.assert_allclose(sess.run(None, {"input": x})[0], _torch(net, x), atol=1e-4, rtol=0)


def test_quantized_false_exports_float_weights_of_a_quantized_net(qnet: StaticNet, tmp_path: Path) -> None:
    model = onnx.load(str(export_onnx(qnet, tmp_path / "f.onnx", SHAPE, quantized=False)))
    ops = {n.op_type for n in model.graph.node}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    props = {p.key: p.value for p in model.metadata_props}
    assert "apq.bits" not in props and "apq.qdq_convention" not in props


def one_step_tolerance(net: StaticNet) -> float:
    """One quantization step of the logits: a step of every classifier input moves a logit by at
    most s_in * ||W_row||_1 (shared with tests/test_int4_onnx.py)."""
    from apq.toolchain.supernet.qlayers import fake_quant_weight

    w = net.classifier.linear.weight.detach()
    s_in = float(net.classifier.act_quant.scale(net.classifier.a_bits))
    return s_in * float(fake_quant_weight(w, net.classifier.w_bits).abs().sum(dim=1).max())


def test_quantized_export_matches_torch_within_one_step(qnet: StaticNet, qmodel: onnx.ModelProto) -> None:
    tol = one_step_tolerance(qnet)
    ref_sess, opt_sess = _session(qmodel), _session(qmodel, optimize=True)
    xs = _inputs(6)
    agree = 0
    for x in xs:
        yt = _torch(qnet, x)
        assert np.abs(ref_sess.run(None, {"input": x})[0] - yt).max() <= tol
        # ORT's default optimizations fuse to QLinearConv, whose integer requantization may
        # flip codes in several layers: looser bound, measured ~0.65 * tol here
        assert np.abs(opt_sess.run(None, {"input": x})[0] - yt).max() <= 2 * tol
        agree += int(ref_sess.run(None, {"input": x})[0].argmax() == yt.argmax())
    assert agree == len(xs)
    # and the quantized model is not secretly the float one
    qnet_float = _make_net(bits=False)
    assert max(np.abs(_torch(qnet_float, x) - _torch(qnet, x)).max() for x in xs) > tol / 100


def test_bits_metadata_and_convention(qnet: StaticNet, qmodel: onnx.ModelProto) -> None:
    props = {p.key: p.value for p in qmodel.metadata_props}
    assert props["apq.qdq_convention"] == "1"
    bits: dict[str, int] = json.loads(props["apq.bits"])
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    nodes = list(qmodel.graph.node)
    q_outputs = {n.output[0]: n for n in nodes if n.op_type == "QuantizeLinear"}
    consumers = {i: n for n in nodes for i in n.input}
    expected: dict[str, int] = {}
    for name, layer in qnet.quant_layers():
        expected[f"{name}.weight_q"] = layer.w_bits
        expected[f"{name}.in_q"] = layer.a_bits
    assert bits == expected
    assert set(q_outputs) == {k for k in bits if k.endswith(".in_q")}
    for key, b in bits.items():
        if key.endswith(".weight_q"):  # INT8 container holding b-bit symmetric levels
            arr = inits[key]
            assert arr.dtype == np.int8
            qmax = max(2 ** (b - 1) - 1, 1)
            assert arr.min() >= -qmax and arr.max() <= qmax and arr.max() > (0 if b > 1 else -1)
            dq = consumers[key]
            assert dq.op_type == "DequantizeLinear" and helper.get_attribute_value(dq.attribute[0]) == 0
            assert inits[dq.input[2]].dtype == np.int8 and not inits[dq.input[2]].any()
            continue
        qnode = q_outputs[key]
        zp = inits[qnode.input[2]]
        signed = zp.dtype == np.int8
        assert zp.dtype in (np.int8, np.uint8) and zp.shape == () and zp == 0
        assert inits[qnode.input[1]].shape == () and inits[qnode.input[1]].dtype == np.float32  # per tensor
        nxt = consumers[key]
        if b < 8:  # integer Clip to the b-bit range, same 8-bit type
            assert nxt.op_type == "Clip"
            lo, hi = inits[nxt.input[1]], inits[nxt.input[2]]
            assert lo.dtype == zp.dtype and hi.dtype == zp.dtype
            assert (int(lo), int(hi)) == act_qrange(b, signed)
        else:
            assert nxt.op_type == "DequantizeLinear"
    layers = dict(qnet.quant_layers())
    assert inits["stem.in_zp"].dtype == np.int8  # normalised images are signed
    assert inits["blocks.1.depthwise.in_zp"].dtype == np.uint8  # after ReLU6
    assert layers["blocks.0.depthwise"].in_signed and inits["blocks.0.depthwise.in_zp"].dtype == np.int8


def test_ort_activation_codes_equal_torch_fake_quant(qnet: StaticNet, qmodel: onnx.ModelProto) -> None:
    """At every quantizer: same input -> same integer codes; end to end -> same codes (rare 1-LSB
    flips allowed past the first layer, where float conv summation order differs)."""
    model = onnx.ModelProto()
    model.CopyFrom(qmodel)
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    names = [n.output[0].removesuffix(".in_q") for n in q_nodes]
    final_codes = {}
    for n, name in zip(q_nodes, names):
        clip = [c for c in model.graph.node if c.op_type == "Clip" and c.input[0] == n.output[0]]
        final_codes[name] = clip[0].output[0] if clip else n.output[0]
        model.graph.output.append(helper.make_empty_tensor_value_info(n.input[0]))
        model.graph.output.append(helper.make_empty_tensor_value_info(final_codes[name]))
    sess = _session(model)
    out_names = [o.name for o in sess.get_outputs()]
    layers = dict(qnet.quant_layers())
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layers[name].register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].clone()))
        for name in names
    ]
    try:
        for x in _inputs(2, seed=5):
            res = dict(zip(out_names, sess.run(None, {"input": x})))
            _torch(qnet, x)
            total = flips = 0
            for qn, name in zip(q_nodes, names):
                layer = layers[name]
                scale = layer.act_quant.scale(layer.a_bits)
                codes_ort = res[final_codes[name]].astype(np.int64)
                # 1. identical input: ORT's pre-quant tensor through torch's fake-quant
                pre = torch.from_numpy(res[qn.input[0]])
                mine = torch.round(layer.act_quant(pre, layer.a_bits) / scale).to(torch.int64).numpy()
                np.testing.assert_array_equal(mine, codes_ort, err_msg=name)
                # 2. end to end: torch's own intermediate tensor
                e2e = torch.round(layer.act_quant(seen[name], layer.a_bits) / scale).to(torch.int64).numpy()
                diff = np.abs(e2e - codes_ort)
                if name == "stem":
                    assert diff.max() == 0
                assert diff.max() <= 1, name
                total, flips = total + diff.size, flips + int((diff > 0).sum())
            assert flips <= 0.01 * total  # measured: 0 flips of 12992 codes
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("opset", [13, 21])
def test_other_opsets_run_in_ort(qnet: StaticNet, tmp_path: Path, opset: int) -> None:
    path = export_onnx(qnet, tmp_path / "q.onnx", SHAPE, opset=opset)
    x = _inputs(1)[0]
    ref = _session(onnx.load(str(export_onnx(qnet, tmp_path / "r.onnx", SHAPE)))).run(None, {"input": x})[0]
    np.testing.assert_array_equal(_session(path).run(None, {"input": x})[0], ref)


def test_bad_input_shape_raises(qnet: StaticNet, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        export_onnx(qnet, tmp_path / "x.onnx", (1, 1, 24, 24))
    with pytest.raises(InvalidInputError):
        export_onnx(qnet, tmp_path / "x.onnx", (1, 3, 24))  # type: ignore[arg-type]


@pytest.mark.slow
def test_tvm_imports_the_convention_and_matches_ort(qmodel: onnx.ModelProto) -> None:
    """TVM 0.27 runs the int8-container QDQ graph exactly like onnxruntime (why the convention)."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = relax.transform.DecomposeOpsForInference()(from_onnx(qmodel, shape_dict={"input": list(SHAPE)}))
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    x = _inputs(1, seed=9)[0]
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, _session(qmodel).run(None, {"input": x})[0], atol=1e-5, rtol=0)


def test_float_layer_inside_a_quantized_export(tmp_path: Path) -> None:
    net = _make_net(bits=True, seed=3)
    net.blocks[1].depthwise.w_bits = None
    net.blocks[1].depthwise.a_bits = None
    model = onnx.load(str(export_onnx(net, tmp_path / "m.onnx", SHAPE)))
    bits = json.loads({p.key: p.value for p in model.metadata_props}["apq.bits"])
    assert "blocks.1.depthwise.in_q" not in bits and "blocks.1.depthwise.weight_q" not in bits
    assert bits["blocks.1.project.in_q"] == 4
    x = _inputs(1)[0]
    np.testing.assert_allclose(_session(model).run(None, {"input": x})[0], _torch(net, x), atol=1e-5, rtol=0)
