"""The direct few-channel conv over an NCHW input (kernels/nchw_input_conv.py): equal to NumPy for
strides, dilation, asymmetric padding, grey and RGB inputs, channel counts that are not a vector
multiple, serial and parallel; its padded-row copy is unconditional and vectorized."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


def _numpy_conv(x: np.ndarray, w_hwio: np.ndarray, stride: int, dilation: int, pads: tuple[int, int, int, int]) -> np.ndarray:
    top, left, bottom, right = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw, _, oc = w_hwio.shape
    oh = (xp.shape[2] - (kh - 1) * dilation - 1) // stride + 1
    ow = (xp.shape[3] - (kw - 1) * dilation - 1) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, oc))
    for ky in range(kh):
        for kx in range(kw):
            win = xp[:, :, ky * dilation:ky * dilation + stride * (oh - 1) + 1:stride,
                     kx * dilation:kx * dilation + stride * (ow - 1) + 1:stride]  # N, C, OH, OW
            out += np.einsum("nchw,cf->nhwf", win, w_hwio[ky, kx].astype(np.float64))
    return out


def _build(c: int, size: tuple[int, int], kernel: int, oc: int, stride: int, dilation: int,
           pads: tuple[int, int, int, int], parallel: bool):
    from tvm import te

    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.kernels.nchw_input_conv import nchw_input_conv_compute, schedule_nchw_input_conv
    from apq.kernels.stack_alloc import tir_pipeline
    from apq.targets.registry import get_target

    data = te.placeholder((1, c, *size), "float32", name="data")
    weight = te.placeholder((kernel, kernel, c, oc), "float32", name="weight")
    out = nchw_input_conv_compute(kernel, kernel, (stride, stride), (dilation, dilation), pads)(data, weight)
    relu = te.compute(out.shape, lambda *i: te.max(out(*i), 0.0), name="relu")  # a fused epilogue
    sch = tvm.s_tir.Schedule(te.create_prim_func([data, weight, relu]))
    target = get_target("host").tvm()
    cfg = CpuScheduleConfig.for_target(target)
    cfg = dataclasses.replace(cfg, num_cores=2, min_parallel_work=0 if parallel else 1 << 60)
    assert schedule_nchw_input_conv(sch, sch.mod["main"], cfg)
    return sch, tvm.compile(sch.mod, target=target, tir_pipeline=tir_pipeline())


@pytest.mark.parametrize("c,size,kernel,oc,stride,dilation,pads,parallel", [
    (3, (224 // 8, 224 // 8), 3, 32, 2, 1, (1, 1, 1, 1), False),  # the MobileNetV2 stem, scaled down
    (3, (13, 11), 3, 24, 1, 1, (1, 1, 1, 1), True),  # 24 channels: 12-lane vectors; odd sizes
    (1, (28, 28), 5, 16, 1, 2, (2, 1, 3, 0), True),  # grey, dilated, asymmetric padding
    (4, (15, 17), 7, 8, 2, 1, (3, 3, 3, 3), False),  # 7x7 (taps not unrolled), half-vector channels
])
def test_direct_conv_equals_numpy(c, size, kernel, oc, stride, dilation, pads, parallel):
    rng = np.random.default_rng(c * 100 + kernel)
    x = rng.standard_normal((1, c, *size)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, c, oc)).astype(np.float32)
    want = np.maximum(_numpy_conv(x, w, stride, dilation, pads), 0)
    sch, lib = _build(c, size, kernel, oc, stride, dilation, pads, parallel)
    got = tvm.runtime.tensor(np.zeros(want.shape, np.float32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(w), got)
    assert np.abs(want).max() > 1.0  # not a degenerate (all-zero) comparison
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
    script = sch.mod["main"].script()
    assert ("T.parallel" in script) == parallel


def test_padded_rows_are_copied_per_output_row_without_a_bounds_check():
    """The copy into the padded row buffer is split into a zero fill and an interior copy with
    no ``if_then_else`` (a conditional copy does not vectorize), both vectorized, both inside the
    output-row loop that also holds the conv."""
    from tvm import tirx

    from apq.kernels.nchw_input_conv import CONV_BLOCK, PAD_BLOCK

    sch, _ = _build(3, (32, 32), 3, 32, 2, 1, (1, 1, 1, 1), False)
    row = sch.get(sch.get_loops(sch.get_sblock(CONV_BLOCK + "_update"))[0])
    copy, fill = sch.get_sblock(PAD_BLOCK), sch.get_sblock(PAD_BLOCK + "_pad_const")
    for block in (copy, fill):
        loops = [sch.get(lp) for lp in sch.get_loops(block)]
        assert len(loops) == 4 and loops[0].same_as(row)  # row, channel, padded row, column
        assert loops[-1].kind == tirx.ForKind.VECTORIZED, loops[-1].kind
    assert "if_then_else" not in str(sch.get(copy).body)
    assert "if_then_else" not in str(sch.get(fill).body)
