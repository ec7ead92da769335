"""The AVX-512 VNNI (vpdpbusd) int8 conv path: bit-exact vs NumPy int32 references over the
full uint8 x int8 range, really emitted (vpdpbusd in the assembly), falling back cleanly on
shapes it does not cover, and the whole int8 MobileNetV2 still agreeing with onnxruntime."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def host():
    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    cfg = CpuScheduleConfig.for_target(target)
    if cfg.int8_dot != "avx512vnni":
        pytest.skip("host CPU has no AVX-512 VNNI")
    return target, cfg


REQUANT_SCALE = np.float32(1e-3)


def _conv_module(weight: np.ndarray, hw: tuple[int, int], stride: int = 1, pad: int = 0, batch: int = 1,
                 requantize: bool = False):
    """Relax ``conv2d(x_u8, W_s8, out_dtype=int32)`` (the kernel qdq_lowering emits), bare or
    with a float rescale + uint8 saturation epilogue fused into it."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([batch, weight.shape[1], *hw], "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), strides=stride, padding=pad, out_dtype="int32"))
            if requantize:
                y = relax.op.multiply(relax.op.astype(y, "float32"), relax.const(REQUANT_SCALE))
                y = bb.emit(relax.op.astype(relax.op.clip(y, 0.0, 255.0), "uint8"))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    return bb.get()


def _asm(ex) -> str:
    """Assembly of every LLVM module inside a compiled Relax executable."""
    out, todo = [], [ex.mod]
    while todo:
        mod = todo.pop()
        if mod.kind == "llvm":
            out.append(mod.inspect_source("asm"))
        todo.extend(mod.imports)
    return "\n".join(out)


def _reference(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """NumPy int64 conv (no intermediate type can overflow), checked to fit int32."""
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oc, _, kh, kw = w.shape
    oh, ow = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], oc, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.int64))
    assert np.abs(out).max() < 2**31
    return out.astype(np.int32)


def _run_conv(target, cfg, x: np.ndarray, w: np.ndarray, stride: int = 1, pad: int = 0,
              requantize: bool = False) -> tuple[np.ndarray, str]:
    from tvm import relax

    from apq.kernels.pipeline import compile_relax

    ex = compile_relax(_conv_module(w, x.shape[2:], stride, pad, x.shape[0], requantize), target, cfg=cfg)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy(), _asm(ex)


# (in channels, out channels, H, W): covered by the VNNI tiling (C % 4 == 0, H*W % 16 == 0)
# (28x28 and 4x12: 16-pixel tiles that cross rows, legal because the epilogue iterates flat H*W)
VNNI_SHAPES = [(4, 16, 4, 4), (12, 48, 16, 16), (64, 24, 8, 8), (96, 10, 4, 8), (16, 24, 12, 12), (8, 16, 2, 40),
               (8, 16, 28, 28), (4, 8, 4, 12)]
# ragged pixel counts padded to whole 16-pixel vectors (14x14: 196 -> 208, 7x7: 49 -> 64,
# 5x5: 25 -> 32, 3x7: 21 -> 32): still VNNI, the padded pixels are computed and never read
PADDED_SHAPES = [(16, 7, 5, 5), (16, 32, 14, 14), (64, 48, 7, 7), (8, 16, 3, 7)]
# channels not a multiple of 4, or too few pixels to fill half the padded lanes (2x2: 4 of 16)
# -> the LLVM-vectorized path
RAGGED_SHAPES = [(6, 16, 4, 4), (3, 5, 3, 7), (8, 16, 2, 2)]


@pytest.mark.parametrize("ic,oc,h,w", VNNI_SHAPES + PADDED_SHAPES + RAGGED_SHAPES)
def test_pointwise_conv_is_bit_exact_over_the_full_range(host, ic, oc, h, w):
    target, cfg = host
    rng = np.random.default_rng(ic * 1000 + oc)
    x = rng.integers(0, 256, (1, ic, h, w)).astype(np.uint8)
    wt = rng.integers(-128, 128, (oc, ic, 1, 1)).astype(np.int8)
    # extremes the int16 path (vpmaddubsw) would saturate on: 255 * -128 summed in pairs
    x[0, :, 0, 0] = 255
    wt[0, :, 0, 0] = -128
    wt[-1, :, 0, 0] = 127
    got, asm = _run_conv(target, cfg, x, wt)
    np.testing.assert_array_equal(got, _reference(x, wt, 1, 0))
    vnni = (ic, oc, h, w) in VNNI_SHAPES + PADDED_SHAPES
    assert ("vpdpbusd" in asm) == vnni, (ic, oc, h, w)


@pytest.mark.parametrize("batch,ic,oc,h,w", [(1, 16, 24, 12, 12), (2, 16, 24, 8, 8), (1, 8, 16, 2, 40),
                                             (2, 8, 16, 4, 12), (1, 8, 24, 28, 28), (1, 16, 32, 14, 14),
                                             (2, 8, 16, 7, 7)])
def test_fused_requantize_epilogue_is_exact(host, batch, ic, oc, h, w):
    """The epilogue runs per register tile: every tile must see only its own accumulators."""
    target, cfg = host
    rng = np.random.default_rng(batch * 100 + h)
    x = rng.integers(0, 256, (batch, ic, h, w)).astype(np.uint8)
    wt = rng.integers(-128, 128, (oc, ic, 1, 1)).astype(np.int8)
    got, asm = _run_conv(target, cfg, x, wt, requantize=True)
    assert "vpdpbusd" in asm
    ref = np.clip(_reference(x, wt, 1, 0).astype(np.float32) * REQUANT_SCALE, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, ref)


def test_worst_case_sums_do_not_saturate(host):
    """All-255 activations against all -128 / all 127 weights: the extreme int32 sums."""
    target, cfg = host
    x = np.full((1, 256, 4, 4), 255, np.uint8)
    wt = np.stack([np.full((256, 1, 1), -128, np.int8), np.full((256, 1, 1), 127, np.int8)])
    got, asm = _run_conv(target, cfg, x, wt)
    assert "vpdpbusd" in asm
    assert got[0, 0].min() == got[0, 0].max() == 256 * 255 * -128
    assert got[0, 1].min() == got[0, 1].max() == 256 * 255 * 127


def test_without_vnni_the_old_path_runs(host):
    """The same conv with the dot-product family switched off: no vpdpbusd, same numbers."""
    target, cfg = host
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (1, 32, 8, 8)).astype(np.uint8)
    wt = rng.integers(-128, 128, (16, 32, 1, 1)).astype(np.int8)
    plain, asm = _run_conv(target, dataclasses.replace(cfg, int8_dot=""), x, wt)
    assert "vpdpbusd" not in asm
    fast, asm = _run_conv(target, cfg, x, wt)
    assert "vpdpbusd" in asm
    np.testing.assert_array_equal(plain, fast)


def test_non_pointwise_convs_keep_the_generic_path(host):
    """3x3 and strided convs are not tensorized (yet) and stay exact."""
    target, cfg = host
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (1, 8, 8, 8)).astype(np.uint8)
    for stride, pad, k in ((1, 1, 3), (2, 0, 1)):
        wt = rng.integers(-128, 128, (16, 8, k, k)).astype(np.int8)
        got, asm = _run_conv(target, cfg, x, wt, stride, pad)
        np.testing.assert_array_equal(got, _reference(x, wt, stride, pad))
        assert "vpdpbusd" not in asm


def test_config_roundtrip_and_arm_has_no_int8_dot():
    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.targets.registry import get_target

    arm = CpuScheduleConfig.for_target(get_target("raspberry-pi/4b-aarch64").tvm())
    assert arm.int8_dot == ""
    cfg = CpuScheduleConfig(int8_dot="avx512vnni")
    assert CpuScheduleConfig.from_json(cfg.to_json()) == cfg
    # configs saved before the field existed still load
    old = cfg.to_json()
    del old["int8_dot"]
    assert CpuScheduleConfig.from_json(old).int8_dot == ""


def test_int8_mobilenetv2_uses_vnni_and_verifies_against_onnxruntime(host, mbv2_qdq, tmp_path):
    import tarfile

    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.verify import verify_artifact

    res = compile_onnx(mbv2_qdq, "host", tmp_path / "mbv2_qdq.apq")
    rep = verify_artifact(open_artifact(res.artifact_path), mbv2_qdq)
    assert rep.passed, rep.to_json()
    with tarfile.open(res.artifact_path) as tar:
        lib = next(m for m in tar.getmembers() if m.name.endswith(".so"))
        tar.extract(lib, tmp_path, filter="data")
    import subprocess

    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / lib.name)],
                         capture_output=True, text=True, check=True).stdout
    assert dis.count("vpdpbusd") >= 10  # the model's pointwise convs run on VNNI


def test_vnni_and_16bit_paths_agree_on_a_mobilenet_layer(host):
    """MobileNetV2's 96->576 pointwise conv at 16x16 with its requantize epilogue: the VNNI and
    the 16-bit (vpmaddwd) schedules give identical int8 outputs. Speed lives in bench/int8_paths.py."""
    from tvm import relax

    from apq.kernels.pipeline import compile_relax

    target, cfg = host
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (1, 96, 16, 16)).astype(np.uint8)
    wt = rng.integers(-128, 128, (576, 96, 1, 1)).astype(np.int8)
    mod = _conv_module(wt, (16, 16), requantize=True)
    outs = {}
    for label, c in (("vnni", cfg), ("int16", dataclasses.replace(cfg, int8_dot=""))):
        vm = relax.VirtualMachine(compile_relax(mod, target, cfg=c), tvm.cpu())
        outs[label] = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(outs["vnni"], outs["int16"])


def test_int8_mobilenetv2_with_ragged_14x14_and_7x7_stages_verifies(host, tmp_path):
    """At 112 px the late stages are 14x14 and 7x7 (196 and 49 pixels): their pointwise convs
    run on the padded VNNI path, and the whole model must still agree with onnxruntime."""
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.examples import mobilenetv2_onnx, quantize_qdq
    from apq.toolchain.verify import verify_artifact

    fp = mobilenetv2_onnx(tmp_path / "mbv2_112.onnx", resolution=112, width=0.35)
    q = quantize_qdq(fp, tmp_path / "mbv2_112_qdq.onnx", per_channel=True)
    res = compile_onnx(q, "host", tmp_path / "mbv2_112_qdq.apq")
    rep = verify_artifact(open_artifact(res.artifact_path), q)
    assert rep.passed, rep.to_json()


def test_ragged_pointwise_epilogue_reads_no_gathered_accumulators(host, tmp_path):
    """A QDQ pointwise conv at 14x14 (196 pixels, padded to 208): the per-channel requantize
    epilogue runs once over the real pixels. Predicated per 16-pixel tile (the old schedule),
    LLVM read its accumulators and per-channel parameters with vpgatherdd, and those kernels
    ran 2.2x slower (MobileNetV2 224 px: 64->256 at 14x14, 0.153 -> 0.070 ms)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from test_cpu_schedules import _relax_module

    from apq.kernels.pipeline import compile_relax
    from apq.toolchain.examples import quantize_qdq

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((64, 16, 1, 1)) * 0.2).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
                              "pw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 14, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 14, 14])], [w, b])
    fp = tmp_path / "pw.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp)
    q = quantize_qdq(fp, tmp_path / "pw_q.onnx", per_channel=True)
    mod, _, spec = _relax_module(q, int8_layout="NCHW")  # the pixel-lane path this test is about
    asm = _asm(compile_relax(mod, spec.tvm()))
    assert "vpdpbusd" in asm and "gather" not in asm
