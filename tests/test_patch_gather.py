"""Patch gather (kernels/im2col.py, toolchain/patch_gather.py): the gathered patches equal NumPy's
for either source layout, padding, dilation and depth padding; a float RGB stem becomes one
direct conv over the NCHW input (kernels/nchw_input_conv.py), or with that off, gather (straight
from the NCHW input, its transpose gone) + a 1x1 conv, with the same outputs."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402


def _numpy_patches(x_nhwc: np.ndarray, kh: int, kw: int, stride: int, dilation: int, pads: tuple[int, int, int, int],
                   pad_value: float, depth: int) -> np.ndarray:
    top, left, bottom, right = pads
    xp = np.pad(x_nhwc, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=pad_value)
    n, hp, wp, c = xp.shape
    oh, ow = (hp - (kh - 1) * dilation - 1) // stride + 1, (wp - (kw - 1) * dilation - 1) // stride + 1
    out = np.zeros((n, oh, ow, depth), x_nhwc.dtype)
    for ky in range(kh):
        for kx in range(kw):
            k0 = (ky * kw + kx) * c
            out[..., k0:k0 + c] = xp[:, ky * dilation:ky * dilation + stride * (oh - 1) + 1:stride,
                                     kx * dilation:kx * dilation + stride * (ow - 1) + 1:stride, :]
    return out


@pytest.mark.parametrize("layout,dtype,c,kernel,stride,dilation,pads,pad_value,multiple", [
    ("NHWC", "uint8", 3, 3, 2, 1, (1, 1, 1, 1), 7, 4),  # RGB stem, zero point 7 as padding, 27 -> 28
    ("NCHW", "uint8", 3, 3, 2, 1, (0, 0, 0, 0), 0, 4),  # read straight from an NCHW (pre-padded) input
    ("NCHW", "float32", 1, 5, 1, 2, (2, 1, 3, 0), 0.0, 1),  # dilated, asymmetric padding, grey
    ("NHWC", "float32", 4, 3, 1, 1, (1, 1, 1, 1), -1.5, 1),
])
def test_gathered_patches_equal_numpy(layout, dtype, c, kernel, stride, dilation, pads, pad_value, multiple):
    from tvm import te

    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.kernels.im2col import find_im2col, im2col_compute, im2col_depth, schedule_im2col
    from apq.targets.registry import get_target

    rng = np.random.default_rng(c + kernel)
    x_nhwc = (rng.integers(0, 256, (1, 13, 11, c)) if dtype == "uint8" else rng.standard_normal((1, 13, 11, c))).astype(dtype)
    x = x_nhwc if layout == "NHWC" else np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    data = te.placeholder(x.shape, dtype, name="data")
    cols = im2col_compute(kernel, kernel, (stride, stride), (dilation, dilation), pads, pad_value, multiple, layout)(data)
    func = te.create_prim_func([data, cols])
    sch = tvm.s_tir.Schedule(func)
    target = get_target("host").tvm()
    assert schedule_im2col(sch, find_im2col(sch), CpuScheduleConfig.for_target(target))
    lib = tvm.compile(sch.mod, target=target)
    depth = im2col_depth(kernel, kernel, c, multiple)
    want = _numpy_patches(x_nhwc, kernel, kernel, stride, dilation, pads, pad_value, depth)
    got = tvm.runtime.tensor(np.zeros(want.shape, dtype))
    lib(tvm.runtime.tensor(x), got)
    np.testing.assert_array_equal(got.numpy(), want)
    assert depth % multiple == 0 and depth >= kernel * kernel * c


def _float_stem_module(w_hwio: np.ndarray, size: int = 19):
    """What ConvertLayout leaves of a float RGB stem: transpose(input) -> NHWC conv (+ bias)."""
    x = relax.Var("x", relax.TensorType((1, w_hwio.shape[2], size, size), "float32"))
    bias = np.linspace(-1, 1, w_hwio.shape[3], dtype=np.float32).reshape(1, 1, 1, -1)
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            nhwc = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
            conv = bb.emit(relax.op.nn.conv2d(nhwc, relax.const(w_hwio), strides=2, padding=1, data_layout="NHWC",
                                              kernel_layout="HWIO", out_layout="NHWC"))
            out = bb.emit_output(relax.op.add(conv, relax.const(bias)))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod) -> list[str]:
    names = []

    def visit(e):
        if isinstance(e, relax.Call):
            name = getattr(e.op, "name", "")
            names.append(f"call_tir:{e.args[0].name_hint}" if name == "relax.call_tir" else name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def _calls(mod, op: str) -> list:
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == op else None)
    return found


def _run(mod, x):
    from apq.kernels.pipeline import compile_relax
    from apq.targets.registry import get_target

    lib = compile_relax(mod, get_target("host").tvm())
    return relax.VirtualMachine(lib, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_float_stem_reads_the_nchw_input_directly_and_matches_the_gather_path_bit_for_bit():
    """Default float policy: the stem is one direct conv over the NCHW input (its transpose
    gone, no gather, no conv2d left); the gather + pointwise conv path (the policy's
    ``direct_nchw_float=False``) sums the same products in the same order: equal bits."""
    from apq.toolchain.float_layout import gather_stems
    from apq.toolchain.patch_gather import GatherPolicy, gather_few_channel_convs

    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 3, 3, 32)).astype(np.float32)
    mod = _float_stem_module(w)
    direct = gather_stems(mod)
    ops = _ops(direct)
    assert "call_tir:conv2d_nchw_input" in ops and "relax.permute_dims" not in ops, ops
    assert not _calls(direct, "relax.nn.conv2d") and "call_tir:im2col" not in ops
    gathered, count = gather_few_channel_convs(mod, GatherPolicy("float32", "float32", direct_nchw_float=False))
    assert count == 1 and "call_tir:im2col" in _ops(gathered)
    x = rng.standard_normal((1, 3, 19, 19)).astype(np.float32)
    want, via_gather, got = (_run(m, x) for m in (mod, gathered, direct))
    assert got.shape == want.shape == (1, 10, 10, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got, via_gather)


def test_float_stem_becomes_gather_from_the_nchw_input_plus_pointwise_conv():
    from apq.toolchain.patch_gather import GatherPolicy, gather_few_channel_convs

    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 3, 3, 32)).astype(np.float32)
    mod = _float_stem_module(w)
    new, _ = gather_few_channel_convs(mod, GatherPolicy("float32", "float32", direct_nchw_float=False))
    new = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(new))
    ops = _ops(new)
    assert "relax.permute_dims" not in ops and "call_tir:im2col" in ops  # the input transpose is gone
    convs = _calls(new, "relax.nn.conv2d")
    assert len(convs) == 1 and tuple(int(v) for v in convs[0].args[1].ty.shape) == (1, 1, 27, 32)
    x = rng.standard_normal((1, 3, 19, 19)).astype(np.float32)
    want, got = (_run(m, x) for m in (mod, new))
    assert got.shape == want.shape == (1, 10, 10, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a 16-channel conv is left alone
    from apq.toolchain.float_layout import gather_stems

    script = gather_stems(_float_stem_module(rng.standard_normal((3, 3, 16, 8)).astype(np.float32))).script()
    assert "im2col" not in script and "conv2d_nchw_input" not in script

