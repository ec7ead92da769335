"""Bit-plane packing of uint8 activations with AVX2 ``vpmovmskb``: one 32-channel word per shift + movemask.

Why: a bit-serial layer packs its activations (bit ``i`` of 32 channels -> one uint32 word per
plane) on every call. The portable SWAR packer (:func:`apq.kernels.bitpack.te_pack_activations_nhwc_swar`)
spends ~5 integer operations per 8 channels and plane; measured, it was 22-41% of a fused 2-bit
pointwise kernel's time on the MobileNetV2 layer shapes of bench/mixed_precision.py. On x86 one
``vpmovmskb`` gathers the top bit of 32 bytes into a 32-bit integer, so plane ``i`` of 32 channels is

    word_i = movemask(x[c0:c0+32] << (7 - i))    (a 16-bit lane shift: the bits that cross a byte
                                                  boundary land below the top bit, which is all
                                                  movemask reads)

two instructions per word and plane. Measured standalone, same shapes: 4-12x faster than SWAR,
bit-identical (tests/test_bitserial.py checks every bit-width against NumPy).

TVM has no such intrinsic, so it is a TensorIntrin of our own (the same mechanism as apq's VNNI
intrinsic, kernels/x86_int8_nhwc.py): the TE packer below is the plain ``sum_b bit_b << b``
reduction, and the schedule tensorizes its (plane, 32 channels) core with the LLVM intrinsic
``llvm.x86.avx2.pmovmskb``. It applies where every word is 32 whole channels of an unpadded uint8
input (pointwise convs with channels % 32 == 0) on CPUs with AVX2; other layers keep SWAR.

A pitfall: on AVX-512BW LLVM turns the movemask into ``vpmovb2m`` and may keep the words in mask
registers. Some bipolar kernel forms came out wrong (a stale mask register read for a later
plane); :func:`apq.kernels.bitserial._word_sums` records which, and why bipolar kernels sum the
activation bytes instead of popcounting these words.
"""

from __future__ import annotations

from typing import Any

#: TE compute name = the block name the bit-serial schedules recognise.
PACK_BLOCK = "xpack_movemask"
WORD_BITS = 32  # one vpmovmskb ymm: 32 bytes -> 32 bits


def supports(channels: int, padding: int, stride: int, word_bits: int, x_dtype: str, target: Any) -> bool:
    """Whether the movemask packer can pack this layer's activations on ``target``. Stride 1 only:
    under a strided conv's row tile the tensorized packer's region does not decompose
    (ScheduleError "not a reduction block")."""
    if (channels % WORD_BITS or padding or stride != 1 or word_bits != WORD_BITS or x_dtype != "uint8"
            or target is None):
        return False
    from apq.kernels.cpu_schedules import target_has

    return target_has(target, "avx2")


def te_pack_activations(x: Any, a_bits: int, name: str = PACK_BLOCK) -> Any:
    """TE: (N, H, W, C) uint8 -> (N, H, W, C/32, a_bits) uint32, bit ``b`` of word ``(cw, i)`` =
    bit ``i`` of channel ``32 cw + b`` (the layout of bitpack's other packers, unpadded)."""
    from tvm import te, tirx

    from apq.kernels.bitpack import index_dtype_of, te_extent

    n, h, w, c = (int(s) for s in x.shape)
    idx = index_dtype_of(x)
    b = te.reduce_axis((te_extent(0, idx), te_extent(WORD_BITS, idx)), "b")
    one = tirx.const(1, "uint32")

    def body(nn: Any, hh: Any, ww: Any, ci: Any, i: Any) -> Any:
        value = x[nn, hh, ww, ci * WORD_BITS + b].astype("uint32")
        bit = (value & one) if a_bits == 1 else ((value >> i.astype("uint32")) & one)
        return te.sum(bit << b.astype("uint32"), axis=b)

    shape = tuple(te_extent(v, idx) for v in (n, h, w, c // WORD_BITS, a_bits))
    return te.compute(shape, body, name=name)


def _intrin_funcs(a_bits: int) -> tuple[Any, Any]:
    """(desc, impl): ``C[i] += sum_b ((A[b] >> i) & 1) << b`` for the ``a_bits`` planes of 32 bytes."""
    from tvm.script import tirx as T

    if a_bits == 1:  # the plane loop has extent 1 and TE drops the shift: a desc without it
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (WORD_BITS,), "uint8", offset_factor=1)
            C = T.match_buffer(c, (1,), "uint32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0:1], A[0:WORD_BITS])
                T.writes(C[0:1])
                for b in T.serial(WORD_BITS):
                    with T.sblock("update"):
                        vb = T.axis.remap("R", [b])
                        C[0] = C[0] + T.shift_left(T.bitwise_and(T.Cast("uint32", A[vb]), T.uint32(1)),
                                                   T.Cast("uint32", vb))
    else:
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (WORD_BITS,), "uint8", offset_factor=1)
            C = T.match_buffer(c, (a_bits,), "uint32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0:a_bits], A[0:WORD_BITS])
                T.writes(C[0:a_bits])
                for i, b in T.grid(a_bits, WORD_BITS):
                    with T.sblock("update"):
                        vi, vb = T.axis.remap("SR", [i, b])
                        C[vi] = C[vi] + T.shift_left(
                            T.bitwise_and(T.shift_right(T.Cast("uint32", A[vb]), T.Cast("uint32", vi)), T.uint32(1)),
                            T.Cast("uint32", vb))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WORD_BITS,), "uint8", offset_factor=1)
        C = T.match_buffer(c, (a_bits,), "uint32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:a_bits], A[0:WORD_BITS])
            T.writes(C[0:a_bits])
            for i in T.unroll(a_bits):
                C[i] = C[i] + T.reinterpret(T.call_llvm_pure_intrin(
                    "int32", "llvm.x86.avx2.pmovmskb",
                    T.reinterpret(T.shift_left(T.reinterpret(A.vload([0], "uint8x32"), dtype="uint16x16"),
                                               T.broadcast(T.Cast("uint16", 7 - i), 16)), dtype="int8x32")),
                    dtype="uint32")

    return desc, impl


def register_intrinsic(a_bits: int) -> str:
    """Register the ``a_bits``-plane movemask intrinsic once per process; returns its name."""
    from apq.kernels.tensor_intrin import register_once

    return register_once(f"apq_x86_movemask_pack_a{a_bits}", lambda: _intrin_funcs(a_bits))


def is_pack_block(sch: Any, block: Any) -> bool:
    return sch.get(block).name_hint == PACK_BLOCK


def _loop_bound_to(sch: Any, block: Any, axis: int) -> Any | None:
    """The loop whose variable the block's ``axis``-th iterator is bound to (None: bound to a
    constant, e.g. a unit loop that compute_at dropped)."""
    import tvm
    from tvm import tirx

    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    used = tirx.analysis.undefined_vars(realize.iter_values[axis])
    return next((lp for lp in sch.get_loops(block) if any(sch.get(lp).loop_var.same_as(v) for v in used)), None)


def schedule_pack(sch: Any, block: Any) -> None:
    """Tensorize the packer's (plane, 32 channels) core; the block's outer loops are the caller's
    (computed at a row tile or parallel at the root, in whatever order compute_at left them)."""
    a_bits = int(sch.get(block).iter_vars[4].dom.extent)
    word, plane, bit = (_loop_bound_to(sch, block, axis) for axis in (3, 4, 5))
    inner = [lp for lp in (word, plane if a_bits > 1 else None, bit) if lp is not None]
    if len(inner) > 1:
        sch.reorder(*inner)  # the (plane, bit) core innermost, word loop around it
    at = bit if a_bits == 1 else plane
    sch.decompose_reduction(block, at)
    sch.tensorize(at, register_intrinsic(a_bits))


__all__ = ["PACK_BLOCK", "WORD_BITS", "is_pack_block", "register_intrinsic", "schedule_pack", "supports",
           "te_pack_activations"]
