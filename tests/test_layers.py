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


# --------------------------------------------------------------------------- which kernel really ran
# (toolchain/kernel_impl.py: the instruction path read from the scheduled TIR, per layer)

import dataclasses  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

from apq.targets.registry import get_target  # noqa: E402
from apq.toolchain.kernel_impl import IMPLS, KernelCall, attach_impls, primfunc_impl  # noqa: E402


def _dot_primfunc(a_dtype: str, w_dtype: str, acc: str, term=None):
    """C[i] = sum_k term(A[i, k], B[k]) (default: the product in the accumulator dtype)."""
    a = te.placeholder((4, 8), a_dtype, name="A")
    b = te.placeholder((8,), w_dtype, name="B")
    k = te.reduce_axis((0, 8), name="k")
    term = term or (lambda x, y: x.astype(acc) * y.astype(acc))
    c = te.compute((4,), lambda i: te.sum(term(a[i, k], b[k]), axis=k), name="C")
    return te.create_prim_func([a, b, c])


def _intrin(name: str):
    return lambda x, y: tvm.tirx.call_llvm_pure_intrin("int32", name, x.astype("int32"), y.astype("int32"))


@pytest.mark.parametrize("func, impl", [
    (lambda: _dot_primfunc("float32", "float32", "float32"), "float"),
    (lambda: _dot_primfunc("int8", "int8", "int32"), "generic"),
    (lambda: _dot_primfunc("uint8", "int8", "float32"), "int-fp32acc"),  # exact float accumulation
    (lambda: _dot_primfunc("uint8", "int8", "float32",  # an inlined dequantize: real float arithmetic
                           lambda x, y: (x.astype("float32") - 3.0) * 0.5 * y.astype("float32")), "float"),
    (lambda: _dot_primfunc("uint8", "int8", "int32", _intrin("llvm.x86.avx512.vpdpbusd.512")), "avx512-vnni"),
    (lambda: _dot_primfunc("int8", "int8", "int32", _intrin("llvm.aarch64.neon.sdot.v4i32.v16i8")), "neon-sdot"),
    (lambda: _dot_primfunc("uint32", "uint32", "int32",
                           lambda x, y: tvm.tirx.popcount(x & y).astype("int32")), "bitserial-popcount"),
])
def test_primfunc_impl_reads_intrinsics_then_dtypes(func, impl):
    assert impl in IMPLS and primfunc_impl(func()) == impl


def test_primfunc_without_a_two_operand_reduction_is_no_layer():
    a = te.placeholder((4, 8), "float32", name="A")
    k = te.reduce_axis((0, 8), name="k")
    mean_like = te.compute((4,), lambda i: te.sum(a[i, k], axis=k), name="S")
    elementwise = te.compute((4, 8), lambda i, j: a[i, j] * 2.0, name="E")
    assert primfunc_impl(te.create_prim_func([a, mean_like])) is None
    assert primfunc_impl(te.create_prim_func([a, elementwise])) is None


def test_attach_impls_pairs_in_order_and_refuses_inconsistent_pairings():
    geo = {"op": "conv", "in_ch": 8, "out_ch": 16, "kernel": 1, "stride": 1, "in_h": 4, "in_w": 4, "groups": 1,
           "batch": 1}
    recs = [LayerRecord("a", "conv2d", "k", 8, 8, geo), LayerRecord("b", "matmul", "k", 8, 8, None)]
    calls = [KernelCall("f0", "avx512-vnni", 16 * 16), KernelCall("f1", "generic", 10)]
    assert [r.impl for r in attach_impls(recs, calls)] == ["avx512-vnni", "generic"]
    assert [r.impl for r in attach_impls(recs, calls[:1])] == ["unknown", "unknown"]  # count differs
    wrong_size = [dataclasses.replace(calls[0], out_elements=15 * 16), calls[1]]
    assert [r.impl for r in attach_impls(recs, wrong_size)] == ["unknown", "unknown"]


def test_impl_round_trips_and_older_or_newer_records_load():
    rec = LayerRecord("pw", "conv2d", "conv2d.uint8xint8->int32", 8, 8, None, "neon-sdot")
    assert LayerRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    old = {k: v for k, v in rec.to_json().items() if k != "impl"}  # a manifest written before impl
    assert LayerRecord.from_json(old).impl is None
    assert LayerRecord.from_json({**rec.to_json(), "added_later": 1}) == rec


def _build(onnx_path: Path, target: str, tmp: Path):
    """compile_onnx's steps up to the library, keeping the kernel calls: (records, calls, lib)."""
    from apq.toolchain.compile import CompileOptions, build_library_traced, lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs

    spec = get_target(target)
    model = load_onnx(onnx_path)
    mod = import_to_relax(model, resolve_input_specs(model, {}))
    mod, layers = lower_module(mod, model, spec, CompileOptions(target=target))
    lib, calls = build_library_traced(mod, spec, tmp)
    return attach_impls(layers, calls), calls, lib


def _asm_functions_with(lib: Path, mnemonic: str, objdump: str) -> set[str]:
    """PrimFunc names whose machine code holds ``mnemonic`` (TVM emits ``<name>_compute_``)."""
    if shutil.which(objdump) is None:
        pytest.skip(f"{objdump} not installed")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    found, func = set(), None
    for line in asm.splitlines():
        if line.endswith(">:") and "<" in line:
            func = line[line.index("<") + 1:-2]
        elif func is not None and "\t" in line:
            parts = line.split("\t")[1].split()  # "  addr:\tmnemonic operands"
            if parts and parts[0] == mnemonic:
                found.add(func.removesuffix("_compute_"))
    return found


def _pointwise(rec: LayerRecord) -> bool:
    g = rec.geometry or {}
    return g.get("op") == "conv" and g.get("kernel") == 1 and rec.is_integer


def _depthwise(rec: LayerRecord) -> bool:
    return (rec.geometry or {}).get("op") == "dwconv"


def test_host_int8_mobilenet_reports_vnni_for_convs_as_in_the_machine_code(mbv2_qdq, tmp_path):
    if "avx512vnni" not in get_target("host").features:
        pytest.skip("host has no AVX-512 VNNI")
    recs, calls, lib = _build(mbv2_qdq, "host", tmp_path)
    assert all(r.impl != "unknown" for r in recs)
    assert sum(_pointwise(r) for r in recs) >= 10 and all(r.impl == "avx512-vnni" for r in recs if _pointwise(r))
    # depthwise convs: 4 taps per vpdpbusd lane (kernels/x86_int8_depthwise.py)
    assert sum(_depthwise(r) for r in recs) >= 3 and all(r.impl == "avx512-vnni" for r in recs if _depthwise(r))
    assert all(r.impl != "avx512-vnni" for r in recs if r.op == "matmul")
    # the TIR reading agrees with the instructions in the library, function by function
    vnni_tir = {c.function for c in calls if c.impl == "avx512-vnni"}
    assert _asm_functions_with(lib, "vpdpbusd", "objdump") == vnni_tir


@pytest.fixture(scope="module")
def sub8bit_onnx(tmp_path_factory) -> Path:
    """stem 8-bit, one inverted residual with 4-bit pointwise and 2-bit depthwise, 8-bit head."""
    torch = pytest.importorskip("torch")
    from apq.toolchain.supernet.qlayers import (InvertedResidual, QConvBNAct, QLinear, StaticNet, calibrate_net,
                                                export_onnx)

    torch.manual_seed(0)
    net = StaticNet(QConvBNAct(3, 8, 3, 2, in_signed=True, w_bits=8, a_bits=8),
                    [InvertedResidual(8, 16, 8, 3, 1, 4, 4, 2, 2)],
                    QConvBNAct(8, 16, 1, in_signed=True, w_bits=8, a_bits=8), QLinear(16, 10, w_bits=8, a_bits=8))
    net.eval()
    calibrate_net(net, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    return export_onnx(net, tmp_path_factory.mktemp("impl") / "sub8.onnx", (1, 3, 16, 16))


@pytest.mark.parametrize("target, sdot", [("raspberry-pi/5", True), ("raspberry-pi/4b-aarch64", False)])
def test_arm_reports_sdot_only_on_dotprod_boards(sub8bit_onnx, tmp_path, target, sdot):
    if shutil.which(get_target(target).cross_compiler) is None:
        pytest.skip("no aarch64 cross compiler")
    recs, calls, lib = _build(sub8bit_onnx, target, tmp_path)
    pointwise = [r for r in recs if _pointwise(r)]
    assert len(pointwise) == 3 and all(r.impl == ("neon-sdot" if sdot else "generic") for r in pointwise)
    assert all(r.impl == "generic" for r in recs if not _pointwise(r))  # stem, depthwise, classifier
    sdot_tir = {c.function for c in calls if c.impl == "neon-sdot"}
    assert _asm_functions_with(lib, "sdot", "aarch64-linux-gnu-objdump") == sdot_tir


def test_bitfusion_manifest_reports_bitserial_for_sub8bit_layers(sub8bit_onnx, tmp_path):
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx

    compile_onnx(sub8bit_onnx, "bitfusion", tmp_path / "bf.apq")
    layers = open_artifact(tmp_path / "bf.apq").manifest["layers"]  # as written into manifest.json
    impls = {lay["name"]: lay["impl"] for lay in layers}
    bitserial = {lay["name"] for lay in layers if lay["kernel"].startswith("bitserial")}
    assert len(bitserial) == 3 and all(impls[n] == "bitserial-popcount" for n in bitserial)
    assert all(impls[n] not in ("bitserial-popcount", "unknown", None) for n in set(impls) - bitserial)


def test_float_model_reports_float(mbv2_host_artifact):
    from apq.toolchain.artifact import open_artifact

    layers = open_artifact(mbv2_host_artifact).manifest["layers"]
    assert len(layers) >= 20 and {lay["impl"] for lay in layers} == {"float"}
