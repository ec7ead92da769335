"""Bit-serial lowering: <= 4-bit layers really run bit-serial kernels, and nothing changes numerically.

Two levels: (1) single integer layers in a hand-built Relax module (pointwise with a signed input
shifted by the offset, strided 2-bit depthwise, padded 3x3 conv, dense) compared exactly, int32
against int32, with the int8 kernels they replace; (2) a tiny mixed 2/4/8-bit StaticNet exported
with apq's QDQ convention and compiled by apq-compile: manifest, bit-identical logits against the
bit-serial-disabled build, parity with onnxruntime, and an ARM build run under qemu. Plus the NHWC-run
layout pass (toolchain/layout.py): exact on a hand-built epilogue chain, and on the real model it
leaves only the permutes at the edges of the bit-serial run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")
from tvm import relax  # noqa: E402

from apq.targets.registry import TargetSpec, get_target  # noqa: E402
from apq.toolchain.bitserial_lowering import (  # noqa: E402
    BitserialPolicy,
    bitserial_weights,
    OpRule,
    lower_bitserial,
    name_bitserial_layers,
    plan_bitserial,
    read_decisions,
    supports_target,
)
from apq.toolchain.compile import CompileOptions, compile_onnx  # noqa: E402
from apq.toolchain.errors import InvalidInputError  # noqa: E402
from apq.toolchain.layers import describe_layers  # noqa: E402
from apq.toolchain.layout import TO_NCHW, TO_NHWC, sink_nhwc_permutes  # noqa: E402

SHAPE = (1, 3, 16, 16)
ALL_KINDS = BitserialPolicy(rules=[OpRule("pointwise", 4, 4), OpRule("conv", 4, 4), OpRule("depthwise", 2, 2),
                                   OpRule("dense", 4, 4)], keep_first_last=False)


# --------------------------------------------------------------------------- policy


def test_policy_round_trips_through_json_and_compile_options() -> None:
    p = BitserialPolicy(rules=[OpRule("pointwise", 2, 4)], keep_first_last=False)
    assert BitserialPolicy.from_json(json.dumps(p.to_json())) == p
    opts = CompileOptions(target="host", bitserial=p)
    back = CompileOptions.from_json(json.loads(json.dumps(opts.to_json())))
    assert back == opts and isinstance(back.bitserial, BitserialPolicy)
    old = {"target": "host", "input_shapes": {}, "lower_qdq": True}  # a manifest from before this pass
    assert CompileOptions.from_json(old).bitserial is None  # None: the target's default policy
    from apq.targets.registry import get_target as _t
    assert not CompileOptions().bitserial_policy(_t("host")).enabled  # CPUs: off (transposes cost more)
    assert CompileOptions().bitserial_policy(_t("bitfusion")).enabled  # the bit-serial accelerator: on
    with pytest.raises(InvalidInputError):
        OpRule("winograd", 4, 4)
    with pytest.raises(InvalidInputError):
        BitserialPolicy.from_json({"rules": [], "bogus": 1})


def test_target_support() -> None:
    assert supports_target(get_target("raspberry-pi/4b-aarch64"))
    no_popcnt = TargetSpec("old-x86", "no popcount", "x86_64", {"kind": "llvm"}, "local", features=("avx2",))
    assert not supports_target(no_popcnt)


# --------------------------------------------------------------------------- single layers, exact


def _clipped(bb: relax.BlockBuilder, x: relax.Expr, lo: int, hi: int) -> relax.Expr:
    dt = x.ty.dtype
    return bb.emit(relax.op.minimum(bb.emit(relax.op.maximum(x, relax.const(lo, dt))), relax.const(hi, dt)))


def _layers_module(rng: np.random.Generator) -> tuple[tvm.IRModule, list[np.ndarray]]:
    """Four independent integer layers, each input bounded by a clip like apq's QDQ convention."""
    bb = relax.BlockBuilder()
    xs = [relax.Var("pw", relax.TensorType((1, 24, 5, 5), "int8")),  # signed 4-bit, 1x1: offset shift
          relax.Var("dw", relax.TensorType((1, 16, 9, 9), "uint8")),  # unsigned 2-bit depthwise, stride 2
          relax.Var("cv", relax.TensorType((1, 8, 6, 6), "uint8")),  # unsigned 3-bit 3x3 conv, padded
          relax.Var("fc", relax.TensorType((2, 40), "int8"))]  # signed 2-bit dense
    w_pw = rng.integers(-7, 8, (32, 24, 1, 1)).astype(np.int8)
    w_dw = rng.integers(-1, 2, (16, 1, 3, 3)).astype(np.int8)
    w_cv = rng.integers(-8, 8, (12, 8, 3, 3)).astype(np.int8)
    w_fc = rng.integers(-1, 2, (40, 10)).astype(np.int8)
    with bb.function("main", xs):
        with bb.dataflow():
            conv = relax.op.nn.conv2d
            outs = [
                bb.emit(conv(_clipped(bb, xs[0], -8, 7), relax.const(w_pw), out_dtype="int32")),
                bb.emit(conv(_clipped(bb, xs[1], 0, 3), relax.const(w_dw), strides=2, padding=1, groups=16,
                             out_dtype="int32")),
                bb.emit(conv(_clipped(bb, xs[2], 0, 7), relax.const(w_cv), padding=1, out_dtype="int32")),
                bb.emit(relax.op.matmul(_clipped(bb, xs[3], -2, 1), relax.const(w_fc), out_dtype="int32")),
            ]
            gv = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv)
    inputs = [rng.integers(-128, 128, (1, 24, 5, 5)).astype(np.int8),  # full range: the clip bounds it
              rng.integers(0, 256, (1, 16, 9, 9)).astype(np.uint8),
              rng.integers(0, 256, (1, 8, 6, 6)).astype(np.uint8),
              rng.integers(-128, 128, (2, 40)).astype(np.int8)]
    return bb.get(), inputs


def _run(mod: tvm.IRModule, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from apq.kernels.pipeline import compile_relax

    vm = relax.VirtualMachine(compile_relax(mod, get_target("host").tvm()), tvm.cpu())
    return [o.numpy() for o in vm["main"](*[tvm.runtime.tensor(x) for x in inputs])]


def test_single_layers_are_exact_and_described() -> None:
    mod, inputs = _layers_module(np.random.default_rng(0))
    plan = plan_bitserial(mod, ALL_KINDS)
    assert [(d.op, d.a_bits, d.w_bits, d.bitserial, d.a_offset) for d in plan] == [
        ("pointwise", 4, 4, True, 8), ("depthwise", 2, 2, True, 0), ("conv", 3, 4, True, 0),
        ("dense", 2, 2, True, 2)]
    lowered = lower_bitserial(mod, get_target("host"), ALL_KINDS)
    recs = describe_layers(lowered)
    assert [(r.kernel.rstrip("0123456789"), r.activation_bits, r.weight_bits) for r in recs] == [
        ("bitserial_conv2d_a4w4_nhwc", 4, 4), ("bitserial_depthwise_conv2d_a2w2_nhwc", 2, 2),
        ("bitserial_conv2d_a3w4_nhwc", 3, 4), ("bitserial_dense_a2w2_mk", 2, 2)]
    want, got = _run(mod, inputs), _run(lowered, inputs)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype == np.int32 and np.abs(w).max() > 0
        np.testing.assert_array_equal(g, w)


def test_policy_and_proofs_keep_layers_int8() -> None:
    mod, _ = _layers_module(np.random.default_rng(1))
    default = {d.op: d for d in plan_bitserial(mod, BitserialPolicy(keep_first_last=False))}
    assert not default["conv"].bitserial and "no rule" in default["conv"].reason  # KxK convs: int8 by default
    assert default["pointwise"].bitserial and default["dense"].bitserial
    first_last = plan_bitserial(mod, BitserialPolicy())
    assert not first_last[0].bitserial and not first_last[-1].bitserial
    tight = plan_bitserial(mod, BitserialPolicy(rules=[OpRule("pointwise", 2, 4)], keep_first_last=False))
    assert not tight[0].bitserial and "a4w4 above" in tight[0].reason
    no_shift = plan_bitserial(mod, BitserialPolicy(signed_offset=False, keep_first_last=False))
    assert not no_shift[0].bitserial and "signed" in no_shift[0].reason
    assert describe_layers(lower_bitserial(mod, get_target("host"), BitserialPolicy.disabled()))[0].kernel \
        .startswith("conv2d.")


# --------------------------------------------------------------------------- a real mixed-precision model


def _mixed_net():
    from apq.toolchain.supernet.qlayers import InvertedResidual, QConvBNAct, QLinear, StaticNet, calibrate_net

    torch.manual_seed(0)
    stem = QConvBNAct(3, 8, 3, 2, in_signed=True, w_bits=8, a_bits=8)
    blocks = [InvertedResidual(8, 16, 8, 3, 1, 4, 4, 2, 2),  # pw a4w4 (signed expand input), dw a2w2
              InvertedResidual(8, 24, 16, 5, 2, 2, 4, 8, 4),  # pw w2 a4, dw int8
              InvertedResidual(16, 32, 16, 3, 1, 4, 2, 4, 8)]  # pw w4 a2, dw int8 (8-bit input)
    head = QConvBNAct(16, 32, 1, in_signed=True, w_bits=8, a_bits=8)
    net = StaticNet(stem, blocks, head, QLinear(32, 10, w_bits=8, a_bits=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    net.eval()
    calibrate_net(net, torch.randn(8, *SHAPE[1:], generator=g))
    return net


@pytest.fixture(scope="module")
def mixed_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from apq.toolchain.supernet.qlayers import export_onnx

    return export_onnx(_mixed_net(), tmp_path_factory.mktemp("bs") / "mixed.onnx", SHAPE)


EXPECTED = {  # layer -> kernel family on a popcount CPU with the default policy
    "stem.weight_q": "conv2d.int8xint8->int32",
    "blocks.0.expand.weight_q": "bitserial_conv2d_a4w4",
    "blocks.0.depthwise.weight_q": "bitserial_depthwise_conv2d_a2w2",
    "blocks.0.project.weight_q": "bitserial_conv2d_a4w4",
    "blocks.1.expand.weight_q": "bitserial_conv2d_a4w2",
    "blocks.1.depthwise.weight_q": "conv2d.uint8xint8->int32",
    "blocks.1.project.weight_q": "bitserial_conv2d_a4w2",
    "blocks.2.expand.weight_q": "bitserial_conv2d_a2w4",
    "blocks.2.depthwise.weight_q": "conv2d.uint8xint8->int32",
    "blocks.2.project.weight_q": "bitserial_conv2d_a2w4",
    "head.weight_q": "conv2d.int8xint8->int32",
    "classifier.weight_q": "matmul.uint8xint8->int32",
}


#: the same network on an AVX-512 VNNI host: the layers that stay int8 take the VNNI forms of the
#: int8 path (u8 x s8 pointwise; the signed RGB stem re-biased to u8, gathered into patches and run
#: as a pointwise conv; depthwise convs accumulated in float32), the bit-serial ones are as above
VNNI_KERNELS = {
    "stem.weight_q": ("conv2d.uint8xint8->int32", "avx512-vnni"),
    "blocks.1.depthwise.weight_q": ("conv2d.uint8xint8->int32", "avx512-vnni"),  # kernels/x86_int8_depthwise.py
    "blocks.2.depthwise.weight_q": ("conv2d.uint8xint8->int32", "avx512-vnni"),
    "head.weight_q": ("conv2d.uint8xint8->int32", "avx512-vnni"),
}


def test_mixed_model_on_host_is_bit_identical_and_matches_onnxruntime(mixed_onnx: Path, tmp_path: Path) -> None:
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.runtime import run_artifact
    from apq.toolchain.verify import verify_artifact

    bs = compile_onnx(mixed_onnx, "host", tmp_path / "bs.apq", options=CompileOptions(bitserial=BitserialPolicy()))
    layers = bs.manifest["layers"]
    vnni = "avx512vnni" in get_target("host").features
    want = {**EXPECTED, **{k: kernel for k, (kernel, _) in VNNI_KERNELS.items()}} if vnni else EXPECTED
    assert {lay["name"]: lay["kernel"] for lay in layers} == want
    if vnni:  # bit-serial and VNNI kernels in one network
        impls = {lay["name"]: lay["impl"] for lay in layers}
        assert {k: impls[k] for k in VNNI_KERNELS} == {k: impl for k, (_, impl) in VNNI_KERNELS.items()}
    for lay in layers:
        if lay["kernel"].startswith("bitserial"):
            a, w = (int(v) for v in lay["kernel"].split("_a")[-1].split("w"))
            assert (lay["activation_bits"], lay["weight_bits"]) == (a, w) and max(a, w) <= 4
            assert lay["geometry"]["op"] in ("conv", "dwconv")
    assert bs.manifest["compile"]["options"]["bitserial"] == BitserialPolicy().to_json()
    # the int8 depthwise convs run NHWC inside the bit-serial run, and keep their geometry
    assert {lay["name"]: lay["geometry"]["op"] for lay in layers if "depthwise" in lay["name"]} == {
        f"blocks.{i}.depthwise.weight_q": "dwconv" for i in range(3)}

    off = compile_onnx(mixed_onnx, "host", tmp_path / "i8.apq")  # host default: int8 kernels
    assert off.manifest["compile"]["options"]["bitserial"] is None
    assert not any(lay["kernel"].startswith("bitserial") for lay in off.manifest["layers"])
    art_bs, art_off = open_artifact(bs.artifact_path), open_artifact(off.artifact_path)
    outs = []
    for seed in range(3):
        x = art_bs.random_inputs(seed)
        got, want = run_artifact(art_bs, x)[0], run_artifact(art_off, x)[0]
        np.testing.assert_array_equal(got, want)
        outs.append(got)
    assert not np.array_equal(outs[0], outs[1])  # the inputs matter: not a constant network
    rep = verify_artifact(art_bs, mixed_onnx, seed=5)
    assert rep.passed and rep.argmax_agreement == 1.0, rep.to_json()


@pytest.fixture(scope="module")
def binary_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A StaticNet whose pointwise convs have 1-bit (binary {-1, +1}) weights."""
    from apq.toolchain.supernet.qlayers import (InvertedResidual, QConvBNAct, QLinear, StaticNet, calibrate_net,
                                                export_onnx)

    torch.manual_seed(1)
    stem = QConvBNAct(3, 8, 3, 2, in_signed=True, w_bits=8, a_bits=8)
    blocks = [InvertedResidual(8, 32, 16, 3, 1, 1, 2, 8, 8),  # pw w1 a2 (signed expand input)
              InvertedResidual(16, 32, 16, 3, 1, 1, 1, 8, 8),  # pw w1; project input 1-bit unsigned
              InvertedResidual(16, 96, 16, 3, 1, 1, 4, 8, 8)]  # a4 project over 96 channels: 12 movemask words
    net = StaticNet(stem, blocks, QConvBNAct(16, 32, 1, in_signed=True, w_bits=8, a_bits=8),
                    QLinear(32, 10, w_bits=8, a_bits=8)).eval()
    calibrate_net(net, torch.randn(8, *SHAPE[1:], generator=torch.Generator().manual_seed(1)))
    return export_onnx(net, tmp_path_factory.mktemp("bin") / "binary.onnx", SHAPE)


BINARY_LAYERS = [f"blocks.{b}.{c}.weight_q" for b in (0, 1, 2) for c in ("expand", "project")]
BINARY_KERNELS = {"bitserial_conv2d_a2w1", "bitserial_conv2d_a1w1", "bitserial_conv2d_a4w1"}


def test_binary_weight_model_compiles_both_ways_and_matches_onnxruntime(binary_onnx: Path, tmp_path: Path) -> None:
    """1-bit pointwise weights (binary {-1, +1}, as apq's quantizer writes them) compile on the int8
    path and bit-serial (bipolar kernels), bit-identical to each other and matching onnxruntime.
    Before, lower_qdq's range check read 1 bit as two's complement {-1, 0} and refused the model."""
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.runtime import run_artifact
    from apq.toolchain.verify import verify_artifact

    onnx_path = binary_onnx
    arts = {}
    for name, policy in (("int8", BitserialPolicy.disabled()), ("bitserial", BitserialPolicy())):
        res = compile_onnx(onnx_path, "host", tmp_path / f"{name}.apq", options=CompileOptions(bitserial=policy))
        layers = {lay["name"]: lay for lay in res.manifest["layers"]}
        binary = [k for k, lay in layers.items() if lay["weight_bits"] == 1]
        assert binary == BINARY_LAYERS
        kernels = {layers[k]["kernel"] for k in binary}
        if name == "bitserial":
            assert kernels == BINARY_KERNELS
        else:
            assert not any(k.startswith("bitserial") for k in kernels)
        arts[name] = open_artifact(res.artifact_path)
        rep = verify_artifact(arts[name], onnx_path, seed=3)
        assert rep.passed and rep.argmax_agreement == 1.0, rep.to_json()
    for seed in range(2):
        x = arts["int8"].random_inputs(seed)
        np.testing.assert_array_equal(run_artifact(arts["bitserial"], x)[0], run_artifact(arts["int8"], x)[0])


@pytest.mark.qemu
def test_binary_weight_model_builds_for_arm_and_matches_under_qemu(binary_onnx: Path, tmp_path: Path) -> None:
    """The bipolar kernels (activation sums hoisted out of the reduction) on NEON, fused epilogues."""
    from apq.targets.qemu import qemu_available
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.verify import verify_artifact

    res = compile_onnx(binary_onnx, "raspberry-pi/4b-aarch64", tmp_path / "arm.apq",
                       options=CompileOptions(bitserial=BitserialPolicy()))
    kernels = {lay["name"]: lay["kernel"] for lay in res.manifest["layers"]}
    assert {kernels[k] for k in BINARY_LAYERS} == BINARY_KERNELS
    ok, why = qemu_available()
    if not ok:
        pytest.skip(why)
    rep = verify_artifact(open_artifact(res.artifact_path, "raspberry-pi/4b-aarch64"), binary_onnx, seed=4)
    assert rep.executed_on == "qemu-aarch64" and rep.passed and rep.argmax_agreement == 1.0, rep.to_json()


@pytest.mark.qemu
def test_mixed_model_builds_for_arm_and_matches_under_qemu(mixed_onnx: Path, tmp_path: Path) -> None:
    from apq.targets.qemu import qemu_available
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.verify import verify_artifact

    res = compile_onnx(mixed_onnx, "raspberry-pi/4b-aarch64", tmp_path / "arm.apq",
                       options=CompileOptions(bitserial=BitserialPolicy()))
    assert {lay["name"]: lay["kernel"] for lay in res.manifest["layers"]} == EXPECTED
    ok, why = qemu_available()
    if not ok:
        pytest.skip(why)
    rep = verify_artifact(open_artifact(res.artifact_path, "raspberry-pi/4b-aarch64"), mixed_onnx, seed=2)
    assert rep.executed_on == "qemu-aarch64" and rep.passed, rep.to_json()


def test_decisions_are_recorded_on_the_module(mixed_onnx: Path) -> None:
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs
    from apq.toolchain.qdq_lowering import lower_qdq, read_bits_hint

    model = load_onnx(mixed_onnx)
    mod = lower_qdq(import_to_relax(model, resolve_input_specs(model, {})), read_bits_hint(model))
    decisions = read_decisions(lower_bitserial(mod, get_target("host")))
    by_layer = {d.layer: d for d in decisions}
    assert set(by_layer) == set(EXPECTED)
    assert by_layer["blocks.0.expand.weight_q"].a_offset == 8  # signed 4-bit input shifted to [0, 15]
    assert "padded" in by_layer["blocks.1.depthwise.weight_q"].reason or \
        "above" in by_layer["blocks.1.depthwise.weight_q"].reason
    assert by_layer["stem.weight_q"].reason.startswith("first/last")
    # 8- and 16-channel pointwise inputs pack into 16-bit words with int16 accumulators where the
    # CPU popcounts 16-bit lanes (kernels/bitserial.narrow_words); 24 and 32 channels keep 32 bits
    features = get_target("host").features
    narrow = (16, 16) if {"avx512bw", "avx512bitalg"} <= set(features) else (32, 32)
    words = {k: (d.word_bits, d.acc_bits) for k, d in by_layer.items() if d.bitserial}
    assert words == {"blocks.0.expand.weight_q": narrow, "blocks.0.depthwise.weight_q": (0, 0),
                     "blocks.0.project.weight_q": narrow, "blocks.1.expand.weight_q": narrow,
                     "blocks.1.project.weight_q": (32, 32), "blocks.2.expand.weight_q": narrow,
                     "blocks.2.project.weight_q": (32, 32)}


def test_vnni_lowering_keeps_the_planned_layers_plain(mixed_onnx: Path) -> None:
    """The VNNI forms (uint8 re-bias, float32 accumulation) would hide layers from the bit-serial
    plan; planned on a plain lowering and exempted, the same layers go bit-serial and the others
    keep the VNNI forms."""
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs
    from apq.toolchain.qdq_lowering import lower_qdq, read_bits_hint

    model = load_onnx(mixed_onnx)
    imported, hints = import_to_relax(model, resolve_input_specs(model, {})), read_bits_hint(model)
    plain = lower_qdq(imported, hints)
    keep = bitserial_weights(plain)
    vnni_forms = dict(uint8_pointwise=True, float_accumulation=True)
    exempt = lower_qdq(imported, hints, plain_layers=keep, **vnni_forms)
    hidden = lower_qdq(imported, hints, **vnni_forms)

    def chosen(mod: tvm.IRModule) -> list[str]:
        return [d.layer for d in plan_bitserial(mod) if d.bitserial]

    assert len(keep) == 7 and chosen(exempt) == chosen(plain) == [k for k, v in EXPECTED.items() if "bitserial" in v]
    assert len(chosen(hidden)) < 7
    decisions = {d.layer: d for d in plan_bitserial(exempt)}
    assert set(decisions) == set(EXPECTED)  # float-accumulated convs still count as layers
    assert "float32" in decisions["blocks.1.depthwise.weight_q"].reason
    assert decisions["stem.weight_q"].index == 0 and decisions["classifier.weight_q"].index == len(EXPECTED) - 1


def test_pointwise_kernels_fuse_their_epilogues_and_stay_bit_identical(mixed_onnx: Path, tmp_path: Path) -> None:
    """BitserialPolicy.fuse_epilogues: each pointwise bit-serial kernel is emitted fusable, FuseOps
    folds its requantize epilogue into it, apq's rule schedules the fused PrimFunc with the
    accumulator tile in registers; outputs bit-identical to opaque kernels + separate epilogues."""
    from tvm import s_tir

    from apq.kernels.cpu_schedules import BitserialPointwiseRule, _is_output_block
    from apq.kernels.pipeline import fused_module
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs
    from apq.toolchain.runtime import run_artifact

    model = load_onnx(mixed_onnx)
    pointwise = [k for k, v in EXPECTED.items() if v.startswith("bitserial_conv2d")]
    assert len(pointwise) == 6
    for target in (get_target("host"), get_target("raspberry-pi/4b-aarch64")):  # x86 and NEON lanes
        lowered, _ = lower_module(import_to_relax(model, resolve_input_specs(model, {})), model, target,
                                  CompileOptions(bitserial=BitserialPolicy()))
        fused = fused_module(lowered, target.tvm())
        kernels = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)
                   and "bsconv" in [b.name_hint for b in _sblocks(f)]]
        assert len(kernels) == len(pointwise), target.name
        for func in kernels:
            sch = s_tir.Schedule(func)
            assert not _is_output_block(sch, sch.get_sblock("bsconv"), func)  # an epilogue was fused in
            scheduled = BitserialPointwiseRule().apply(func, target.tvm(), False)
            assert scheduled is not None, target.name
            update = scheduled.get(scheduled.get_sblock("bsconv_update"))  # decompose_reduction's name
            assert update.writes[0].source.scope() == "local"

    fused_art = compile_onnx(mixed_onnx, "host", tmp_path / "fused.apq", options=CompileOptions(bitserial=BitserialPolicy()))
    opaque = compile_onnx(mixed_onnx, "host", tmp_path / "opaque.apq",
                          options=CompileOptions(bitserial=BitserialPolicy(fuse_epilogues=False)))
    assert fused_art.manifest["layers"] == opaque.manifest["layers"]
    a, b = open_artifact(fused_art.artifact_path), open_artifact(opaque.artifact_path)
    for seed in range(3):
        x = a.random_inputs(seed)
        np.testing.assert_array_equal(run_artifact(a, x)[0], run_artifact(b, x)[0])


def _sblocks(func: tvm.tirx.PrimFunc) -> list:
    import tvm_ffi
    from tvm import s_tir

    found: list = []
    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, found.append)])
    return found


# --------------------------------------------------------------------------- NHWC runs (toolchain/layout.py)


def _calls(mod: tvm.IRModule, op: str) -> list[relax.Call]:
    return [b.value for blk in mod["main"].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and str(getattr(b.value.op, "name", "")) == op]


def _permutes(mod: tvm.IRModule) -> int:
    return len(_calls(mod, "relax.permute_dims"))


def _epilogue_module(rng: np.random.Generator) -> tuple[tvm.IRModule, list[np.ndarray]]:
    """An NHWC kernel's int32 output through lower_qdq's epilogue forms back into an NHWC kernel.

    rescale by a (1, C, 1, 1) constant, bias via a reshaped constant, a residual add whose skip input
    is NCHW, per-channel quantize (axis 1), the frontend's call_tir clip, an int8 depthwise conv, and
    NCHW outputs that must still be materialised.
    """
    from tvm import topi

    c = 8
    y = relax.Var("y", relax.TensorType((1, 5, 5, c), "int32"))
    skip = relax.Var("skip", relax.TensorType((1, c, 5, 5), "float32"))
    scale = rng.uniform(0.01, 0.05, (1, c, 1, 1)).astype(np.float32)
    bias = rng.uniform(-1, 1, (c,)).astype(np.float32)
    zp = rng.integers(0, 3, (c,)).astype(np.uint8)
    w_dw = rng.integers(-8, 8, (c, 1, 3, 3)).astype(np.int8)
    bb = relax.BlockBuilder()
    with bb.function("main", [y, skip]):
        with bb.dataflow():
            v = bb.emit(relax.op.permute_dims(y, list(TO_NCHW)))
            f = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(v, "float32")), relax.const(scale)))
            b = bb.emit(relax.op.reshape(relax.const(bias), (1, c, 1, 1)))
            r = bb.emit(relax.op.add(skip, bb.emit(relax.op.add(f, b))))
            q = bb.emit(relax.op.quantize(r, relax.const(0.05, "float32"), relax.const(zp), axis=1,
                                          out_dtype="uint8"))
            clipped = bb.emit_te(topi.minimum, q, relax.const(15, "uint8"))  # the frontend's Clip form
            nxt = bb.emit(relax.op.permute_dims(clipped, list(TO_NHWC)))  # the next NHWC kernel's input
            dw = bb.emit(relax.op.nn.conv2d(clipped, relax.const(w_dw), padding=1, groups=c, out_dtype="int32"))
            gv = bb.emit_output(relax.Tuple([nxt, dw, r]))
        bb.emit_func_output(gv)
    inputs = [rng.integers(-400, 400, (1, 5, 5, c)).astype(np.int32),
              rng.uniform(-3, 3, (1, c, 5, 5)).astype(np.float32)]
    return bb.get(), inputs


@pytest.mark.parametrize("depthwise", [False, True])
def test_layout_pass_sinks_permutes_and_is_exact(depthwise: bool) -> None:
    mod, inputs = _epilogue_module(np.random.default_rng(3))
    new, stats = sink_nhwc_permutes(mod, depthwise=depthwise)
    assert stats.cancelled == 1 and stats.operand_permutes == 1  # skip input permuted once
    assert stats.converted["relax.quantize"] == 1 and stats.converted["clip(call_tir)"] == 1
    assert stats.converted["relax.add"] == 2 and stats.converted["relax.multiply"] == 1
    assert stats.converted.get("relax.nn.conv2d", 0) == int(depthwise)
    # left: skip -> NHWC, r -> NCHW (an output), and the depthwise conv's input or output -> NCHW
    assert _permutes(mod) == 2 and _permutes(new) == 3
    assert [str(c.attrs.data_layout) for c in _calls(new, "relax.nn.conv2d")] == ["NHWC" if depthwise else "NCHW"]
    want, got = _run(mod, inputs), _run(new, inputs)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape and np.abs(w).max() > 0
        np.testing.assert_array_equal(g, w)


def test_global_pooling_stays_nhwc_and_is_exact() -> None:
    """mean/sum/max over H, W with keepdims run on the NHWC form (only a (1, 1, 1, C) result is
    transposed back); a channel reduction and a keepdims=False mean are left in NCHW."""
    rng = np.random.default_rng(5)
    c = 24
    y = relax.Var("y", relax.TensorType((1, 7, 7, c), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [y]):
        with bb.dataflow():
            v = bb.emit(relax.op.permute_dims(y, list(TO_NCHW)))  # an NHWC kernel's output
            pooled = [bb.emit(relax.op.mean(v, axis=[2, 3], keepdims=True)),
                      bb.emit(relax.op.sum(v, axis=[-1, -2], keepdims=True)),
                      bb.emit(relax.op.max(v, axis=[2, 3], keepdims=True))]
            left = [bb.emit(relax.op.mean(v, axis=[1], keepdims=True)),
                    bb.emit(relax.op.mean(v, axis=[2, 3], keepdims=False))]
            gv = bb.emit_output(relax.Tuple(pooled + left))
        bb.emit_func_output(gv)
    mod = bb.get()
    new, stats = sink_nhwc_permutes(mod)
    assert stats.converted == {"relax.mean": 1, "relax.sum": 1, "relax.max": 1}
    nhwc_reductions = [cl for op in ("relax.mean", "relax.sum", "relax.max") for cl in _calls(new, op)
                       if tuple(int(a) for a in cl.attrs.axis) == (1, 2)]
    assert len(nhwc_reductions) == 3
    full_size = [p for p in _calls(new, "relax.permute_dims") if p.args[0].ty.shape[1] == 7]
    assert len(full_size) == 1  # the untouched NCHW reductions still need their input once
    x = [rng.standard_normal((1, 7, 7, c)).astype(np.float32) * 3]
    for want, got in zip(_run(mod, x), _run(new, x)):
        assert want.shape == got.shape
        np.testing.assert_array_equal(got, want)


def test_mixed_model_bitserial_run_has_permutes_only_at_its_edges(mixed_onnx: Path) -> None:
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs
    from apq.toolchain.qdq_lowering import lower_qdq, read_bits_hint

    model = load_onnx(mixed_onnx)
    mod = lower_qdq(import_to_relax(model, resolve_input_specs(model, {})), read_bits_hint(model))
    host = get_target("host")
    old = lower_bitserial(mod, host, BitserialPolicy(nhwc_runs=False))
    pointwise_only = lower_bitserial(mod, host, BitserialPolicy(nhwc_depthwise=False))
    full = lower_bitserial(mod, host, BitserialPolicy())
    assert _permutes(mod) == 0  # lower_bitserial left its input alone
    assert not any(str(c.args[0].name_hint).startswith("bitserial") for c in _calls(mod, "relax.call_tir"))
    assert _permutes(old) == 2 * 7  # in and out of each of the 7 bit-serial layers (EXPECTED)
    # into the run (after the stem), the stem's output as the first residual's skip, out to the
    # head; with NCHW depthwise convs also into and out of each of the two int8 depthwise convs
    assert _permutes(full) == 3 and _permutes(pointwise_only) == 3 + 2 * 2
    for lowered in (old, pointwise_only, full):  # every variant still names and sizes all 12 layers
        recs = name_bitserial_layers(describe_layers(lowered), lowered)
        assert [r.name for r in recs] == list(EXPECTED) and all(r.geometry for r in recs)
