"""The vpdpbusd depthwise kernel (kernels/x86_int8_depthwise.py), the channel-block handoff from
its producer (kernels/blocked_handoff.py) and the zero-point pad it takes over
(toolchain/int8_layout.py): exact against NumPy per kernel size, stride, padding value and
channel block width; the handoff and the pad folding change no bit of a whole model."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from apq.kernels import x86_int8_depthwise as dw  # noqa: E402
from apq.kernels.reference import depthwise_conv2d_nhwc_int  # noqa: E402


def _host_has_vnni() -> bool:
    from apq.targets.registry import get_target

    return "avx512vnni" in get_target("host").features


needs_vnni = pytest.mark.skipif(not _host_has_vnni(), reason="host CPU has no AVX-512 VNNI")


def test_packed_weight_puts_four_horizontal_taps_of_one_channel_together_and_zeroes_the_rest():
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (5, 5, 1, 8)).astype(np.int8)
    p = dw.pack_depthwise_weight(w)
    assert p.shape == (5, 2, 8, 4) and p.flags.c_contiguous  # 5 taps -> 2 groups of 4
    for ky in range(5):
        for c in range(8):
            taps = p[ky, :, c, :].reshape(-1)
            assert list(taps[:5]) == list(w[ky, :, 0, c]) and not taps[5:].any()
    with pytest.raises(ValueError, match="one input channel"):
        dw.pack_depthwise_weight(np.zeros((3, 3, 2, 8), np.int8))


def test_bands_are_whole_register_tiles_that_divide_the_rows_and_fit_the_budget():
    row_bytes = 1000
    assert dw.band_rows(56, 4, lambda rows: rows * row_bytes, budget=20_000) == 8  # 8 | 56, 16 > 20
    assert dw.band_rows(56, 4, lambda rows: rows * row_bytes, budget=100) == 4  # at least one tile
    assert dw.band_rows(7, 1, lambda rows: rows * row_bytes, budget=10**9) == 7  # the whole image


def test_register_tiles_divide_the_output_and_leave_room_for_the_weights():
    assert dw.register_tile(112, 112, 3) == (4, 4)
    rows, cols = dw.register_tile(7, 7, 14)  # 7x7 kernel: 14 weight vectors
    assert (rows, cols) == (1, 7) and rows * cols <= dw.MAX_ACCUMULATORS


def _conv_func(h: int, c: int, k: int, stride: int, pad: int, pad_value: int):
    """The packed compute + a shift/narrow epilogue, scheduled by apq's rule, built for the host."""
    from tvm import s_tir, te

    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.targets.registry import get_target
    from apq.toolchain.kernel_impl import primfunc_impl

    x = te.placeholder((1, h, h, c), "uint8", name="x")
    wp = te.placeholder((k, dw.tap_groups(k), c, 4), "int8", name="wp")
    acc = dw.depthwise_packed_compute(x, wp, k, (stride, stride), (pad, pad, pad, pad), pad_value)
    out = te.compute(acc.shape, lambda *i: acc(*i), name="epilogue")
    sch = s_tir.Schedule(te.create_prim_func([x, wp, out]))
    cfg = CpuScheduleConfig.for_target(get_target("host").tvm())
    found = dw.find_packed_depthwise(sch)
    assert found is not None and dw.schedule_packed_depthwise(sch, sch.mod["main"], *found, cfg)
    return tvm.compile(sch.mod, target=get_target("host").tvm()), primfunc_impl(sch.mod["main"])


@needs_vnni
@pytest.mark.parametrize("h,c,k,stride,pad,pad_value", [
    (9, 16, 3, 1, 1, 0),     # one channel block, odd size
    (12, 32, 3, 2, 1, 0),    # stride 2, two blocks
    (10, 48, 3, 1, 1, 128),  # a zero point as the padding value
    (11, 8, 5, 1, 2, 7),     # 5x5 (two tap groups), 8 channels: ymm vpdpbusd
    (14, 12, 7, 2, 3, 0),    # 7x7 stride 2, 12 channels: xmm vpdpbusd
    (8, 16, 3, 1, 0, 0),     # no padding
])
def test_depthwise_kernel_is_exact_and_runs_vpdpbusd(h, c, k, stride, pad, pad_value):
    lib, impl = _conv_func(h, c, k, stride, pad, pad_value)
    assert impl == "avx512-vnni"
    rng = np.random.default_rng(h * c + k)
    x = rng.integers(0, 256, (1, h, h, c)).astype(np.uint8)
    x[0, 0] = 255  # the extreme products: 255 * -128 on every tap
    w = rng.integers(-128, 128, (k, k, 1, c)).astype(np.int8)
    w[:, :, 0, 0] = -128
    xp = np.pad(x.astype(np.int64), ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=pad_value)
    want = depthwise_conv2d_nhwc_int(xp, w[:, :, 0, :], stride=stride, padding=0)
    got = tvm.runtime.tensor(np.zeros(want.shape, np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(dw.pack_depthwise_weight(w)), got)
    np.testing.assert_array_equal(got.numpy(), want)


@needs_vnni
def test_a_zero_point_pad_before_the_conv_is_folded_into_its_copy():
    """The explicit NCHW pad ConvertLayout leaves between two transposes (qdq_lowering pads a
    non-zero zero point explicitly) disappears, and the built module pads with its value."""
    from tvm import relax

    from apq.kernels.pipeline import compile_relax
    from apq.targets.registry import get_target
    from apq.toolchain.int8_layout import pack_depthwise_convs

    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (3, 3, 1, 16)).astype(np.int8)
    x = relax.Var("x", relax.TensorType((1, 6, 6, 16), "uint8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            nchw = bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
            padded = bb.emit(relax.op.nn.pad(nchw, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=128.0))
            nhwc = bb.emit(relax.op.permute_dims(padded, [0, 2, 3, 1]))
            out = bb.emit_output(relax.op.nn.conv2d(nhwc, relax.const(w), groups=16, data_layout="NHWC",
                                                    kernel_layout="HWIO", out_dtype="int32"))
        bb.emit_func_output(out)
    mod, count = pack_depthwise_convs(bb.get())
    mod = relax.transform.DeadCodeElimination()(mod)
    text = mod["main"].script()
    assert count == 1 and "R.nn.pad" not in text and "permute_dims" not in text
    xv = rng.integers(0, 256, (1, 6, 6, 16)).astype(np.uint8)
    vm = relax.VirtualMachine(compile_relax(mod, get_target("host").tvm()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(xv)).numpy()
    xp = np.pad(xv.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=128)
    np.testing.assert_array_equal(got, depthwise_conv2d_nhwc_int(xp, w[:, :, 0, :]))


def test_packs_depthwise_takes_multiplier_one_kxk_convs_over_tileable_channels():
    from apq.toolchain.int8_layout import packs_depthwise

    def w(oc, ic, k):
        return np.zeros((oc, ic, k, k), np.int8)

    assert packs_depthwise(w(32, 1, 3), 32) and packs_depthwise(w(8, 1, 5), 8) and packs_depthwise(w(12, 1, 7), 12)
    assert not packs_depthwise(w(32, 1, 1), 32)  # 1x1: a pointwise conv
    assert not packs_depthwise(w(32, 3, 3), 1)  # a regular conv
    assert not packs_depthwise(w(64, 1, 3), 32)  # channel multiplier 2
    assert not packs_depthwise(w(6, 1, 3), 6)  # 6 channels: no vpdpbusd lane count


@needs_vnni
def test_depthwise_inputs_are_handed_over_in_channel_blocks_without_changing_a_bit(mbv2_qdq, tmp_path, monkeypatch):
    from apq.kernels import blocked_handoff
    from apq.kernels.pipeline import fused_module
    from apq.targets.registry import get_target
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import CompileOptions, compile_onnx, lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs
    from apq.toolchain.runtime import run_artifact

    spec = get_target("host")
    model = load_onnx(mbv2_qdq)
    mod, _ = lower_module(import_to_relax(model, resolve_input_specs(model, {})), model, spec,
                          CompileOptions(target="host"))
    fused = fused_module(mod, spec.tvm())
    funcs = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    handed = [f for name, f in funcs.items() if "depthwise" in name and name.endswith(blocked_handoff.BLOCKED_SUFFIX)]
    assert len(handed) >= 3, sorted(funcs)
    for f in handed:  # the input arrives as [N, C/L, H, W, L]
        assert len(f.params[0].shape) == 5 and int(f.params[0].shape[-1]) == blocked_handoff.depthwise_lanes(f)
    producers = [f for name, f in funcs.items() if "depthwise" not in name and name.endswith(blocked_handoff.BLOCKED_SUFFIX)]
    # (structurally equal copies are one PrimFunc: BlockBuilder.add_func deduplicates)
    assert producers and all(len(f.params[-1].shape) == 5 for f in producers)

    outs = []
    x = None
    for handoff in (True, False):
        if not handoff:
            monkeypatch.setattr(blocked_handoff, "hand_over_blocked", lambda mod, func_name="main": (mod, 0))
        res = compile_onnx(mbv2_qdq, "host", tmp_path / f"h{handoff}.apq", options=CompileOptions(target="host"))
        art = open_artifact(res.artifact_path)
        assert {layer["impl"] for layer in res.manifest["layers"] if layer["geometry"]["op"] == "dwconv"} == {
            "avx512-vnni"}
        x = art.random_inputs(0) if x is None else x
        outs.append(run_artifact(art, [v * 4 for v in x])[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[0]).max() > 0
