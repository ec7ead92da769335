"""Opset-21 INT4/UINT4 QDQ: the apq-compile pre-pass (toolchain/int4_onnx.py) and the exporter's
``onnx-int4`` mode. The reference is always onnxruntime on the original INT4 file (ORT runs INT4
QDQ natively), with graph optimizations off (the operators' own semantics)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from apq.toolchain.artifact import open_artifact
from apq.toolchain.cli import main
from apq.toolchain.compile import compile_onnx
from apq.toolchain.errors import InvalidInputError, UnsupportedModelError
from apq.toolchain.int4_onnx import has_4bit_tensors, rewrite_int4_qdq
from apq.toolchain.onnx_import import load_onnx
from apq.toolchain.supernet.deploy import DEFAULT_CHECKPOINT
from apq.toolchain.supernet.export import build_onnx, export_onnx
from apq.toolchain.supernet.qlayers import StaticNet
from apq.toolchain.verify import verify_artifact
from test_export import SHAPE, _inputs, _make_net, _session, _torch, one_step_tolerance

FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)


# --------------------------------------------------------------------------- builders


def _model(nodes: list, inits: list, x_shape: list[int], y_shape: list[int]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


def _hand_built(seed: int = 0) -> onnx.ModelProto:
    """Two convs in plain opset-21 INT4 QDQ, the forms other tools write: a packed (raw_data) and
    an unpacked (int32_data) INT4 weight, a UINT4 activation with zero point 8 (padding!), an INT4
    activation typed by ``output_dtype`` without a zero point, a zero point in a Constant node."""
    rng = np.random.default_rng(seed)
    w1 = rng.integers(-8, 8, (6, 3, 3, 3)).astype(np.int8)
    w2 = rng.integers(-8, 8, (4, 6, 1, 1)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w1.astype(ml_dtypes.int4), "w1_q"),
        helper.make_tensor("w2_q", TensorProto.INT4, w2.shape, w2.ravel().tolist()),
        numpy_helper.from_array(rng.uniform(0.01, 0.05, 6).astype(np.float32), "w1_s"),
        numpy_helper.from_array(np.zeros(6, ml_dtypes.int4), "w1_zp"),
        numpy_helper.from_array(rng.uniform(0.01, 0.05, 4).astype(np.float32), "w2_s"),
        numpy_helper.from_array(np.array(0.15, np.float32), "x_s"),
        numpy_helper.from_array(np.array(8, ml_dtypes.uint4), "x_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "h_s"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w1_q", "w1_s", "w1_zp"], ["w1_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w1_dq"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("QuantizeLinear", ["r1", "h_s"], ["h_q"], output_dtype=TensorProto.INT4),
        helper.make_node("DequantizeLinear", ["h_q", "h_s"], ["h_dq"]),
        helper.make_node("Constant", [], ["w2_zp"], value=numpy_helper.from_array(np.zeros(4, ml_dtypes.int4))),
        helper.make_node("DequantizeLinear", ["w2_q", "w2_s", "w2_zp"], ["w2_dq"], axis=0),
        helper.make_node("Conv", ["h_dq", "w2_dq"], ["y"]),
    ]
    return _model(nodes, inits, [1, 3, 10, 10], [1, 4, 10, 10])


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _session(model).run(None, {"x": x})[0]


def _types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer} | {
        n.attribute[0].t.data_type for n in model.graph.node if n.op_type == "Constant"}


def _bits(model: onnx.ModelProto) -> dict[str, int]:
    return json.loads({p.key: p.value for p in model.metadata_props}["apq.bits"])


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int4") / "hand.onnx"
    onnx.save(_hand_built(), str(path))
    return path


@pytest.fixture(scope="module")
def mixed_net() -> StaticNet:
    return _make_net(bits=True)  # test_export's tiny net: 2/4/8-bit layers, signed and unsigned inputs


# --------------------------------------------------------------------------- the pre-pass


def test_prepass_is_exact_in_onnxruntime(hand_built: Path) -> None:
    original = onnx.load(str(hand_built))
    rewritten, report = rewrite_int4_qdq(original)
    assert has_4bit_tensors(original) and not has_4bit_tensors(rewritten)
    assert not _types(rewritten) & set(FOUR_BIT)
    assert report.weights == {"w1_q": 4, "w2_q": 4} and report.activations == {"x_q": 4, "h_q": 4}
    assert _bits(rewritten) == {"w1_q": 4, "w2_q": 4, "x_q": 4, "h_q": 4}
    inits = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert inits["x_zp"].dtype == np.uint8 and int(inits["x_zp"]) == 8  # zero point kept, container widened
    np.testing.assert_array_equal(inits["w1_q"], numpy_helper.to_array(original.graph.initializer[0]).astype(np.int8))
    # every 4-bit QuantizeLinear now feeds its DequantizeLinear through an integer Clip to 4 bits
    producers = {o: n for n in rewritten.graph.node for o in n.output}
    for dq in (n for n in rewritten.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in producers):
        clip = producers[dq.input[0]]
        assert clip.op_type == "Clip" and producers[clip.input[0]].op_type == "QuantizeLinear"
        assert (int(inits[clip.input[1]]), int(inits[clip.input[2]])) in ((0, 15), (-8, 7))
    for x in (np.random.default_rng(s).standard_normal((1, 3, 10, 10)).astype(np.float32) * 2 for s in range(3)):
        y = _ort(original, x)
        assert np.abs(y).max() > 0.05  # not a degenerate all-zero graph
        np.testing.assert_array_equal(_ort(rewritten, x), y)


def test_models_without_4bit_tensors_pass_through(mixed_net: StaticNet) -> None:
    model = build_onnx(mixed_net, SHAPE)  # apq's own 8-bit-container export
    same, report = rewrite_int4_qdq(model)
    assert same is model and not report.changed


def test_compiled_int4_conv_matches_onnxruntime(hand_built: Path, tmp_path: Path) -> None:
    res = compile_onnx(hand_built, "host", tmp_path / "hand.apq")
    layers = res.manifest["layers"]
    assert [(lay["weight_bits"], lay["activation_bits"]) for lay in layers] == [(4, 4), (4, 4)]
    # integer operands (int32 accumulation, or float32 accumulation proven exact), never fake quant
    assert all(re.search(r"int8xu?int8->(int32|float32)$", lay["kernel"]) and lay["impl"] != "float" for lay in layers)
    rep = verify_artifact(open_artifact(res.artifact_path), hand_built)
    assert rep.passed and rep.max_abs_err < 1e-5, rep.to_json()  # measured 3e-8


# --------------------------------------------------------------------------- unsupported 4-bit uses


def _reshape_of_int4() -> onnx.ModelProto:
    inits = [helper.make_tensor("w_q", TensorProto.INT4, [2, 2], [1, -2, 3, -4]),
             numpy_helper.from_array(np.array([4], np.int64), "shape")]
    nodes = [helper.make_node("Reshape", ["w_q", "shape"], ["w_flat"]),
             helper.make_node("DequantizeLinear", ["w_flat", "s"], ["w_dq"]),
             helper.make_node("Add", ["x", "w_dq"], ["y"])]
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "s"))
    return _model(nodes, inits, [4], [4])


def _blocked_int4() -> onnx.ModelProto:
    w = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    inits = [numpy_helper.from_array(w.astype(ml_dtypes.int4), "w_q"),
             numpy_helper.from_array(np.full((2, 2), 0.1, np.float32), "w_s")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w_dq"], axis=1, block_size=4),
             helper.make_node("MatMul", ["x", "w_dq"], ["y"])]
    return _model(nodes, inits, [1, 2], [1, 8])


@pytest.mark.parametrize("build, words", [(_reshape_of_int4, ["Reshape", "'w_q'", "INT4"]),
                                          (_blocked_int4, ["DequantizeLinear", "block_size=4"])])
def test_unsupported_int4_is_a_one_line_error(build, words: list[str], tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.onnx"
    onnx.save(build(), str(path))
    with pytest.raises(UnsupportedModelError) as e:
        load_onnx(path)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert main(["compile", str(path), "-o", str(tmp_path / "bad.apq")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words[0] in err


# --------------------------------------------------------------------------- the onnx-int4 export mode


def test_int4_export_types_and_exact_agreement_with_apq_format(mixed_net: StaticNet) -> None:
    apq_model = build_onnx(mixed_net, SHAPE)
    int4 = build_onnx(mixed_net, SHAPE, qdq_format="onnx-int4")
    assert int4.opset_import[0].version == 21
    props = {p.key: p.value for p in int4.metadata_props}
    assert props["apq.qdq_format"] == "onnx-int4" and _bits(int4) == _bits(apq_model)
    inits = {t.name: t for t in int4.graph.initializer}
    layers = dict(mixed_net.quant_layers())
    for name, layer in layers.items():
        w_type = TensorProto.INT4 if layer.w_bits <= 4 else TensorProto.INT8
        assert inits[f"{name}.weight_q"].data_type == w_type and inits[f"{name}.weight_zp"].data_type == w_type
        a_type = {(True, True): TensorProto.INT4, (True, False): TensorProto.UINT4,
                  (False, True): TensorProto.INT8, (False, False): TensorProto.UINT8}[
            (layer.a_bits <= 4, layer.in_signed)]
        assert inits[f"{name}.in_zp"].data_type == a_type, name
        # b < 4 in a 4-bit container: the float Clip before QuantizeLinear; 5..7 bits: int Clip after
        assert (f"{name}.in_fmin" in inits) == (layer.a_bits < 4)
        assert (f"{name}.in_qmin" in inits) == (4 < layer.a_bits < 8)
    assert any(layer.a_bits < 4 for layer in layers.values()) and any(layer.a_bits == 8 for layer in layers.values())
    for x in _inputs(4, seed=3):  # same codes, same logits, bit for bit
        np.testing.assert_array_equal(_session(int4).run(None, {"input": x})[0],
                                      _session(apq_model).run(None, {"input": x})[0])


def test_prepass_turns_the_int4_export_into_the_apq_export(mixed_net: StaticNet) -> None:
    """What the QDQ lowering sees from an onnx-int4 file is exactly apq's own default export."""
    apq_model = build_onnx(mixed_net, SHAPE)
    rewritten, report = rewrite_int4_qdq(build_onnx(mixed_net, SHAPE, qdq_format="onnx-int4"))
    assert report.folded_clips  # the 2-bit activations' float clips
    assert [(n.op_type, list(n.input), list(n.output)) for n in rewritten.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in apq_model.graph.node]
    got = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in apq_model.graph.initializer}
    assert got.keys() == want.keys()
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype and np.array_equal(got[name], arr), name
    assert _bits(rewritten) == _bits(apq_model)


def test_bad_format_or_opset_is_an_error(mixed_net: StaticNet, tmp_path: Path, capsys) -> None:
    with pytest.raises(InvalidInputError, match="unknown QDQ format 'int3'"):
        build_onnx(mixed_net, SHAPE, qdq_format="int3")
    with pytest.raises(InvalidInputError, match=">= 21"):
        build_onnx(mixed_net, SHAPE, qdq_format="onnx-int4", opset=17)
    assert main(["export-subnet", "--qdq-format", "int3", "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnx-int4" in err


# --------------------------------------------------------------------------- a real W4A4 subnet


@pytest.fixture(scope="module")
def w4a4_subnet() -> StaticNet:
    """The smallest W4A4 subnet of the checked-in supernet (checkpoint BN statistics, no dataset
    needed: parity does not depend on how well the BN statistics fit the data)."""
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("no checked-in supernet checkpoint")
    from apq.toolchain.supernet.evaluate import apply_bits, resolve_bits, resolve_config
    from apq.toolchain.supernet.supernet import Supernet

    supernet, _ = Supernet.from_checkpoint(DEFAULT_CHECKPOINT)
    net = supernet.extract(apply_bits(resolve_config(supernet.space, "smallest"), resolve_bits("W4A4")))
    return net.eval()


@pytest.fixture(scope="module")
def w4a4_file(w4a4_subnet: StaticNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = (1, w4a4_subnet.stem.conv.in_channels, 28, 28)
    return export_onnx(w4a4_subnet, tmp_path_factory.mktemp("w4a4") / "w4a4_int4.onnx", shape,
                       qdq_format="onnx-int4")


def test_w4a4_subnet_int4_export_matches_torch(w4a4_subnet: StaticNet, w4a4_file: Path) -> None:
    model = onnx.load(str(w4a4_file))
    n_int4 = sum(t.data_type == TensorProto.INT4 for t in model.graph.initializer if t.name.endswith(".weight_q"))
    assert n_int4 == 18  # 6 blocks x (expand, depthwise, project); stem, head, classifier stay int8
    tol = one_step_tolerance(w4a4_subnet)
    sess = _session(model)
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        x = torch.randn(1, 1, 28, 28, generator=g).numpy()
        y, yt = sess.run(None, {"input": x})[0], _torch(w4a4_subnet, x)
        assert np.abs(y - yt).max() <= tol and y.argmax() == yt.argmax()


def test_w4a4_subnet_int4_compiles_to_4bit_integer_layers(w4a4_file: Path, tmp_path: Path) -> None:
    res = compile_onnx(w4a4_file, "host", tmp_path / "w4a4.apq")
    bits = {lay["name"]: (lay["weight_bits"], lay["activation_bits"]) for lay in res.manifest["layers"]}
    assert sum(b == (4, 4) for b in bits.values()) == 18
    assert bits["stem.weight_q"] == bits["head.weight_q"] == bits["classifier.weight_q"] == (8, 8)
    # integer operands (int32 accumulation, or float32 accumulation proven exact), never fake quant
    assert all(re.search(r"int8xu?int8->(int32|float32)$", lay["kernel"]) and lay["impl"] != "float" for lay in res.manifest["layers"])
    rep = verify_artifact(open_artifact(res.artifact_path), w4a4_file)  # ORT on the INT4 file itself
    assert rep.passed and rep.argmax_agreement == 1.0, rep.to_json()  # measured max err 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file() or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs the checked-in checkpoint and Fashion-MNIST")
def test_cli_export_subnet_onnx_int4_then_compile_verify(tmp_path: Path, capsys) -> None:
    path = tmp_path / "sub.onnx"
    assert main(["export-subnet", "--config", "smallest", "--bits", "W4A4", "--eval-subset", "200",
                 "--qdq-format", "onnx-int4", "-o", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["qdq_format"] == "onnx-int4" and has_4bit_tensors(onnx.load(str(path)))
    assert main(["compile", str(path), "-o", str(tmp_path / "sub.apq"), "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verify"]["passed"]
    assert sum((lay["weight_bits"], lay["activation_bits"]) == (4, 4) for lay in out["layers"]) == 18
