"""kernels/padded_copy.py: a depthwise conv's padded-input copy split into border and interior
must leave every output bit-identical, and must really apply to the layouts it targets."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

# (channels, size, stride, kernel): stride 1 (plain copy) and stride 2 (deinterleaved copy), odd sizes
SHAPES = [(8, 16, 1, 3), (8, 16, 2, 3), (4, 15, 2, 3), (4, 13, 1, 5), (4, 14, 2, 7), (16, 7, 2, 3)]


def _depthwise(channels: int, size: int, stride: int, kernel: int):
    from tvm import relax

    w = np.random.default_rng(channels + size).standard_normal((channels, 1, kernel, kernel)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, channels, size, size], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=kernel // 2,
                                                  groups=channels))
        bb.emit_func_output(y)
    return bb.get(), w


def _reference(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    k = w.shape[-1]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    oh = (xp.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], x.shape[1], oh, oh))
    for i in range(k):
        for j in range(k):
            out += xp[:, :, i:i + stride * oh:stride, j:j + stride * oh:stride] * w[None, :, 0, i, j, None, None]
    return out


@pytest.mark.parametrize("channels,size,stride,kernel", SHAPES)
def test_partitioned_padding_is_applied_and_changes_no_output(channels, size, stride, kernel):
    import dataclasses

    from tvm import relax

    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.kernels.pipeline import compile_relax, prepare_passes, schedule_pass
    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    mod, w = _depthwise(channels, size, stride, kernel)
    x = np.random.default_rng(3).standard_normal((1, channels, size, size)).astype(np.float32)
    outs = []
    for partition in (True, False):
        cfg = dataclasses.replace(CpuScheduleConfig.for_target(target), partition_padding=partition)
        with target:
            scheduled = tvm.transform.Sequential(prepare_passes(target) + [schedule_pass(cfg)])(mod)
        assert ("_common" in scheduled.script()) == partition  # loop_partition's wrapper block: the copy was split
        vm = relax.VirtualMachine(compile_relax(mod, target, cfg=cfg), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], _reference(x, w, stride), rtol=1e-5, atol=1e-5)


def test_blocks_that_are_not_padded_copies_are_left_alone():
    from tvm import te

    from apq.kernels.padded_copy import partition_padded_copy

    x = te.placeholder((1, 4, 8, 8), "float32", name="x")
    y = te.compute((1, 4, 8, 8), lambda n, c, h, w: x[n, c, h, w] * 2.0, name="y")  # no padding at all
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    before = sch.mod.script()
    assert partition_padded_copy(sch, sch.get_sblock("y")) is False
    assert sch.mod.script() == before
