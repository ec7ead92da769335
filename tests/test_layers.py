"""describe_layers reports what executes: float, fake-quant float, integer, bit-serial."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
from tvm import relax, te  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from apq.toolchain.layers import (  # noqa: E402
    WEIGHT_BITS_ATTR,
    LayerRecord,
    describe_layers,
    range_bits,
    weight_fingerprint,
)


def _conv_model(qdq: bool) -> onnx.ModelProto:
    """One 3x3 conv, float or wrapped in Quantize/DequantizeLinear (as ORT's QDQ format does)."""
    w = np.random.RandomState(0).randint(-127, 128, size=(4, 2, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z")]
    if qdq:
        inits += [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_s"),
                  numpy_helper.from_array(np.zeros(4, np.int8), "w_z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
                 helper.make_node("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1])]
    else:
        inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_layer_record_round_trips_through_json():
    rec = LayerRecord("blocks.3.pw", "conv2d", "conv2d.uint8xint8->int32", 4, 2)
    back = LayerRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert back == rec and back.is_integer
    assert not LayerRecord("x", "conv2d", "conv2d.float32", 32, 32).is_integer


def test_float_conv_is_float32():
    layers = describe_layers(from_onnx(_conv_model(qdq=False), {"x": [1, 2, 4, 4]}))
    assert [(r.op, r.kernel, r.weight_bits, r.activation_bits) for r in layers] == \
        [("conv2d", "conv2d.float32", 32, 32)]


def test_imported_qdq_is_reported_as_fake_quant_float():
    """The frontend's dequantize -> float conv is not int8, whatever the ONNX file says."""
    layers = describe_layers(from_onnx(_conv_model(qdq=True), {"x": [1, 2, 4, 4]}))
    assert [(r.kernel, r.weight_bits, r.activation_bits) for r in layers] == \
        [("conv2d.float32(fake-quant QDQ)", 32, 32)]


def _bitserial_and_int_module(prim_attrs: dict | None = None):
    """main: a call_tir to a 'bitserial_*' PrimFunc, and an int matmul on a 4-bit-clipped input."""
    a = te.placeholder((4, 8), "int8", name="A")
    b = te.compute((4, 8), lambda i, j: a[i, j].astype("int32"), name="B")
    prim = te.create_prim_func([a, b])
    if prim_attrs:
        prim = prim.with_attrs(prim_attrs)
    w = np.arange(-12, 12, dtype=np.int8).reshape(3, 8)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(prim, "bitserial_dense_a2w1")
            y = bb.emit(relax.call_tir(gv, [x], relax.TensorType((4, 8), "int32")))
            c = bb.emit(relax.op.clip(x, relax.prim_value(-8), relax.prim_value(7)))
            wt = bb.emit(relax.op.permute_dims(relax.const(w)))
            z = bb.emit(relax.op.matmul(c, wt, out_dtype="int32"))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    return bb.get(), w


def test_bitserial_call_tir_and_clipped_integer_matmul():
    mod, w = _bitserial_and_int_module()
    layers = describe_layers(mod)
    assert [(r.op, r.kernel, r.weight_bits, r.activation_bits) for r in layers] == [
        ("dense", "bitserial_dense_a2w1", 1, 2),
        ("matmul", "matmul.int8xint8->int32", 8, 4),  # activation bits from the clip range
    ]
    # weight bits recorded by lower_qdq (keyed by the values' fingerprint) override the dtype
    mod = mod.with_attr(WEIGHT_BITS_ATTR, {weight_fingerprint(w): 5})
    assert describe_layers(mod)[1].weight_bits == 5


def test_bitserial_bits_from_primfunc_attrs_win_over_the_name():
    mod, _ = _bitserial_and_int_module({"apq.weight_bits": 3, "apq.activation_bits": 4})
    rec = describe_layers(mod)[0]
    assert (rec.weight_bits, rec.activation_bits) == (3, 4)


def test_range_bits_and_fingerprint():
    assert [range_bits(0, 255), range_bits(0, 15), range_bits(0, 3), range_bits(-128, 127),
            range_bits(-8, 7), range_bits(-2, 1), range_bits(-7, 7)] == [8, 4, 2, 8, 4, 2, 4]
    a = np.arange(6, dtype=np.int8).reshape(2, 3)
    assert weight_fingerprint(a) == weight_fingerprint(a.copy())
    assert weight_fingerprint(a) != weight_fingerprint(a.T)  # same bytes set, other layout
    assert weight_fingerprint(a) != weight_fingerprint(a.astype(np.uint8))
