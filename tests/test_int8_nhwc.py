"""Int8 graphs in NHWC on VNNI CPUs (toolchain/int8_layout.py, kernels/x86_int8_nhwc.py): the
packed pointwise kernel is exact against NumPy and really runs vpdpbusd, the layout pass leaves
only the input/classifier transposes, and the NHWC build gives the same bits as the NCHW one."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from apq.kernels.x86_int8_nhwc import lanes_for, pack_pointwise_weight  # noqa: E402


def _host_has_vnni() -> bool:
    from apq.targets.registry import get_target

    return "avx512vnni" in get_target("host").features


needs_vnni = pytest.mark.skipif(not _host_has_vnni(), reason="host CPU has no AVX-512 VNNI")


def test_packed_weight_layout_puts_four_input_channels_of_one_output_channel_together():
    w = np.arange(1 * 1 * 8 * 16, dtype=np.int64).reshape(1, 1, 8, 16).astype(np.int8)
    p = pack_pointwise_weight(w)
    assert p.shape == (2, 16, 4) and p.flags.c_contiguous
    for g in range(2):
        for o in range(16):
            for k in range(4):
                assert p[g, o, k] == w[0, 0, 4 * g + k, o]


def test_lanes_cover_multiples_of_four_only():
    assert [lanes_for(c) for c in (16, 64, 24, 8, 12, 6, 3)] == [16, 16, 8, 8, 4, None, None]


def _build_packed(h: int, w: int, ic: int, oc: int):
    """The packed pointwise compute with a shift+narrow epilogue, scheduled by apq's rule."""
    from tvm import s_tir, te

    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.kernels.x86_int8_nhwc import find_packed_pointwise, pointwise_packed_compute, schedule_packed_pointwise
    from apq.targets.registry import get_target
    from apq.toolchain.kernel_impl import primfunc_impl

    x = te.placeholder((1, h, w, ic), "uint8", name="x")
    wp = te.placeholder((ic // 4, oc, 4), "int8", name="wp")
    acc = pointwise_packed_compute(x, wp)
    out = te.compute(acc.shape, lambda *i: (acc(*i) >> 4).astype("int16"), name="epilogue")
    func = te.create_prim_func([x, wp, out])
    sch = s_tir.Schedule(func)
    cfg = CpuScheduleConfig.for_target(get_target("host").tvm())
    assert schedule_packed_pointwise(sch, func, find_packed_pointwise(sch), cfg)
    impl = primfunc_impl(sch.mod["main"])
    return tvm.compile(sch.mod, target=get_target("host").tvm()), impl


@needs_vnni
@pytest.mark.parametrize("h,w,ic,oc", [
    (56, 56, 24, 144),  # 16 lanes, 3 channel vectors
    (112, 112, 16, 64),  # 4 input-channel groups only
    (14, 14, 64, 256),  # 14-pixel rows
    (7, 7, 320, 64),  # 7-pixel rows, long reduction
    (8, 8, 32, 24),  # 24 output channels: the 8-lane (ymm) vpdpbusd
    (16, 16, 8, 12),  # 12 output channels: the 4-lane (xmm) vpdpbusd
])
def test_packed_pointwise_is_exact_and_runs_vpdpbusd(h, w, ic, oc):
    lib, impl = _build_packed(h, w, ic, oc)
    assert impl == "avx512-vnni"
    rng = np.random.default_rng(h + ic + oc)
    x = rng.integers(0, 256, (1, h, w, ic), dtype=np.uint8)
    wt = rng.integers(-128, 128, (1, 1, ic, oc), dtype=np.int8)
    ref = ((x.reshape(-1, ic).astype(np.int32) @ wt.reshape(ic, oc).astype(np.int32)) >> 4).astype(np.int16)
    out = tvm.runtime.tensor(np.zeros((1, h, w, oc), np.int16))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(pack_pointwise_weight(wt)), out)
    np.testing.assert_array_equal(out.numpy().reshape(-1, oc), ref)


def _lowered(onnx_path, int8_layout: str):
    from apq.targets.registry import get_target
    from apq.toolchain.compile import CompileOptions, lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs

    model = load_onnx(onnx_path)
    mod = import_to_relax(model, resolve_input_specs(model, {}))
    mod, _ = lower_module(mod, model, get_target("host"), CompileOptions(target="host", int8_layout=int8_layout))
    return mod


def _op_counts(mod) -> dict[str, int]:
    from tvm import relax

    counts: dict[str, int] = {}

    def visit(e):
        if isinstance(e, relax.Call):
            name = getattr(e.op, "name", None) or "?"
            if name == "relax.call_tir":
                name = "call_tir:" + e.args[0].name_hint
            counts[name] = counts.get(name, 0) + 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return counts


@needs_vnni
def test_int8_graph_goes_nhwc_with_packed_pointwise_and_depthwise_convs(mbv2_qdq):
    nchw, nhwc = _op_counts(_lowered(mbv2_qdq, "NCHW")), _op_counts(_lowered(mbv2_qdq, "NHWC"))
    def calls(counts, prefix):
        return sum(v for k, v in counts.items() if k.startswith(f"call_tir:{prefix}"))

    packed, depthwise = calls(nhwc, "conv2d_u8s8_nhwc"), calls(nhwc, "depthwise_u8s8_nhwc")
    assert nchw.get("relax.permute_dims", 0) == 0 and calls(nchw, "conv2d_u8s8_nhwc") == 0
    assert calls(nchw, "depthwise_u8s8_nhwc") == 0
    assert packed >= 5  # every pointwise conv of the example MobileNetV2 (channels are multiples of 4)
    assert depthwise >= 3  # and every depthwise conv (kernels/x86_int8_depthwise.py)
    assert nhwc.get("relax.nn.conv2d", 0) + packed + depthwise == nchw["relax.nn.conv2d"]
    assert nhwc.get("relax.permute_dims", 0) <= 2  # the input and the classifier's flatten only


@needs_vnni
def test_int8_nhwc_build_is_bit_identical_to_nchw_and_matches_onnxruntime(mbv2_qdq, tmp_path):
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import CompileOptions, compile_onnx
    from apq.toolchain.runtime import run_artifact
    from apq.toolchain.verify import verify_artifact

    outs = {}
    for layout in ("NHWC", "NCHW"):
        res = compile_onnx(mbv2_qdq, "host", tmp_path / f"q_{layout}.apq",
                           options=CompileOptions(target="host", int8_layout=layout))
        art = open_artifact(res.artifact_path)
        rep = verify_artifact(art, mbv2_qdq)
        assert rep.passed, rep.to_json()
        impls = {layer["impl"] for layer in res.manifest["layers"]
                 if layer["geometry"]["op"] == "conv" and layer["geometry"]["kernel"] == 1}
        assert impls == {"avx512-vnni"}, impls
        stems = [layer for layer in res.manifest["layers"]
                 if layer["geometry"]["op"] == "conv" and layer["geometry"]["in_ch"] <= 4]
        assert len(stems) == 1 and stems[0]["geometry"]["kernel"] == 3
        # NHWC: the RGB stem runs as patch gather + packed pointwise conv (im2col_few_channel_convs)
        assert stems[0]["impl"] == ("avx512-vnni" if layout == "NHWC" else "int-fp32acc"), stems[0]
        rng = np.random.default_rng(1)
        inputs = [rng.standard_normal(s.shape).astype(s.dtype) * 2 for s in art.input_specs]
        outs[layout] = run_artifact(art, inputs)
    for a, b in zip(outs["NHWC"], outs["NCHW"]):
        np.testing.assert_array_equal(a, b)


def test_unknown_int8_layout_is_a_clear_error():
    from apq.toolchain.compile import CompileOptions
    from apq.toolchain.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="int8 layout"):
        CompileOptions(int8_layout="NCHWc")


def _few_channel_conv_module(w: np.ndarray, stride: int, padding: int, out_dtype: str, size: int = 17):
    """A lowered int8 stem in NHWC: ``u8 x s8`` conv, float accumulation written as
    ``astype(conv_f32, int32)`` (qdq_lowering's exact path) or an int32 conv."""
    from tvm import relax

    x = relax.Var("x", relax.TensorType((1, size, size, w.shape[2]), "uint8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=padding, data_layout="NHWC",
                                              kernel_layout="HWIO", out_layout="NHWC", out_dtype=out_dtype))
            acc = bb.emit(relax.op.astype(conv, "int32")) if out_dtype == "float32" else conv
            out = bb.emit_output(relax.op.subtract(acc, relax.const(np.int32(7))))
        bb.emit_func_output(out)
    return bb.get()


def _numpy_conv_nhwc(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
    kh, kw, _, oc = w.shape
    xp = np.pad(x.astype(np.int64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oh, ow = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    out = np.zeros((1, oh, ow, oc), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, ky:ky + stride * (oh - 1) + 1:stride, kx:kx + stride * (ow - 1) + 1:stride, :]
            out += patch @ w[ky, kx].astype(np.int64)
    return out


@pytest.mark.parametrize("ic,oc,kernel,stride,padding,out_dtype", [
    (3, 32, 3, 2, 1, "float32"),  # the RGB stem (float accumulation), padded inside the conv
    (1, 16, 3, 1, 1, "float32"),  # the Fashion-MNIST stem
    (3, 24, 3, 2, 0, "int32"),  # an int32 conv on a pre-padded input, 8-lane output
    (4, 16, 5, 2, 2, "int32"),  # 5x5: 100 taps, already whole groups
])
def test_few_channel_conv_becomes_patch_gather_plus_packed_pointwise_exactly(ic, oc, kernel, stride, padding,
                                                                               out_dtype):
    from tvm import relax

    from apq.kernels.pipeline import compile_relax
    from apq.targets.registry import get_target
    from apq.toolchain.int8_layout import im2col_few_channel_convs, pack_pointwise_convs

    rng = np.random.default_rng(ic * 100 + kernel)
    w = rng.integers(-128, 128, (kernel, kernel, ic, oc)).astype(np.int8)
    mod = _few_channel_conv_module(w, stride, padding, out_dtype)
    gathered, count = im2col_few_channel_convs(mod)
    assert count == 1
    gathered = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(gathered))
    gathered, packed = pack_pointwise_convs(gathered)
    counts = _op_counts(gathered)
    assert packed == 1 and "relax.nn.conv2d" not in counts and "relax.astype" not in counts  # f32 round trip gone
    x = rng.integers(0, 256, (1, 17, 17, ic)).astype(np.uint8)
    x[0, :3, :3] = 255  # extreme corner values next to the padding
    target = get_target("host").tvm()
    outs = [relax.VirtualMachine(compile_relax(m, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
            for m in (mod, gathered)]
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[1], _numpy_conv_nhwc(x, w, stride, padding) - 7)


def test_wide_or_pointwise_convs_are_not_gathered():
    from apq.toolchain.int8_layout import im2col_few_channel_convs

    rng = np.random.default_rng(0)
    for shape in ((3, 3, 8, 16), (1, 1, 3, 16), (3, 3, 3, 10)):  # 8 channels; 1x1; 10 output channels
        w = rng.integers(-128, 128, shape).astype(np.int8)
        assert im2col_few_channel_convs(_few_channel_conv_module(w, 1, 0, "int32"))[1] == 0


def _matmul_module(w: np.ndarray, rows: int):
    """``matmul(x: (rows, K) u8, W: (K, N) s8) -> i32``, as qdq_lowering emits it."""
    from tvm import relax

    x = relax.Var("x", relax.TensorType((rows, w.shape[0]), "uint8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("m,k,n", [(1, 320, 1000), (3, 64, 24)])  # batch-1 classifier (8 lanes); 3 rows, 8 lanes
def test_int8_matmul_becomes_the_packed_pointwise_kernel_exactly(m, k, n):
    from tvm import relax

    from apq.kernels.pipeline import compile_relax
    from apq.targets.registry import get_target
    from apq.toolchain.int8_layout import pack_matmuls

    rng = np.random.default_rng(m + n)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    packed, count = pack_matmuls(_matmul_module(w, m))
    assert count == 1 and "relax.matmul" not in _op_counts(packed)
    xs = rng.integers(0, 256, (m, k)).astype(np.uint8)
    xs[0] = 255  # the largest products
    target = get_target("host").tvm()
    got = relax.VirtualMachine(compile_relax(packed, target), tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy()
    np.testing.assert_array_equal(got, xs.astype(np.int64) @ w.astype(np.int64))
    wide = rng.integers(-128, 128, (k, 10)).astype(np.int8)  # 10 outputs: no vpdpbusd lane count
    assert pack_matmuls(_matmul_module(wide, m))[1] == 0


def test_gathers_patches_takes_ungrouped_few_channel_kxk_convs_with_packable_outputs():
    from apq.toolchain.int8_layout import gathers_patches

    def w(oc: int, ic: int, k: int) -> np.ndarray:
        return np.zeros((oc, ic, k, k), np.int8)

    assert gathers_patches(w(32, 3, 3), 1) and gathers_patches(w(16, 1, 5), 1) and gathers_patches(w(8, 4, 3), 1)
    assert not gathers_patches(w(32, 5, 3), 1)  # too many input channels
    assert not gathers_patches(w(32, 3, 1), 1)  # 1x1: already a pointwise conv
    assert not gathers_patches(w(3, 1, 3), 3)  # grouped (depthwise)
    assert not gathers_patches(w(6, 3, 3), 1)  # 6 output channels: no vpdpbusd lane count (lanes_for)


def _signed_stem_net():
    import torch

    from apq.toolchain.supernet.qlayers import InvertedResidual, QConvBNAct, QLinear, StaticNet, calibrate_net

    torch.manual_seed(0)
    stem = QConvBNAct(3, 16, 3, 2, in_signed=True, w_bits=8, a_bits=8)  # apq's exporter: signed image input
    net = StaticNet(stem, [InvertedResidual(16, 32, 16, 3, 1, 8, 8, 8, 8)], QConvBNAct(16, 32, 1, in_signed=True,
                    w_bits=8, a_bits=8), QLinear(32, 10, w_bits=8, a_bits=8))
    net.eval()
    calibrate_net(net, torch.randn(8, 3, 20, 20, generator=torch.Generator().manual_seed(0)))
    return net


@needs_vnni
def test_signed_stem_is_rebiased_into_the_patch_gather_and_gives_the_same_bits(tmp_path, monkeypatch):
    """An apq-exported stem reads a signed image: qdq_lowering's ``uint8_stems`` shifts it to u8 so
    the NHWC int8 layout gathers it into patches for vpdpbusd. Without it (the gather predicate
    off) the stem accumulates in float32; both builds must agree bit for bit and with onnxruntime."""
    from apq.toolchain import int8_layout
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.runtime import run_artifact
    from apq.toolchain.supernet.qlayers import export_onnx
    from apq.toolchain.verify import verify_artifact

    onnx_path = export_onnx(_signed_stem_net(), tmp_path / "stem.onnx", (1, 3, 20, 20))
    arts = {}
    for gathered in (True, False):
        if not gathered:
            monkeypatch.setattr(int8_layout, "gathers_patches", lambda w, groups: False)
        res = compile_onnx(onnx_path, "host", tmp_path / f"g{gathered}.apq")
        arts[gathered] = open_artifact(res.artifact_path)
        stem = res.manifest["layers"][0]
        assert stem["name"] == "stem.weight_q"
        want = ("conv2d.uint8xint8->int32", "avx512-vnni") if gathered else ("conv2d.int8xint8->float32", "int-fp32acc")
        assert (stem["kernel"], stem["impl"]) == want, stem
        assert verify_artifact(arts[gathered], onnx_path).passed
    for seed in range(3):
        x = arts[True].random_inputs(seed)
        np.testing.assert_array_equal(run_artifact(arts[True], x)[0], run_artifact(arts[False], x)[0])
