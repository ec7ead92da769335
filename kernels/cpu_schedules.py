"""Schedule rules for the CPU PrimFuncs that Relax produces (conv2d NCHW, matmul, anything else).

Why this exists: TVM 0.27's default CPU pipeline legalizes and fuses Relax ops into TIR
PrimFuncs but schedules none of them: every kernel runs as single-threaded scalar loops, 10-30x
behind onnxruntime. ``dlight.cpu`` only covers GEMV and softmax-like reductions. These rules
give every PrimFunc a fixed, analytic schedule (no search, a few milliseconds per function):

- :class:`Conv2dNCHWRule`: register-blocked output tile (``oc_tile`` output channels x a few
  SIMD vectors along the output width, or along ``H*W`` for stride-1 pointwise convs, which
  are GEMMs), the reduction (ic, kh, kw) outside the tile, accumulators in a local buffer,
  the fused epilogue (bias, ReLU6, requantize, residual add) computed per tile while the
  accumulators are hot. It matches on the iteration structure, not on the dtype, so the same
  rule schedules float32 and the integer ``int8 x int8 -> int32`` convs from qdq_lowering.
- :class:`MatmulRule`: the same idea for ``[M, K] x [K, N]`` dense layers; batch-1 ones
  (GEMVs) stream their weight rows instead (:meth:`MatmulRule._schedule_gemv`).
- :class:`GenericRule`: anything else (pads, quantize, pooling, reshapes): inline elementwise
  chains, parallelize the fused outer loops, vectorize the inner ones.

The rules follow dlight's ``ScheduleRule`` protocol and are applied by its
``ApplyDefaultSchedule`` pass (see :mod:`apq.kernels.pipeline`). Every rule returns None
(= "not mine") rather than raising, and :class:`GenericRule` accepts everything, so a model
never fails to compile because of a schedule.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable

from apq.kernels.padded_copy import partition_padded_copy

#: SIMD register width in bits, by the first target feature present (registry, not if-chain).
_VECTOR_BITS_BY_FEATURE: tuple[tuple[str, int], ...] = (
    ("avx512f", 512),
    ("avx2", 256),
    ("avx", 256),
    ("sse2", 128),
    ("neon", 128),
    ("sve", 128),  # SVE is length-agnostic; 128 is the floor every SVE core has
)

#: (accumulators, max_oc_tile) of a conv/matmul register tile, by the first target feature
#: present; targets without an entry keep the dataclass defaults (16, 8). Why 24 x 16 on
#: AVX-512: it has 32 zmm registers, so 24 accumulators leave 8 for the input vector and
#: weight broadcasts, and 16-channel tiles halve the input loads per FMA of the pointwise
#: convs whose pixel tile is one vector (14x14 maps, 8x more channels than pixels per tile).
#: Measured on MobileNetV2 at 224 px, 1 thread, thread CPU time, interleaved A/B in one
#: process: float 3.65 -> 3.54 ms and 4.30 -> 3.86 ms (two runs), int8 3.33 -> 3.21 ms;
#: 28 accumulators measured no better than 24.
_REGISTER_TILE_BY_FEATURE: tuple[tuple[str, int, int], ...] = (
    ("avx512f", 24, 16),
)

#: What one scalar iteration of a loop nest costs, in float multiply-adds of a register-tiled
#: conv, by kind of kernel: the parallel decision (:func:`worth_parallel`) compares
#: ``iterations * weight`` with ``CpuScheduleConfig.min_parallel_work``, so it is a decision on
#: estimated time, not on raw iteration counts (a gathered element costs ~16 multiply-adds, a
#: VNNI multiply-add half of one). Read off per-kernel serial vs parallel timings of MobileNetV2
#: at 32 and 224 px, 1 and 2 threads (float and int8): a parallel region pays off from about
#: 3 us of serial work on this 2-core Xeon, and ~3 us is 2^17..2^18 float multiply-adds.
PARALLEL_WORK_WEIGHT: dict[str, float] = {
    "mac": 1.0,             # float (or float-accumulated int8) conv / matmul multiply-add
    "depthwise_mac": 2.0,   # depthwise: one load per FMA, about half the pointwise throughput
    "int8_dot_mac": 0.5,    # 4-way int8 dot product (vpdpbusd / sdot) multiply-add
    # batch-1 dense (GEMV): streams its weights, memory-bound; the 224 px classifier (320 -> 1000)
    # took 36 us streamed, 67 us tiled-parallel on 1 thread and 36 us on 2: keep streaming
    "gemv_mac": 0.25,
    "element": 1.0,         # elementwise / copy / reduction element
    "gather_element": 16.0,  # im2col patch element (unrolled scalar gather)
}


def worth_parallel(cfg: "CpuScheduleConfig", iterations: int, kind: str = "mac") -> bool:
    """Whether a loop nest of ``iterations`` of ``kind`` (:data:`PARALLEL_WORK_WEIGHT`) gets a
    parallel region: only on multi-core targets, and only when its estimated work reaches
    ``cfg.min_parallel_work``."""
    return cfg.num_cores > 1 and iterations * PARALLEL_WORK_WEIGHT[kind] >= cfg.min_parallel_work

#: 4-way int8 dot-product instruction family, by the LLVM target feature that provides it.
_INT8_DOT_BY_FEATURE: tuple[tuple[str, str], ...] = (
    ("avx512vnni", "avx512vnni"),
    ("dotprod", "dotprod"),  # AArch64 sdot (Armv8.2 +dotprod: Cortex-A55/A76, Raspberry Pi 5)
)


@dataclass(frozen=True)
class CpuScheduleConfig:
    """Knobs of the analytic schedules; one per target, saved so a build can be reproduced.

    ``vector_bits``: SIMD width (512 on AVX-512, 128 on NEON). ``num_cores``: parallel
    workers the schedule should feed. ``accumulators``: vector registers a conv tile may use
    for accumulators (AVX-512 has 32, NEON 32; keep room for inputs and broadcasts).
    ``max_oc_tile``: most output channels per register tile (both per target:
    :data:`_REGISTER_TILE_BY_FEATURE`). ``min_parallel_work``: below
    this much estimated work (float multiply-add equivalents: iterations weighted by
    :data:`PARALLEL_WORK_WEIGHT`, see :func:`worth_parallel`) a loop nest is not worth a parallel
    region. 3 * 2^16: a region costs ~1 us at 2 threads, and below ~3 us of serial work the second
    core did not win it back (per-kernel timings, MobileNetV2 at 32 and 224 px). It was 2^21
    while each parallel iteration still allocated its register tile from the heap (fixed by
    kernels/stack_alloc.py): then a ``T.parallel`` loop cost up to 36% even on 1 thread.
    ``int8_dot``: the 4-way int8 dot-product instruction family the integer conv may be
    tensorized with (a key of :data:`INT8_DOT_CONV`, e.g. ``"avx512vnni"``; "" = none).
    ``max_row_tile``: most output rows per register tile of a KxK conv, and
    ``max_unrolled_taps``: the largest ``kh * kw`` whose taps are unrolled for that
    (see :meth:`Conv2dNCHWRule._row_tile`; ``max_row_tile=1`` gives one-row tiles).
    ``per_channel_padding``: depthwise convs pad their input per channel block instead of
    in one whole-tensor copy (see :meth:`Conv2dNCHWRule._per_channel_padding`).
    ``partition_padding``: that per-block padded copy is split into border and a branch-free,
    vectorizable interior (kernels/padded_copy.py). Off by default: single kernels measured
    0.6x-1.7x (noisy), the float MobileNetV2 at 224 px 0.99x; a knob-tuning variant instead.
    ``dw_max_oc_tile`` / ``dw_max_row_tile``: the depthwise tile, ``channels x rows x one
    vector row`` (see :meth:`Conv2dNCHWRule._depthwise_tile`).
    ``fuse_dw_pw_min_bytes``: a depthwise conv and the pointwise conv reading it become one
    kernel (kernels/fuse_dw_pw.py) when the depthwise input plus output is at least this many
    bytes: 2 MiB, this host's L2. Smaller pairs were mostly slower fused (up to 46% at 14 px).
    ``fuse_pw_dw_min_bytes``: the same for a pointwise (expansion) conv and the depthwise conv
    reading it, on the expanded tensor's size; ``fuse_block_bytes``: most bytes of expanded rows
    one block of that fused kernel computes (halo included): half the L2. A build sets all three
    from its target's L2 per core (:meth:`with_l2_cache`); these defaults are that rule on the
    development host. ``fuse_blocks``: False merges nothing (``apq compile --no-fuse-blocks``,
    for comparison).
    """

    vector_bits: int = 128
    num_cores: int = 1
    accumulators: int = 16
    max_oc_tile: int = 8
    min_parallel_work: int = 3 << 16
    int8_dot: str = ""
    max_row_tile: int = 4
    max_unrolled_taps: int = 9
    per_channel_padding: bool = True
    partition_padding: bool = False
    dw_max_oc_tile: int = 1
    dw_max_row_tile: int = 7
    gemv_stream: bool = True
    fuse_dw_pw_min_bytes: int = 2 << 20
    fuse_pw_dw_min_bytes: int = 2 << 20
    fuse_block_bytes: int = 1 << 20
    fuse_blocks: bool = True

    @staticmethod
    def for_spec(spec: Any) -> "CpuScheduleConfig":
        """The config a build for an apq target (``TargetSpec``) schedules with: derived from its
        TVM target, block-merging thresholds from its L2 per core (:meth:`with_l2_cache`)."""
        return CpuScheduleConfig.for_target(spec.tvm()).with_l2_cache(spec.l2_cache_bytes)

    def with_l2_cache(self, l2_bytes: int | None) -> "CpuScheduleConfig":
        """The block-merging thresholds for a target whose worker threads each keep ``l2_bytes``
        of L2 (``TargetSpec.l2_cache_bytes``; None: unchanged).

        The rule is the one measured on the development host (2 MiB L2 per core, where it gives
        exactly the defaults): merging pays once a pair's tensors no longer fit the L2, and one
        block of a merged kernel should use at most half of it. Elsewhere the rule is applied,
        not re-measured (a Raspberry Pi's 256-512 KiB come from its datasheet; no board here).
        """
        if not l2_bytes:
            return self
        return replace(self, fuse_dw_pw_min_bytes=l2_bytes, fuse_pw_dw_min_bytes=l2_bytes,
                       fuse_block_bytes=max(1, l2_bytes // 2))

    def lanes(self, dtype_bits: int) -> int:
        """Elements of ``dtype_bits`` in one SIMD register (at least 1)."""
        return max(1, self.vector_bits // max(1, dtype_bits))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "CpuScheduleConfig":
        return CpuScheduleConfig(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @staticmethod
    def for_target(target: Any) -> "CpuScheduleConfig":
        """Derive the config from a TVM target (LLVM's feature list for the target's CPU)."""
        attrs = dict(target.attrs)
        cores = int(attrs.get("num-cores", 1) or 1)
        bits = next((width for feature, width in _VECTOR_BITS_BY_FEATURE if target_has(target, feature)), 128)
        dot = next((family for feature, family in _INT8_DOT_BY_FEATURE if target_has(target, feature)), "")
        tile: dict[str, int] = next(({"accumulators": accumulators, "max_oc_tile": max_oc}
                                     for feature, accumulators, max_oc in _REGISTER_TILE_BY_FEATURE
                                     if target_has(target, feature)), {})
        return CpuScheduleConfig(vector_bits=bits, num_cores=cores, int8_dot=dot, **tile)


# --------------------------------------------------------------------------- small helpers


def target_has(target: Any, features: str | list[str]) -> bool:
    """Whether LLVM says ``target`` (anything apq.kernels.bitserial.tvm_target accepts) has all of
    ``features``; False for a feature or a target its backend does not know (e.g. an x86 feature
    asked of an aarch64 target)."""
    from tvm.target import codegen

    from apq.kernels.bitserial import tvm_target

    try:
        return bool(codegen.target_has_features(features, tvm_target(target)))
    except Exception:  # not an LLVM target, or a feature unknown to its backend: not present
        return False


def _divisors_up_to(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def _largest_divisor(n: int, cap: int) -> int:
    return max(_divisors_up_to(n, max(1, cap)))


def _int_extent(sch: Any, loop: Any) -> int | None:
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def _iter_kinds(sch: Any, block: Any) -> str:
    """'S' for data-parallel, 'R' for reduction, 'O' otherwise, one letter per block iter."""
    kinds = {0: "S", 2: "R"}
    return "".join(kinds.get(int(iv.iter_type), "O") for iv in sch.get(block).iter_vars)


def _dtype_bits(sch: Any, block: Any) -> int:
    return int(sch.get(block).writes[0].source.dtype.bits)


def _block_iterations(sch: Any, block: Any) -> int:
    """Product of a block's iteration extents (a conv's multiply-adds, a copy's elements)."""
    total = 1
    for iv in sch.get(block).iter_vars:
        total *= int(iv.dom.extent)
    return total


def _blocks(sch: Any) -> list[Any]:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def single_block(sch: Any, name: str) -> Any | None:
    """The one root-level block called ``name`` (a TE compute apq's rules recognise), else None."""
    found = [b for b in _blocks(sch) if sch.get(b).name_hint == name]
    return found[0] if len(found) == 1 else None


def _has_if_then_else(sch: Any, block: Any) -> bool:
    # TVM 0.27's Python API has no TIR visitor; the printed block is a faithful stand-in
    return "if_then_else" in sch.get(block).body.script()


def _is_output_block(sch: Any, block: Any, func: Any) -> bool:
    """Does the block write one of the function's parameter buffers (inputs/outputs)?"""
    func = sch.mod["main"]  # the schedule's current function (buffers may have been replaced)
    written = sch.get(block).writes[0].source
    return any(written.same_as(p) for p in func.params)  # TVM 0.27: params are the buffers


def _can_decompose_padding(sch: Any, block: Any, loop: Any) -> bool:
    try:
        return bool(sch.can_decompose_padding(block, loop))
    except Exception:
        return False


def _try(fn: Callable[..., Any], *args: Any) -> bool:
    """Run one schedule primitive; False (schedule unchanged) if TVM proves it illegal."""
    try:
        fn(*args)
        return True
    except Exception:  # tvm ScheduleError and friends: the primitive did not apply
        return False


def _applies(fn: Callable[..., bool], sch: Any, *args: Any) -> bool:
    """Does ``fn(sch, *args)`` succeed (return True, raise nothing) on a copy of ``sch``?"""
    try:
        return bool(fn(sch.copy(), *args))
    except Exception:  # tvm ScheduleError and friends
        return False


def inline_elementwise(sch: Any, func: Any, keep: Iterable[Any] = (), keep_padding: bool = False) -> None:
    """Inline every spatial block that writes an intermediate buffer (repeat to a fixpoint).

    Why: Relax's fused functions materialize each elementwise op (cast, multiply, quantize,
    dequantize, add) into its own full-size buffer; inlining turns the chain into one
    expression evaluated where it is needed. Padding blocks (``if_then_else``) can be kept:
    inlined into a conv they put a bounds check into the innermost loop.
    """
    keep_names = {sch.get(b).name_hint for b in keep}
    changed = True
    while changed:
        changed = False
        for block in _blocks(sch):
            name = sch.get(block).name_hint
            if name in keep_names or "R" in _iter_kinds(sch, block) or _is_output_block(sch, block, func):
                continue
            if keep_padding and _has_if_then_else(sch, block):
                continue
            if _try(sch.compute_inline, block) or _try(sch.reverse_compute_inline, block):
                changed = True
                break


def schedule_spatial(sch: Any, block: Any, cfg: CpuScheduleConfig, depth: int = 0) -> None:
    """Parallel outer / vectorized inner loops for a purely spatial (elementwise) block.

    Only the innermost loop is vectorized (split by the SIMD width when it divides): fusing
    all loops first would turn every index into div/mod of the fused counter, which LLVM
    cannot turn into contiguous vector loads (a padded copy ran 2-4x slower than scalar code).
    Blocks with ``if_then_else`` (padding) keep a scalar inner loop: TVM scalarizes a
    vectorized loop whose condition differs between lanes anyway. ``depth``: outer loops
    that are not the block's own (it was computed at a tile loop): left alone, no parallel.
    """
    loops = sch.get_loops(block)[depth:]
    if not loops:
        return
    if _has_if_then_else(sch, block) and _can_decompose_padding(sch, block, loops[0]):
        try:  # padding -> a constant fill plus an unconditional copy of the interior
            fill = sch.decompose_padding(block, loops[0])
        except Exception:
            fill = None
        if fill is not None and not _has_if_then_else(sch, block):
            schedule_fill(sch, fill, cfg, depth)
            schedule_spatial(sch, block, cfg, depth)
            return
    lanes = cfg.lanes(_dtype_bits(sch, block))
    inner = loops[-1]
    ext = _int_extent(sch, inner)
    outer_loops = list(loops[:-1])
    if ext is None:
        return
    if not _has_if_then_else(sch, block):
        across = _read_contiguous_loop(sch, block, loops, cfg) if ext < lanes else None
        if across is not None:  # a layout transpose with few channels: vectorize the read's axis
            loop, read_lanes = across
            outer_loops = [lp for lp in loops if not lp.same_as(loop)]
            sch.reorder(*outer_loops, loop)
            rest, vec = sch.split(loop, [None, read_lanes])
            outer_loops.append(rest)
            sch.vectorize(vec)
        elif ext % lanes == 0:
            rest, vec = sch.split(inner, [None, lanes])
            outer_loops.append(rest)
            sch.vectorize(vec)
        elif ext < lanes and ext > 1:
            sch.vectorize(inner)
    if not outer_loops or depth:
        return
    outer = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
    total = 1
    for lp in sch.get_loops(block):
        total *= _int_extent(sch, lp) or 1
    if worth_parallel(cfg, total, "element") and (_int_extent(sch, outer) or 1) > 1:
        sch.parallel(outer)


def _read_contiguous_loop(sch: Any, block: Any, loops: list[Any], cfg: CpuScheduleConfig) -> tuple[Any, int] | None:
    """(loop, lanes): the loop along which the block's widest read (the one with the most
    dimensions, its main input) is contiguous, when that is not the innermost loop and its
    extent is a multiple of the SIMD lanes of the read's dtype (a float32 -> uint8 quantize
    computes in float32); else None.

    Why: a layout transpose whose output's innermost axis is short (NCHW -> NHWC of a 3-channel
    image, fused with the input quantize) was vectorized 3 lanes wide along that axis, with a
    3-element gather per output pixel. Vectorizing the input's contiguous row instead computes
    16 pixels per instruction and pays only for scattered byte stores (the 224 px input
    quantize + pad + transpose: measured in the commit that added this).
    Only for plain loop nests (loop i binds block iter var i).
    """
    stmt = sch.get(block)
    if len(loops) != len(stmt.iter_vars) or len(loops) < 2:
        return None
    widest = max(stmt.reads, key=lambda r: len(r.region), default=None)
    if widest is None or len(widest.region) < 2:
        return None
    lanes = cfg.lanes(int(widest.source.dtype.bits))
    last = widest.region[-1]
    if int(getattr(last.extent, "value", 0)) != 1:
        return None
    for i, iv in enumerate(stmt.iter_vars[:-1]):
        if last.min.same_as(iv.var) and (_int_extent(sch, loops[i]) or 0) % lanes == 0:
            return loops[i], lanes
    return None


def schedule_fill(sch: Any, block: Any, cfg: CpuScheduleConfig, depth: int = 0) -> None:
    """A constant fill (the border of a padded copy): vectorize whole rows.

    Why not :func:`schedule_spatial`: a padded row (e.g. 34 floats) is no multiple of the
    SIMD width, so the row loop stayed scalar. A row of up to 4 registers is vectorized as
    a whole (LLVM splits it into full vectors and one partial one). Rows are not fused into
    one flat loop: TVM cannot simplify the div/mod of a fused vector index back to a linear
    address and scalarizes the stores (measured: a 32x32 uint8 fill 4x slower).
    """
    loops = sch.get_loops(block)[depth:]
    if len(loops) != len(sch.get(block).iter_vars) or len(sch.get(block).reads) != 0:
        schedule_spatial(sch, block, cfg, depth)
        return
    vectorize_by_divisor(sch, loops[-1], 4 * cfg.lanes(_dtype_bits(sch, block)))


def schedule_reduction_generic(sch: Any, block: Any, cfg: CpuScheduleConfig) -> None:
    """Spatial loops outside (parallel when big), reduction loops inside: always correct."""
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    # loops created by Relax legalization are in block-iter order, one loop per iter
    if len(loops) != len(kinds):
        return
    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds) if k != "S"]
    if not spatial:
        return
    lanes = cfg.lanes(_dtype_bits(sch, block))
    inner = _int_extent(sch, spatial[-1])
    if len(spatial) > 1 and inner and inner % lanes == 0 and _reads_contiguous_along_last_spatial(sch, block):
        # a channels-last reduction (NHWC global pooling): reduce whole channel vectors, the
        # reduction loops outside the contiguous spatial loop (same per-element summation order)
        sch.reorder(*spatial[:-1], *reduce, spatial[-1])
        if len(spatial) > 2:
            sch.fuse(*spatial[:-1])
        _, vec = sch.split(spatial[-1], [None, lanes])
        sch.vectorize(vec)  # before decomposing: the vector loop must hold a whole reduction block
        init = sch.decompose_reduction(block, reduce[0])
        _, init_vec = sch.split(sch.get_loops(init)[-1], [None, lanes])
        sch.vectorize(init_vec)
        return
    sch.reorder(*spatial, *reduce)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    total = _int_extent(sch, fused)
    red = 1
    for lp in reduce:
        red *= _int_extent(sch, lp) or 1
    if total and total > 1 and worth_parallel(cfg, total * red, "element"):
        sch.parallel(fused)


def _reads_contiguous_along_last_spatial(sch: Any, block: Any) -> bool:
    """Does every buffer the block reads (besides its output) have the last spatial iter var,
    alone, as its last index? Then that loop walks memory contiguously."""
    b = sch.get(block)
    last = [iv.var for iv in b.iter_vars if int(iv.iter_type) == 0][-1]
    out = b.writes[0].source
    reads = [r for r in b.reads if not r.source.same_as(out)]
    return bool(reads) and all(r.region[-1].min.same_as(last) and int(r.region[-1].extent) == 1 for r in reads)


# --------------------------------------------------------------------------- rules


class _LazyRule:
    """Defer the dlight import (apq's CLI must start without TVM) but behave as a ScheduleRule."""

    name = "rule"

    def __init__(self, cfg: CpuScheduleConfig | None = None) -> None:
        self.cfg = cfg

    def config(self, target: Any) -> CpuScheduleConfig:
        return self.cfg or CpuScheduleConfig.for_target(target)

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            ok = self.schedule(sch, func, self.config(target))
        except Exception:  # a rule that trips over an unexpected shape defers to the next rule
            return None
        return sch if ok else None

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        raise NotImplementedError


def _single_reduction(sch: Any, pattern: str) -> Any | None:
    reds = [b for b in _blocks(sch) if "R" in _iter_kinds(sch, b)]
    if len(reds) != 1 or _iter_kinds(sch, reds[0]) != pattern:
        return None
    return reds[0]


def _conv_geometry(sch: Any, conv: Any) -> dict[str, int] | None:
    """Kernel size and W-stride of an NCHW conv block, read from its input access index."""
    from tvm import sym as arith  # TVM 0.27 moved tvm.arith to tvm.sym

    block = sch.get(conv)
    ivs = [iv.var for iv in block.iter_vars]
    _, _, _, v_x, _, v_ry, v_rx = ivs
    exts = [int(iv.dom.extent) for iv in block.iter_vars]
    for region in block.reads:
        idx = [r.min for r in region.region]
        if len(idx) != 4 or len(block.reads) < 2:
            continue
        coeff = arith.detect_linear_equation(idx[3], [v_x])
        if len(coeff) == 2 and any(v_rx.same_as(v) for v in _vars(idx[3])):
            return {"kh": exts[5], "kw": exts[6], "stride_w": int(coeff[0]), "ow": exts[3], "oh": exts[2],
                    "oc": exts[1], "ic": exts[4]}
    return None


def _vars(expr: Any) -> list[Any]:
    from tvm import tirx

    return list(tirx.analysis.undefined_vars(expr))


def _tile_consumer(sch: Any, func: Any, acc: Any, at_loop: Any, lanes: int) -> str | None:
    """Compute the accumulator's consumer (epilogue or write-back) per tile and vectorize it.

    Returns the consumer's name (it is scheduled now) or None when there is none to move.
    """
    consumers = sch.get_consumers(acc)
    if len(consumers) != 1:
        return None
    epi = consumers[0]
    name = sch.get(epi).name_hint
    sch.reverse_compute_at(epi, at_loop, preserve_unit_loops=False)
    vectorize_by_divisor(sch, sch.get_loops(epi)[-1], lanes)
    return name


def vectorize_by_divisor(sch: Any, loop: Any, max_lanes: int) -> None:
    """Vectorize ``loop`` whole when its extent is at most ``max_lanes``, else its inner part
    split by the largest divisor of the extent up to ``max_lanes`` (no tail); a loop whose
    extent has no divisor above 1 in range stays scalar."""
    ext = _int_extent(sch, loop)
    if not ext or ext <= 1:
        return
    vec = _largest_divisor(ext, max_lanes)
    if vec == ext:
        sch.vectorize(loop)
    elif vec > 1:
        _, inner = sch.split(loop, [None, vec])
        sch.vectorize(inner)


def flatten_pixels(sch: Any, acc: Any, width: int) -> None:
    """Give a pointwise conv's accumulator and its one consumer a flat ``H*W`` pixel axis.

    Why: with (y, x) iteration a pixel tile must be whole rows or divide a row, or the
    epilogue, computed per tile over a (y, x) rectangle, reads accumulators of the next
    tile. Rows of 56, 28 or 14 pixels divide by no SIMD multiple, so tiles fell to 1 pixel
    or to partial vectors. With the accumulator stored as ``[N, C, H*W]`` and the epilogue
    iterating ``(n, c, h*W + w)``, any divisor of ``H*W`` is a valid tile (3136 and 784
    pixels are whole 16-float vectors). Image buffers keep NCHW: their index
    ``(p // W) * W + p % W`` simplifies back to ``p`` when buffers are flattened.
    Raises (ValueError, TVM ScheduleError) when the consumer is not a plain 4-D elementwise block.
    """
    consumers = sch.get_consumers(acc)
    if len(consumers) != 1 or len(sch.get(consumers[0]).iter_vars) != 4:
        raise ValueError("pointwise conv without a single 4-D consumer")
    epi = consumers[0]
    sch.transform_layout(acc, ("write", 0), lambda n, f, h, w: (n, f, h * width + w))
    sch.transform_block_layout(acc, lambda n, f, h, w, rc, ry, rx: (n, f, h * width + w, rc, ry, rx))
    sch.transform_block_layout(epi, lambda n, c, h, w: (n, c, h * width + w))


class Conv2dNCHWRule(_LazyRule):
    """Register-tiled NCHW conv2d (regular, depthwise, pointwise) with its fused epilogue.

    Tile: ``oc_t`` output channels x ``w_t`` output positions, ``w_t`` a multiple of the SIMD
    width where the shape allows. For stride-1 1x1 convs the H and W loops are fused into one
    pixel axis (the conv is a GEMM ``[OC, IC] x [IC, H*W]``, and late MobileNet stages have
    rows of 2-8 pixels that would leave most SIMD lanes idle). The reduction loops run outside
    the unrolled/vectorized tile so each input vector is loaded once per ``oc_t`` FMAs and
    the accumulators stay in registers.
    """

    name = "conv2d-nchw"

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        conv = _single_reduction(sch, "SSSSRRR")
        if conv is None:
            return False
        geo = _conv_geometry(sch, conv)
        if geo is None:
            return False
        inline_elementwise(sch, func, keep=[conv], keep_padding=True)
        if self._schedule_int8_dot(sch, func, conv, geo, cfg):
            return True
        if geo["stride_w"] > 1:
            self._deinterleave_padded_input(sch, conv, geo["stride_w"])
        lanes = cfg.lanes(_dtype_bits(sch, conv))
        acc = self._accumulator(sch, func, conv)
        n, f, y, x, rc, ry, rx = sch.get_loops(acc)
        pointwise = geo["kh"] == 1 and geo["kw"] == 1 and geo["stride_w"] == 1
        row: int | None = None
        if pointwise and _try(flatten_pixels, sch.copy(), acc, geo["ow"]):
            flatten_pixels(sch, acc, geo["ow"])  # tiles may now cross rows: no row constraint
            n, f, pix, rc, ry, rx = sch.get_loops(acc)
            npix, rows = geo["oh"] * geo["ow"], []
        elif pointwise:
            pix, npix, rows, row = sch.fuse(y, x), geo["oh"] * geo["ow"], [], geo["ow"]
        else:
            pix, npix, rows = x, geo["ow"], [y]
        w_t = self._pixel_tile(npix, lanes, row)
        n_vec = max(1, -(-w_t // lanes))  # a partial vector still takes a register
        y_t = self._row_tile(geo, cfg) if rows else 1
        max_oc = cfg.max_oc_tile
        if rows and self._is_depthwise(geo):
            max_oc, y_t = self._depthwise_tile(geo, cfg)
        oc_t = _largest_divisor(geo["oc"], min(max_oc, max(1, cfg.accumulators // (n_vec * y_t))))
        fo, fi = sch.split(f, [None, oc_t])
        po, pi = sch.split(pix, [None, w_t])
        tile_rows: list[Any] = []
        if y_t > 1:
            rows[0], yi = sch.split(rows[0], [None, y_t])
            tile_rows = [yi]
        sch.reorder(n, fo, *rows, po, rc, ry, rx, fi, *tile_rows, pi)
        pad = self._per_channel_padding(sch, acc, geo, cfg) if rows else None
        kind = "depthwise_mac" if self._is_depthwise(geo) else "mac"
        done: set[str | None] = set()
        if pad is not None:
            # channel blocks outside (parallel), the padding computed per block: see
            # _per_channel_padding for why
            chans = sch.fuse(n, fo)
            outer = sch.fuse(*rows, po)
            work = _block_iterations(sch, acc)
            if _int_extent(sch, chans) > 1 and worth_parallel(cfg, work, kind):
                sch.parallel(chans)
            for block in pad:
                done.add(sch.get(block).name_hint)
                sch.compute_at(block, chans, preserve_unit_loops=True)
            for block in reversed(pad):
                if cfg.partition_padding and sch.get(block).reads and _applies(partition_padded_copy, sch, block):
                    partition_padded_copy(sch, block)  # kernels/padded_copy.py: a vectorizable interior
                else:
                    (schedule_fill if not sch.get(block).reads else schedule_spatial)(sch, block, cfg, depth=1)
        else:
            outer = sch.fuse(n, fo, *rows, po)
            work = _block_iterations(sch, acc)
            if _int_extent(sch, outer) > 1 and worth_parallel(cfg, work, kind):
                sch.parallel(outer)
        if y_t > 1:  # all taps x rows unrolled: LLVM reuses each loaded input row for kh outputs
            sch.unroll(ry)
            sch.unroll(rx)
            sch.unroll(tile_rows[0])
        sch.unroll(fi)
        sch.vectorize(pi)
        _finish_tiled_reduction(sch, func, cfg, acc, rc, outer, lanes, done)
        return True

    @staticmethod
    def _per_channel_padding(sch: Any, acc: Any, geo: dict[str, int], cfg: CpuScheduleConfig) -> list[Any] | None:
        """The padding block(s) of a depthwise conv, in compute_at order, when they are worth
        computing per channel block (a padded copy, or a fill + interior copy).

        Why: at the root, the padded copy of a 112x112x32 float input is 1.7 MB, written in
        full and read back by the conv: the depthwise convs of MobileNetV2 at 224 px ran
        at a fraction of the speed of the same conv on a pre-padded input. A depthwise
        conv's channel block reads only its own input channels, so the copy can be made
        per block (``oc_t`` padded planes, cache-resident) right before the block's rows.
        Regular convs read every input channel per block: their padding stays at the root.
        """
        if geo["ic"] != 1 or not cfg.per_channel_padding:
            return None
        prods = sch.get_producers(acc)
        if not prods or any(len(sch.get_loops(p)) != len(sch.get(p).iter_vars) for p in prods):
            return None
        pads = [p for p in prods if _has_if_then_else(sch, p)]
        if len(prods) == 1 and len(pads) == 1:
            return pads  # one padding block (decomposed under the channel loop later)
        return None

    @staticmethod
    def _is_depthwise(geo: dict[str, int]) -> bool:
        return geo["ic"] == 1 and geo["kh"] * geo["kw"] > 1

    @staticmethod
    def _depthwise_tile(geo: dict[str, int], cfg: CpuScheduleConfig) -> tuple[int, int]:
        """(most channels, rows) per register tile of a depthwise conv.

        Why few channels and many rows: a depthwise output channel reads only its own input
        plane, so channels in one tile share nothing, and every FMA costs an input load plus
        a weight broadcast (load-bound). Rows of one channel do share: with the taps unrolled,
        an input row serves up to ``kh`` output rows (LLVM merges the identical loads) and the
        channel's ``kh*kw`` weights stay in registers. Measured at 224 px, float, 1 thread
        (thread CPU time): 8 channels x 1 row -> 1 channel x 7 rows took the seven depthwise
        kernels from 1.2-1.6 ms to 1.0 ms (56x56x96: 0.30 -> 0.20 ms, 28x28x128: 0.09 -> 0.05 ms);
        8 rows measured worse than 7 at 56x56 (0.31 ms), 14 rows worse everywhere.
        """
        rows = _largest_divisor(geo["oh"], cfg.dw_max_row_tile)
        if geo["kh"] * geo["kw"] > cfg.max_unrolled_taps or rows == 1:  # (e.g. 13 rows, prime)
            return cfg.max_oc_tile, 1  # no row reuse: channels fill the registers instead
        return cfg.dw_max_oc_tile, rows

    @staticmethod
    def _row_tile(geo: dict[str, int], cfg: CpuScheduleConfig) -> int:
        """Output rows per register tile of a regular KxK conv (1 = one-row tiles).

        Why: with ``y_t`` rows and the taps unrolled, an input row serves up to ``kh``
        output rows (LLVM merges the identical loads): ``y_t + kh - 1`` row loads per
        ``y_t * kh`` FMAs per tap column. Measured at 224 px, 1 thread: the 3->32 stem
        conv 0.36 -> 0.32 ms (float), 0.67 -> 0.50 ms (int8). Depthwise convs have their own
        tile (:meth:`_depthwise_tile`: these rows with 8 channels per tile measured no better).
        """
        if geo["kh"] <= 1 or geo["ic"] <= 1 or geo["kh"] * geo["kw"] > cfg.max_unrolled_taps:
            return 1
        return _largest_divisor(geo["oh"], cfg.max_row_tile)

    @staticmethod
    def _schedule_int8_dot(sch: Any, func: Any, conv: Any, geo: dict[str, int], cfg: CpuScheduleConfig) -> bool:
        """Tensorize with the target's int8 dot-product instruction when the conv qualifies.

        The tiling is first tried on a copy of the schedule: if TVM rejects any step
        (tensorize pattern mismatch, say), ``sch`` is untouched and the generic tiling runs.
        """
        tiling = INT8_DOT_CONV.get(cfg.int8_dot)
        if tiling is None:
            return False
        applicable, schedule = tiling()
        if not applicable(sch, conv, geo):
            return False
        if not _try(schedule, sch.copy(), func, conv, geo, cfg):
            return False
        return schedule(sch, func, conv, geo, cfg)

    @staticmethod
    def _deinterleave_padded_input(sch: Any, conv: Any, stride: int) -> None:
        """Store the padded input as ``[.., H, W % s, W // s]`` for a W-stride ``s`` conv.

        Why: a stride-2 conv vectorized along the output width reads every other input
        element; TVM lowers such strided vector loads to one scalar load + insert per lane
        (measured: most of a stride-2 depthwise conv's time). In the deinterleaved layout
        the conv reads ``pad[.., rx % s, x + rx // s]``: contiguous in x. The strided access
        moves into the padding copy, once per input element instead of once per tap.
        """
        layout = lambda n, c, h, w: (n, c, h, w % stride, w // stride)  # noqa: E731
        for prod in sch.get_producers(conv):
            buf = sch.get(prod).writes[0].source
            width = int(buf.shape[-1])
            if len(buf.shape) == 4 and width % stride == 0 and _has_if_then_else(sch, prod):
                # (tried: fill + branch-free copy at the root: slower, 0.36 -> 0.61 ms at
                # 112 px, than this branchy copy computed per channel block, which fill +
                # copy cannot be: compute_at refuses a buffer with two writers. Also tried:
                # compute_at first, decompose_padding in NCHW, then this layout: 0.45 ->
                # 0.52-1.1 ms, as the fill's writes become strided and scalar. The copy is
                # ~1 element per cycle either way (~0.27 ms for 64 x 112 x 112): only a
                # vector deinterleave (2 loads + 2 shuffles per 32 elements) would fix it)
                if _try(sch.transform_layout, prod, ("write", 0), layout):
                    # iterate the copy in the new layout too: contiguous writes, strided reads
                    _try(sch.transform_block_layout, prod, layout)
                return
        # No padding block here: the input arrives already padded (e.g. the int8 stem, whose
        # zero-point padding the QDQ lowering does at the Relax level). Deinterleave a copy.
        block = sch.get(conv)
        params = list(sch.mod["main"].params)
        v_x = block.iter_vars[3].var
        for i, region in enumerate(block.reads):
            buf = region.source
            if len(buf.shape) != 4 or int(buf.shape[-1]) % stride or not any(buf.same_as(p) for p in params):
                continue
            if not any(v_x.same_as(v) for v in _vars(region.region[3].min)):
                continue  # not indexed by the output column: the weight
            copy = sch.cache_read(conv, i, "global")
            sch.transform_layout(copy, ("write", 0), layout)
            sch.transform_block_layout(copy, layout)
            return

    @staticmethod
    def _accumulator(sch: Any, func: Any, conv: Any) -> Any:
        """The block that accumulates: the conv itself with a local output buffer."""
        if _is_output_block(sch, conv, func):
            sch.cache_write(conv, 0, "local")
        else:
            sch.set_scope(conv, 0, "local")
        return conv

    @staticmethod
    def _pixel_tile(npix: int, lanes: int, row: int | None, max_vectors: int = 4) -> int:
        """Output positions per tile: the candidate that fills SIMD lanes best.

        Candidates divide the pixel axis; for the fused H*W axis of a pointwise conv (``row``
        given) they must also be a whole number of rows or divide a row, so that the
        epilogue's region per tile stays a rectangle. A tile need not be a multiple of the
        SIMD width: up to one register (LLVM widens a ``<14 x float>`` to one zmm). Longer
        tiles must be whole registers: LLVM 22 legalizes a ``<28 x float>`` accumulator
        through the stack, lane by lane (measured: a 32->128 pointwise conv at 28x28 took
        2.2 ms with 28-pixel tiles, 0.5 ms with 14, 0.12 ms with flat 16-pixel tiles).
        Why not "a multiple of the width or 1 pixel" (the old rule): 56- and 28-pixel rows
        divide by no vector multiple, and the 1-pixel scalar tile made a 24->96 pointwise
        conv at 56x56 take 2.3 ms. Ranking: lane utilisation ``tile / (vectors * lanes)``,
        then 2 vectors (each input/weight load feeds two FMAs), then fewer vectors (more
        registers left for output channels).
        """
        cap = max(1, max_vectors * lanes)
        cands = {t for t in range(1, min(npix, cap) + 1) if npix % t == 0 and (t <= lanes or t % lanes == 0)}
        if row is not None:
            cands = {t for t in cands if row % t == 0 or t % row == 0}

        def rank(t: int) -> tuple[float, int, int]:
            n_vec = -(-t // lanes)
            return (t / (n_vec * lanes), n_vec == 2, -n_vec)

        return max(cands, key=rank)

    @staticmethod
    def _schedule_rest(sch: Any, cfg: CpuScheduleConfig, done: set[str | None]) -> None:
        """Schedule the blocks the tile left at the root (e.g. a padding block)."""
        for block in _blocks(sch):
            name = sch.get(block).name_hint
            if name in done or name.endswith("_init"):
                continue
            if "R" not in _iter_kinds(sch, block) and len(sch.get_loops(block)) == len(sch.get(block).iter_vars):
                schedule_spatial(sch, block, cfg)


def _finish_tiled_reduction(sch: Any, func: Any, cfg: CpuScheduleConfig, acc: Any, reduce_loop: Any,
                            tile_loop: Any, lanes: int, done: Iterable[str | None] = ()) -> None:
    """The steps every tiled conv/matmul schedule ends with: its epilogue computed per tile at
    ``tile_loop`` (vectorized), a vectorized zero-init split off at ``reduce_loop``, then the
    blocks still at the root (:meth:`Conv2dNCHWRule._schedule_rest`); ``done`` names blocks
    already scheduled."""
    finished = {*done, sch.get(acc).name_hint, _tile_consumer(sch, func, acc, tile_loop, lanes)}
    init = sch.decompose_reduction(acc, reduce_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    Conv2dNCHWRule._schedule_rest(sch, cfg, finished)


class MatmulRule(_LazyRule):
    """``C[i, j] = sum_k A[i, k] * B[k, j]`` (+ fused epilogue): vectorize j, reduce k outside."""

    name = "matmul"
    #: most outputs of a GEMV accumulated at once in a local (stack) buffer: 64 KB of int32/float32
    GEMV_MAX_OUTPUTS = 16384

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        mm = _single_reduction(sch, "SSR")
        if mm is None:
            return False
        inline_elementwise(sch, func, keep=[mm])
        lanes = cfg.lanes(_dtype_bits(sch, mm))
        acc = Conv2dNCHWRule._accumulator(sch, func, mm)
        i, j, k = sch.get_loops(acc)
        nj = _int_extent(sch, j)
        if nj is None:
            return False
        if cfg.gemv_stream and _int_extent(sch, i) == 1 and 2 * lanes < nj <= self.GEMV_MAX_OUTPUTS:
            parallel = worth_parallel(cfg, nj * (_int_extent(sch, k) or 1), "gemv_mac")
            if not parallel:  # (a big multi-core GEMV keeps the tiled order, whose tiles run in parallel)
                return self._schedule_gemv(sch, func, acc, cfg, lanes)
        j_t = _largest_divisor(nj, 2 * lanes) if nj > 2 * lanes else nj
        jo, ji = sch.split(j, [None, j_t])
        sch.reorder(i, jo, k, ji)
        outer = sch.fuse(i, jo)
        ni = _int_extent(sch, outer) or 1
        red = _int_extent(sch, k) or 1
        if ni > 1 and worth_parallel(cfg, ni * j_t * red):
            sch.parallel(outer)
        sch.vectorize(ji)
        _finish_tiled_reduction(sch, func, cfg, acc, k, outer, lanes)
        return True

    @staticmethod
    def _schedule_gemv(sch: Any, func: Any, acc: Any, cfg: CpuScheduleConfig, lanes: int) -> bool:
        """Batch-1 dense layer (a GEMV): stream the weight rows, all outputs accumulated at once.

        Why: in a network the classifier's weights (320x1000 floats: 1.3 MB) are cold, and the
        register-tiled order (a tile of ``j`` outputs, the whole ``k`` reduction inside) reads
        them as 320 short row pieces 4 KB apart, which the hardware prefetchers follow badly.
        Here the reduction is outermost and each weight row is read once, contiguously, into
        ``nj`` accumulators held in a small local buffer (4 KB, L1-resident).
        """
        i, j, k = sch.get_loops(acc)
        nj = _int_extent(sch, j) or 1
        jo, ji = sch.split(j, [None, _largest_divisor(nj, lanes)])
        sch.reorder(i, k, jo, ji)
        sch.vectorize(ji)
        _finish_tiled_reduction(sch, func, cfg, acc, k, i, lanes)
        return True


class GenericRule(_LazyRule):
    """Any PrimFunc: inline elementwise chains, then parallel + vectorize each remaining block."""

    name = "generic"

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        inline_elementwise(sch, func)
        for block in _blocks(sch):
            if len(sch.get_loops(block)) != len(sch.get(block).iter_vars):
                continue  # not a plain loop nest (already transformed): leave it alone
            if "R" in _iter_kinds(sch, block):
                schedule_reduction_generic(sch, block, cfg)
            else:
                schedule_spatial(sch, block, cfg)
        return True


def _x86_vnni_conv() -> tuple[Callable[..., bool], Callable[..., bool]]:
    from apq.kernels import x86_int8

    return x86_int8.vnni_conv_applicable, x86_int8.schedule_conv2d_vnni


def _arm_sdot_conv() -> tuple[Callable[..., bool], Callable[..., bool]]:
    from apq.kernels import arm_int8

    return arm_int8.sdot_conv_applicable, arm_int8.schedule_conv2d_dot


#: Tensorized integer-conv tilings by ``CpuScheduleConfig.int8_dot`` family; each entry gives
#: ``(applicable(sch, conv, geo), schedule(sch, func, conv, geo, cfg))``, imported lazily.
INT8_DOT_CONV: dict[str, Callable[[], tuple[Callable[..., bool], Callable[..., bool]]]] = {
    "avx512vnni": _x86_vnni_conv,
    "dotprod": _arm_sdot_conv,
}


# --------------------------------------------------------------------------- NHWC float convs

# Register-tiled NHWC float conv2d (pointwise, depthwise, stem) with its fused epilogue.
#
# Why a second layout: in NCHW the SIMD lanes run along output pixels, so a depthwise conv
# needs a padded copy per channel block (and a de-interleaving copy for stride 2), and a 14x14
# pointwise conv fills 14 of 16 lanes with one input vector load per 16 FMAs. In NHWC the lanes
# run along channels: a depthwise tap is one contiguous vector load per output pixel at any
# stride, and a pointwise conv multiplies a weight *vector* (16 output channels, HWIO weights)
# by a broadcast input pixel, so one register tile of ``fv`` channel vectors x ``w_t`` pixels
# does ``fv * w_t`` FMAs per ``fv + w_t`` loads. onnxruntime's CPU provider gets the same
# effect with its blocked NCHWc layout. The Relax side (toolchain/float_layout.py) converts float
# convs to NHWC/HWIO; integer convs keep NCHW (their VNNI/sdot schedules pack activations by
# pixel).
#
# The tile choice is a small model of one reduction step on a CPU with two FMA and two load
# ports: ``fv * w_t`` FMAs, ``fv + w_t`` loads for a regular conv (input broadcast, weight
# vectors) or ``fv * w_t + fv`` for a depthwise one (input vectors), and at least
# ``MIN_CHAINS`` independent accumulators to hide the FMA latency.

#: independent accumulator chains needed to keep two FMA pipes of latency 4 busy
MIN_CHAINS = 8
#: most channel vectors in one tile (more only shortens the pixel tile)
MAX_CHANNEL_VECTORS = 4


def nhwc_geometry(sch: Any, conv: Any) -> dict[str, int] | None:
    """Geometry of an NHWC/HWIO conv block ``out[n, y, x, f] += in[n, y*s+ry, x*s+rx, (f+)rc] * w[ry, rx, rc, f]``.

    None for anything else (NCHW convs, matmuls written as convs): the rule then defers.
    ``depthwise``: the input's channel index contains ``f`` (TOPI's group conv with one
    channel per group reads ``in[..., f + rc]`` with ``rc`` of extent 1).
    """
    from tvm import sym as arith  # TVM 0.27 moved tvm.arith to tvm.sym

    block = sch.get(conv)
    if len(block.iter_vars) != 7 or len(block.reads) < 2:
        return None
    v_n, v_y, v_x, v_f, v_ry, v_rx, v_rc = (iv.var for iv in block.iter_vars)
    exts = [int(iv.dom.extent) for iv in block.iter_vars]
    out = block.writes[0].region
    if len(out) != 4 or not all(r.min.same_as(v) for r, v in zip(out, (v_n, v_y, v_x, v_f))):
        return None
    data = weight = None
    for region in block.reads:
        idx = [r.min for r in region.region]
        if len(idx) != 4:
            continue
        names = [{v.name for v in _vars(i)} for i in idx]
        if v_x.name in names[2] and v_rc.name in names[3]:
            data = idx
        elif names[0] == {v_ry.name} and names[1] == {v_rx.name} and names[3] == {v_f.name}:
            weight = idx
    if data is None or weight is None:
        return None
    coeff = arith.detect_linear_equation(data[2], [v_x])
    if len(coeff) != 2:
        return None
    depthwise = v_f.name in {v.name for v in _vars(data[3])}
    if depthwise and exts[6] != 1:
        return None  # grouped conv with several channels per group: not tiled here
    return {"oh": exts[1], "ow": exts[2], "oc": exts[3], "kh": exts[4], "kw": exts[5], "ic": exts[6],
            "stride_w": int(coeff[0]), "depthwise": int(depthwise)}


def choose_tile(geo: dict[str, int], lanes: int, accumulators: int) -> tuple[int, int, int]:
    """``(f_t, fv, w_t)``: channels per vector, channel vectors and output pixels per tile.

    ``f_t`` is ``lanes`` when it divides the channel count, else the largest divisor below it
    (24 channels: 12-lane vectors, which LLVM widens to one register). ``w_t`` divides the
    output row. Ranked by modelled FMA-port utilisation, then by the larger tile.
    """
    oc, ow = geo["oc"], geo["ow"]
    f_t = max(_divisors_up_to(oc, lanes))
    best: tuple[tuple[float, int], tuple[int, int, int]] | None = None
    for fv in _divisors_up_to(oc // f_t, MAX_CHANNEL_VECTORS):
        for w_t in _divisors_up_to(ow, max(1, accumulators // fv)):
            fmas = fv * w_t
            loads = fmas + fv if geo["depthwise"] else fv + w_t
            utilisation = fmas / max(fmas, loads, MIN_CHAINS)
            key = (round(utilisation, 6), fmas)
            if best is None or key > best[0]:
                best = (key, (f_t, fv, w_t))
    assert best is not None  # fv = w_t = 1 always qualifies
    return best[1]


def tile_nhwc_conv(sch: Any, conv: Any, outer: list[Any], geo: dict[str, int],
                   cfg: CpuScheduleConfig) -> tuple[Any, Any, Any, int]:
    """The channel-vector x pixel register tile of an NHWC conv block (:func:`choose_tile`): its
    last five loops ``(x, f, ry, rx, rc)`` split and ordered after ``outer`` as
    ``outer, xo, fo, ry, rx, rc, xi, fvi, fl``, the tile unrolled and its lanes vectorized.
    Returns ``(xo, fo, ry, f_t)``: the pixel-tile loop, the channel-tile loop (where the epilogue
    goes), the first reduction loop and the channels per vector."""
    x, f, ry, rx, rc = sch.get_loops(conv)[-5:]
    f_t, fv, w_t = choose_tile(geo, cfg.lanes(32), cfg.accumulators)
    fo, fvi, fl = sch.split(f, [None, fv, f_t])
    xo, xi = sch.split(x, [None, w_t])
    sch.reorder(*outer, xo, fo, ry, rx, rc, xi, fvi, fl)
    if geo["kh"] * geo["kw"] <= cfg.max_unrolled_taps:
        sch.unroll(ry)
        sch.unroll(rx)
    sch.unroll(xi)
    sch.unroll(fvi)
    sch.vectorize(fl)
    return xo, fo, ry, f_t


class Conv2dNHWCRule(_LazyRule):
    """Float NHWC/HWIO conv2d: channel vectors x pixels register tile (module docstring)."""

    name = "conv2d-nhwc"

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        conv = _single_reduction(sch, "SSSSRRR")
        if conv is None or str(sch.get(conv).writes[0].source.dtype) != "float32":
            return False
        geo = nhwc_geometry(sch, conv)
        if geo is None:
            return False
        # The padding is inlined: its bounds check is per pixel, the same for every lane of a
        # channel vector, and a materialized padded copy cost more than the checks (measured on
        # a 96-channel 56x56 depthwise conv: 158 us inlined, 249 us with the copy).
        inline_elementwise(sch, func, keep=[conv])
        acc = Conv2dNCHWRule._accumulator(sch, func, conv)
        n, y = sch.get_loops(acc)[:2]
        xo, fo, ry, f_t = tile_nhwc_conv(sch, acc, [n, y], geo, cfg)
        outer = sch.fuse(n, y, xo)
        if worth_parallel(cfg, _block_iterations(sch, acc), "depthwise_mac" if geo["depthwise"] else "mac"):
            sch.parallel(outer)
        _finish_tiled_reduction(sch, func, cfg, acc, ry, fo, f_t)
        return True


class Int8PointwiseNHWCRule(_LazyRule):
    """Packed-weight int8 pointwise NHWC conv on VNNI (kernels/x86_int8_nhwc.py)."""

    name = "int8-pointwise-nhwc"

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        if cfg.int8_dot != "avx512vnni":
            return False
        from apq.kernels import x86_int8_nhwc

        conv = x86_int8_nhwc.find_packed_pointwise(sch)
        return conv is not None and x86_int8_nhwc.schedule_packed_pointwise(sch, func, conv, cfg)


class Int8DepthwiseNHWCRule(_LazyRule):
    """Packed-weight int8 depthwise NHWC conv on VNNI (kernels/x86_int8_depthwise.py)."""

    name = "int8-depthwise-nhwc"

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        if cfg.int8_dot != "avx512vnni":
            return False
        from apq.kernels import x86_int8_depthwise

        found = x86_int8_depthwise.find_packed_depthwise(sch)
        return found is not None and x86_int8_depthwise.schedule_packed_depthwise(sch, func, *found, cfg)


class DepthwiseChainNHWCRule(_LazyRule):
    """A depthwise conv fused with the pointwise convs around it (kernels/fuse_dw_pw.py)."""

    name = "dw-chain-nhwc"

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        from apq.kernels.fuse_dw_pw import schedule_depthwise_chain

        return schedule_depthwise_chain(sch, func, cfg)


class Im2colRule(_LazyRule):
    """The patch gather of a few-channel stem (kernels/im2col.py), alone in its PrimFunc."""

    name = "im2col"

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        from apq.kernels.im2col import find_im2col, schedule_im2col

        gather = find_im2col(sch)
        return gather is not None and schedule_im2col(sch, gather, cfg)


class NchwInputConvRule(_LazyRule):
    """A few-channel float conv read straight from the NCHW input (kernels/nchw_input_conv.py)."""

    name = "nchw-input-conv"

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        from apq.kernels.nchw_input_conv import schedule_nchw_input_conv

        return schedule_nchw_input_conv(sch, func, cfg)


class BitserialPointwiseRule(_LazyRule):
    """A bit-serial pointwise conv fused with its epilogue (kernels/bitserial.py)."""

    name = "bitserial-pointwise"

    def schedule(self, sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
        from apq.kernels.bitserial import schedule_fused_pointwise

        return schedule_fused_pointwise(sch, func, cfg.lanes(32))


#: The rule registry, tried in order; the first rule that returns a schedule wins. The packed
#: int8 rule declines all but its own compute block; the NHWC rule declines every conv that is
#: not NHWC/HWIO with a float32 output, the NCHW rule every NHWC one.
RULES: dict[str, type[_LazyRule]] = {
    BitserialPointwiseRule.name: BitserialPointwiseRule,
    Im2colRule.name: Im2colRule,
    NchwInputConvRule.name: NchwInputConvRule,
    Int8PointwiseNHWCRule.name: Int8PointwiseNHWCRule,
    Int8DepthwiseNHWCRule.name: Int8DepthwiseNHWCRule,
    DepthwiseChainNHWCRule.name: DepthwiseChainNHWCRule,
    Conv2dNHWCRule.name: Conv2dNHWCRule,
    Conv2dNCHWRule.name: Conv2dNCHWRule,
    MatmulRule.name: MatmulRule,
    GenericRule.name: GenericRule,
}


def _as_dlight_rule(impl: _LazyRule) -> Any:
    """Wrap a rule in a dlight ``ScheduleRule`` subclass (ApplyDefaultSchedule checks nothing
    but ``apply``; subclassing keeps it a genuine ScheduleRule for other dlight users)."""
    from tvm.s_tir.dlight import ScheduleRule

    class _Adapter(ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            return impl.apply(func, target, tunable)

    _Adapter.__name__ = f"Apq{type(impl).__name__}"
    return _Adapter()


def make_rules(cfg: CpuScheduleConfig | None = None, names: Iterable[str] | None = None) -> list[Any]:
    """Instantiate rules as dlight ScheduleRules (``cfg`` None = derive from each func's target)."""
    chosen = list(names) if names is not None else list(RULES)
    unknown = [n for n in chosen if n not in RULES]
    if unknown:
        raise ValueError(f"unknown schedule rule(s) {unknown}; known: {list(RULES)}")
    return [_as_dlight_rule(RULES[name](cfg)) for name in chosen]
