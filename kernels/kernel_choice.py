"""Measured kernel choice: run a low-bit conv bit-serial only where that is faster here.

Why: a bit-serial kernel's cost scales with ``a_bits * w_bits`` bit-plane pairs, an int8 kernel's
does not, and which wins depends on the CPU's instructions, not on the bits alone. On an AVX-512
VNNI core one ``vpdpbusd`` does 64 8-bit MACs, so apq's VNNI int8 pointwise conv beat its
bit-serial kernel at W2A2 on every MobileNetV2 shape we timed (0.40-0.61x), while W1A1 won only on
wide layers (7x7x320 -> 1280: 1.7x). A policy written in bits (``BitserialPolicy.rules``) cannot
know that; timing both kernels for the layer's shape can. ``BitserialPolicy.select = "measured"``
(``apq compile --bitserial measured``) asks this module for every pointwise and depthwise layer
the rules admit (:data:`MEASURED_OPS`).

What is timed, for one layer (:class:`ConvLayer`: shape, kernel, stride, padding, bits, mode):

- bit-serial: the kernel registry's builder the lowering uses (kernels/registry.py), with the
  config it uses (kernels/bitserial.kernel_config), activation packing included;
- int8: the conv apq's int8 path builds for that layer on this target: on VNNI CPUs with the NHWC
  int8 layout, the packed-weight ``vpdpbusd`` kernels of toolchain/int8_layout.py, elsewhere the
  NCHW ``u8 x s8 -> i32`` conv through apq's CPU pipeline (an approximation for depthwise convs,
  which the NCHW int8 path accumulates in float32).

Each is timed with a per-channel requantize epilogue to uint8 (:func:`_requantize`), compiled as
the lowering emits it: fused into the int8 kernel and into a stride-1 pointwise bit-serial kernel
(the epilogue runs on the accumulator registers), a kernel of its own after an opaque bit-serial
one. Without it (stop 20) both kernels wrote int32 accumulators, and on large layers that memory
traffic hid the difference: the 112 px 16 -> 64 W2A2 layer (16-bit words) timed bit-serial 2-4%
faster that way, and was chosen, while inside the model it ran 17-30% slower than its int8 kernel
(per-kernel profiles); with the epilogue it times 1.46x slower (211 against 144 us).

The bit-serial kernel is also run alone on the same random a-bit activations and w-bit weights:
its int32 accumulators must equal the exact NumPy result (:func:`reference_output`), or the layer
stays int8 and the mismatch is reported. Timing: ``kernels.knob_tuning.KnobTuneConfig`` (1
thread, interleaved rounds, best repeat).
Results are cached per target like knob choices (``<cache>/kernel_choice/<target key>.json``), so
a recompile times nothing and every compile on this machine decides the same way. The file also
records :func:`kernels_fingerprint` (apq's kernel sources and the TVM version): timings of other
kernels than the ones installed now are discarded, not reused.

Where: on this machine for the host target; for a board target (a Raspberry Pi, cross-compiled)
on the board itself, over TVM RPC (:class:`Board`, ``apq compile --rpc-tracker HOST:PORT --rpc-key
KEY``): each kernel is exported for the target, uploaded, run once (its output copied back for the
exactness check) and timed by the board's own ``time_evaluator``, as ``apq profile`` times a model
there. Board timings are cached under the board's name. Timing a cross target here (under qemu)
would measure the emulator, so that is refused.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from apq.kernels.json_cache import read_entries, write_entries
from apq.toolchain.errors import InvalidInputError

CACHE_VERSION = 1
#: bit-serial must beat int8 by this fraction to be chosen (ties keep the simpler int8 path)
MIN_GAIN = 0.03


#: Op kinds this module can time (toolchain/bitserial_lowering.py's layer kinds).
MEASURED_OPS = ("pointwise", "depthwise")


@dataclass(frozen=True)
class ConvLayer:
    """What decides a conv's kernel speed (batch 1, square kernel; NHWC and NCHW alike).
    Depthwise: ``in_channels == out_channels``, one input channel per output channel."""

    op: str  # one of MEASURED_OPS
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    a_bits: int
    w_bits: int
    mode: str  # bit-serial weight mode (bitpack.WEIGHT_MODES)

    def __post_init__(self) -> None:
        if self.op not in MEASURED_OPS:
            raise InvalidInputError(f"kernel choice cannot time {self.op!r} layers; valid: {', '.join(MEASURED_OPS)}")

    @property
    def out_hw(self) -> tuple[int, int]:
        from apq.kernels.bitserial import conv_out_size

        return (conv_out_size(self.height, self.kernel, self.stride, self.padding),
                conv_out_size(self.width, self.kernel, self.stride, self.padding))

    def key(self, int8_form: str) -> str:
        return (f"{self.op} {self.height}x{self.width}x{self.in_channels}->{self.out_channels} k{self.kernel} "
                f"s{self.stride} p{self.padding} a{self.a_bits}w{self.w_bits} {self.mode} vs {int8_form}")


@dataclass
class KernelTiming:
    """One layer's measurement; ``kernel`` is the choice ("bitserial" or "int8")."""

    bitserial_ms: float | None
    int8_ms: float | None
    exact: bool
    kernel: str
    error: str = ""  # why nothing was timed (a kernel failed to build or run)
    device: str = "local"  # where: "local" (this machine) or the board (rpc:KEY@HOST:PORT)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "source": "measured"}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "KernelTiming":
        return KernelTiming(d.get("bitserial_ms"), d.get("int8_ms"), bool(d.get("exact")), str(d["kernel"]),
                            str(d.get("error", "")), str(d.get("device", "local")))

    def summary(self) -> str:
        """A reason line for the layer's decision."""
        if self.error:
            return f"measured: could not time the kernels ({self.error}), kept int8"
        if not self.exact:
            return "measured: the bit-serial kernel's output was not the exact result, kept int8"
        fmt = lambda ms: "n/a" if ms is None else f"{ms:.3f} ms"  # noqa: E731
        return f"measured: bit-serial {fmt(self.bitserial_ms)}, int8 {fmt(self.int8_ms)}"


def choose(bitserial_ms: float | None, int8_ms: float | None, exact: bool, min_gain: float = MIN_GAIN) -> str:
    """``"bitserial"`` only if it ran, was exact and beat int8 by ``min_gain``."""
    if not exact or bitserial_ms is None:
        return "int8"
    if int8_ms is None:
        return "bitserial"
    return "bitserial" if bitserial_ms <= int8_ms * (1.0 - min_gain) else "int8"


# --------------------------------------------------------------------------- the two kernels


def _random_operands(layer: ConvLayer, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NHWC uint8 activations in [0, 2^a) and HWIO int8 weights the mode can represent
    (depthwise: ``(K, K, 1, C)``)."""
    from apq.kernels import bitpack

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 1 << layer.a_bits, (1, layer.height, layer.width, layer.in_channels)).astype("uint8")
    per_group = 1 if layer.op == "depthwise" else layer.in_channels
    codes = rng.integers(0, 1 << layer.w_bits, (layer.kernel, layer.kernel, per_group, layer.out_channels))
    w = bitpack.decode_weights(codes, layer.w_bits, layer.mode).astype("int8")
    return x, w


def _packed_weights(layer: ConvLayer, w: np.ndarray, cfg: Any) -> np.ndarray:
    """``w`` packed as toolchain/bitserial_lowering.py packs it for this op and config."""
    from apq.kernels import bitpack

    if layer.op == "depthwise":
        return bitpack.pack_depthwise_weights(w[:, :, 0, :], layer.w_bits, layer.mode)
    return bitpack.pack_conv_weights_hwio(w, layer.w_bits, layer.mode, cfg.word_bits)


#: layer op -> the toolchain/int8_layout.py pass that gives an NHWC int8 conv its VNNI kernel
_NHWC_INT8_REWRITES = {"pointwise": "pack_pointwise_convs", "depthwise": "pack_depthwise_convs"}
#: layer op -> the kernel registry's op name (kernels/registry.py), as the lowering looks it up
_REGISTRY_OPS = {"pointwise": "conv2d", "depthwise": "depthwise_conv2d"}


@dataclass(frozen=True)
class Board:
    """A board behind a TVM RPC tracker (apq.targets.rpc) to time kernels on, instead of here."""

    host: str
    port: int
    key: str

    def name(self) -> str:
        from apq.targets.rpc import remote_device_name

        return remote_device_name(self.key, self.host, self.port)


def reference_output(layer: ConvLayer, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The exact int32 NHWC result of the layer (NumPy, int64 sums): what both kernels must give."""
    p, s, k = layer.padding, layer.stride, layer.kernel
    xp = np.pad(x.astype(np.int64), ((0, 0), (p, p), (p, p), (0, 0)))
    oh, ow = layer.out_hw
    out = np.zeros((1, oh, ow, layer.out_channels), np.int64)
    for i in range(k):
        for j in range(k):
            window = xp[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :]
            tap = w[i, j].astype(np.int64)  # (IC, OC), depthwise (1, C)
            out += window * tap[0] if layer.op == "depthwise" else np.einsum("nhwc,co->nhwo", window, tap)
    return out.astype(np.int32)


@dataclass(frozen=True)
class _BitserialLayer:
    """What the lowering would use for a layer's bit-serial kernel: the kernel registry's entry,
    the kernel config and the packed weights (built once per measurement, used by both kernels)."""

    entry: Any
    cfg: Any
    packed: np.ndarray


def _bitserial_layer(layer: ConvLayer, w: np.ndarray, target: Any, arch: str) -> _BitserialLayer:
    from apq.kernels import bitserial
    from apq.kernels.registry import find_kernel

    cfg = bitserial.kernel_config(layer.op, layer.a_bits, layer.w_bits, layer.mode, layer.stride, layer.padding,
                                  layer.in_channels, layer.kernel, target)
    return _BitserialLayer(find_kernel(_REGISTRY_OPS[layer.op], layer.a_bits, layer.w_bits, arch), cfg,
                           _packed_weights(layer, w, cfg))


def _bitserial_kernel(layer: ConvLayer, x: np.ndarray, bs: _BitserialLayer, target: Any):
    """(scheduled PrimFunc, its arguments: x, packed weights, zeroed output) of the bit-serial
    kernel the lowering would emit for this layer (the same registry entry and builder), on its
    own: the exactness check runs it and compares the int32 sums with NumPy."""
    spec, cfg, wp = bs.entry, bs.cfg, bs.packed
    func = spec.builder(x.shape, wp.shape, cfg=cfg, kernel_size=layer.kernel, target=target, scheduled=True)
    return func, [x, wp, np.zeros((1, *layer.out_hw, layer.out_channels), "int32")]


def _requantize(bb: Any, acc: Any, out_channels: int, channel_axis: int) -> Any:
    """A per-channel requantize of int32 accumulators to uint8 (scale, bias, round, clip, cast):
    the shape of the epilogue a lowered QDQ layer fuses into its conv, so both kernels are timed
    writing what they write in a model (uint8), not int32 accumulators, whose memory traffic
    pulled the two times together on large layers."""
    from tvm import relax

    rng = np.random.default_rng(1)
    shape = [out_channels] + [1] * (3 - channel_axis)
    scale = relax.const(rng.uniform(1e-3, 2e-2, shape).astype("float32"))
    bias = relax.const(rng.uniform(-4.0, 4.0, shape).astype("float32"))
    y = relax.op.add(relax.op.multiply(relax.op.astype(acc, "float32"), scale), bias)
    # the ONNX QuantizeLinear as the importer leaves it (a plain round/clip/cast to uint8 came out
    # with gathers and byte-by-byte stores here, 4-9x slower than the model's epilogues)
    one, zero = relax.const(1.0, "float32"), relax.const(0, "uint8")
    return bb.emit(relax.op.quantize(y, one, zero, axis=channel_axis, out_dtype="uint8"))


def _one_layer_module(in_shape: tuple[int, ...], conv: Callable[[Any, Any], Any], out_channels: int,
                      channel_axis: int) -> Any:
    """``main(x: uint8) = requantize(conv(bb, x))`` as a Relax module."""
    from tvm import relax

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(list(in_shape), "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            acc = conv(bb, xv)
            y = bb.emit_output(_requantize(bb, acc, out_channels, channel_axis))
        bb.emit_func_output(y)
    return bb.get()


def _scheduled_kernels(mod: Any, target: Any) -> list[tuple[Any, list[np.ndarray]]]:
    """The PrimFuncs apq's pipeline schedules for ``mod`` on ``target`` (after fusion), each with
    its own random arguments."""
    from tvm import tirx

    from apq.kernels.knob_tuning import _random_args
    from apq.kernels.pipeline import compile_relax
    from apq.toolchain.kernel_impl import capture_scheduled

    with capture_scheduled() as cap:
        compile_relax(mod, target)
    funcs = [f for _, f in cap.module.functions_items() if isinstance(f, tirx.PrimFunc)] if cap.module else []
    return [(f, _random_args(f, 0)) for f in funcs]


def _bitserial_kernels(layer: ConvLayer, bs: _BitserialLayer, target: Any) -> list[tuple[Any, list[np.ndarray]]]:
    """The scheduled PrimFuncs of the bit-serial layer with its requantize epilogue, as the
    lowering emits it (toolchain/bitserial_lowering.py): a stride-1 unpadded pointwise kernel
    fusable, so the epilogue runs on its register tiles; other layers opaque, the epilogue a kernel
    of its own."""
    from tvm import relax

    from apq.kernels import bitserial

    spec, cfg, wp = bs.entry, bs.cfg, bs.packed
    in_shape = (1, layer.height, layer.width, layer.in_channels)
    fuse = bitserial.fuses_epilogue(layer.op, layer.stride, layer.padding, target)
    func = spec.builder(in_shape, wp.shape, cfg=cfg, kernel_size=layer.kernel, target=target, scheduled=not fuse)
    func = bitserial.fusable_unscheduled(func) if fuse else bitserial.opaque_scheduled(func)

    def conv(bb: Any, xv: Any) -> Any:
        gv = bb.add_func(func, "bitserial_conv2d")
        out = relax.TensorType((1, *layer.out_hw, layer.out_channels), "int32")
        return bb.emit(relax.call_tir(gv, [xv, relax.const(wp)], out))

    return _scheduled_kernels(_one_layer_module(in_shape, conv, layer.out_channels, 3), target)


def _int8_kernels(layer: ConvLayer, w: np.ndarray, nhwc: bool, target: Any) -> list[tuple[Any, list[np.ndarray]]]:
    """The scheduled PrimFuncs apq's int8 path builds for this layer and its requantize epilogue
    on ``target``: a one-conv Relax module through apq's pipeline, with the rewrite
    toolchain/int8_layout.py gives it on the NHWC int8 layout (packed-weight ``vpdpbusd``)."""
    from tvm import relax

    shape = (1, layer.height, layer.width, layer.in_channels)
    xshape = shape if nhwc else (1, layer.in_channels, layer.height, layer.width)
    wk = w if nhwc else np.ascontiguousarray(w.transpose(3, 2, 0, 1))
    layouts = {"data_layout": "NHWC", "kernel_layout": "HWIO"} if nhwc else {}
    groups = layer.out_channels if layer.op == "depthwise" else 1

    def conv(bb: Any, xv: Any) -> Any:
        return bb.emit(relax.op.nn.conv2d(xv, relax.const(wk), strides=layer.stride, padding=layer.padding,
                                          groups=groups, out_dtype="int32", **layouts))

    mod = _one_layer_module(xshape, conv, layer.out_channels, 3 if nhwc else 1)
    if nhwc:
        from apq.toolchain import int8_layout

        mod, _ = getattr(int8_layout, _NHWC_INT8_REWRITES[layer.op])(mod)
    return _scheduled_kernels(mod, target)


def _interleaved_best(kinds: dict[str, list[Callable[[], float]]], rounds: int) -> dict[str, float]:
    """Each kind's time: the sum of its kernels' best-repeat times, the best over ``rounds``
    interleaved rounds."""
    from apq.kernels.interleaved import interleaved_samples

    samples = interleaved_samples(list(kinds), rounds, lambda k: sum(t() for t in kinds[k]))
    return {k: round(min(v), 6) for k, v in samples.items()}


def _time_here(kernels: dict[str, list[tuple[Any, list[np.ndarray]]]], check: tuple[Any, list[np.ndarray]],
               target: Any, cfg: Any):
    """(times in ms per kind, the output of the ``check`` kernel): every kernel built and run here."""
    import tvm

    from apq.kernels.knob_tuning import _build, _set_threads

    dev = tvm.cpu()
    check_args = [tvm.runtime.tensor(a, dev) for a in check[1]]
    _build(check[0], target)["main"](*check_args)
    timers: dict[str, list[Callable[[], float]]] = {}
    for kind, entries in kernels.items():
        timers[kind] = []
        for func, arrays in entries:
            lib, args = _build(func, target), [tvm.runtime.tensor(a, dev) for a in arrays]
            ev = lib.time_evaluator("main", dev, number=cfg.number, repeat=cfg.repeat, min_repeat_ms=cfg.min_repeat_ms)
            timers[kind].append(lambda ev=ev, args=args: min(ev(*args).results) * 1e3)
    bs_out = check_args[-1].numpy()
    restore = _set_threads(cfg.threads)
    try:
        return _interleaved_best(timers, cfg.rounds), bs_out
    finally:
        _set_threads(restore)


def _export(func: Any, spec: Any, path: Path) -> None:
    """One PrimFunc as a shared library for the target (cross-compiled for a board)."""
    import tvm

    from apq.kernels.stack_alloc import tir_pipeline

    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), spec.tvm(),
                     tir_pipeline=tir_pipeline())
    if spec.is_cross:
        from tvm.support import cc

        ex.export_library(str(path), fcompile=cc.cross_compiler(spec.cross_compiler))
    else:
        ex.export_library(str(path))


def _time_on_board(kernels: dict[str, list[tuple[Any, list[np.ndarray]]]], check: tuple[Any, list[np.ndarray]],
                   spec: Any, board: Board, cfg: Any):
    """:func:`_time_here` on a board: each kernel exported for the target, uploaded, run (the
    ``check`` kernel once, its output copied back) or timed with the board's own
    ``time_evaluator`` (apq.targets.rpc)."""
    import tvm

    from apq.targets import rpc

    with tempfile.TemporaryDirectory(prefix="apq-kernel-choice-") as tmp:
        paths = {kind: [] for kind in kernels}
        for kind, entries in kernels.items():
            for i, (func, _) in enumerate(entries):
                path = Path(tmp) / f"{kind}_{i}.so"
                _export(func, spec, path)
                paths[kind].append(path)
        check_path = Path(tmp) / "check.so"
        _export(check[0], spec, check_path)

        def work(remote: Any) -> tuple[dict[str, float], np.ndarray | None]:
            rpc._remote_threads(remote, cfg.threads)
            dev = remote.cpu()
            check_args = [tvm.runtime.tensor(a, device=dev) for a in check[1]]
            rpc._upload_and_load(remote, check_path, check_path.name)["main"](*check_args)
            timers: dict[str, list[Callable[[], float]]] = {}
            for kind, entries in kernels.items():
                timers[kind] = []
                for path, (_, arrays) in zip(paths[kind], entries):
                    rlib = rpc._upload_and_load(remote, path, path.name)
                    args = [tvm.runtime.tensor(a, device=dev) for a in arrays]
                    ev = rlib.time_evaluator("main", dev, number=cfg.number, repeat=cfg.repeat,
                                             min_repeat_ms=cfg.min_repeat_ms)
                    timers[kind].append(lambda ev=ev, args=args: min(ev(*args).results) * 1e3)
            return _interleaved_best(timers, cfg.rounds), check_args[-1].numpy()

        return rpc.on_board(board.host, board.port, board.key, work)


def time_layer(layer: ConvLayer, spec: Any, nhwc: bool, cfg: Any = None, board: Board | None = None) -> KernelTiming:
    """Build, check and time both kernels of ``layer`` for target ``spec`` (a TargetSpec): here,
    or on ``board`` (see the module docstring). Exact = the bit-serial kernel's output equals
    :func:`reference_output` (the int8 path's exactness is what the rest of apq's tests check)."""
    from apq.kernels.knob_tuning import KnobTuneConfig

    cfg = cfg or KnobTuneConfig()
    target = spec.tvm()
    x, w = _random_operands(layer)
    with target:
        bs = _bitserial_layer(layer, w, target, spec.arch)
        check = _bitserial_kernel(layer, x, bs, target)
        kernels = {"bitserial": _bitserial_kernels(layer, bs, target),
                   "int8": _int8_kernels(layer, w, nhwc, target)}
    times, bs_out = (_time_here(kernels, check, target, cfg) if board is None
                     else _time_on_board(kernels, check, spec, board, cfg))
    exact = (bs_out is not None and all(kernels.values())
             and bool(np.array_equal(bs_out, reference_output(layer, x, w))))
    bs_ms, i8_ms = times["bitserial"], times["int8"]
    return KernelTiming(bs_ms, i8_ms, exact, choose(bs_ms, i8_ms, exact), device=board.name() if board else "local")


# --------------------------------------------------------------------------- the cache and the chooser


def cache_file(target: Any, cache_dir: Path | None = None) -> Path:
    """``<cache>/kernel_choice/<target key>.json`` (the cache root of kernels/knob_tuning.py)."""
    from apq.kernels.knob_tuning import cache_file as knob_cache_file

    knobs = knob_cache_file(target, cache_dir)
    return knobs.parent.parent / "kernel_choice" / knobs.name


#: the sources whose code the two timed kernels come from (apq.kernels, plus the int8 layout
#: rewrites and the bit-serial lowering's packing conventions)
_KERNEL_SOURCES = ("kernels", "toolchain/int8_layout.py", "toolchain/qdq_lowering.py")


@functools.lru_cache(maxsize=1)
def kernels_fingerprint() -> str:
    """A short hash of apq's kernel sources and the TVM version: a cached timing is only valid
    for the kernels it timed, and any edit or upgrade may change them."""
    import hashlib

    import tvm

    import apq.kernels

    root = Path(apq.kernels.__file__).resolve().parent.parent
    digest = hashlib.sha256(str(tvm.__version__).encode())
    for name in _KERNEL_SOURCES:
        path = root / name
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if f.is_file():
                digest.update(f.relative_to(root).as_posix().encode())
                digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _stamp() -> dict[str, str]:
    return {"kernels": kernels_fingerprint()}


def load_cache(path: Path) -> dict[str, KernelTiming]:
    """Timings by key ({} when the file is missing, unreadable, of another version, or from
    other kernels: :func:`kernels_fingerprint`)."""
    return {k: KernelTiming.from_json(v) for k, v in read_entries(path, CACHE_VERSION, _stamp()).items()}


def save_cache(path: Path, new: dict[str, KernelTiming], target: Any | None = None) -> None:
    """Merge ``new`` into the file under its lock, written atomically (kernels/json_cache.py)."""
    write_entries(path, {k: t.to_json() for k, t in new.items()}, CACHE_VERSION, target, _stamp())


def check_measurable(spec: Any, board: Board | None = None) -> None:
    """One-line refusal for targets whose kernels cannot be timed: here (without a board) only
    the host; on a board any LLVM CPU target (not the simulator)."""
    from apq.kernels.knob_tuning import tunable

    if board is not None:
        if spec.tvm_target.get("kind") != "llvm" or spec.executor == "simulator":
            raise InvalidInputError(f"cannot measure kernel choices for target {spec.name}: it has no CPU kernels "
                                    "to time")
        return
    if not tunable(spec):
        raise InvalidInputError(f"cannot measure kernel choices for target {spec.name} on this machine: "
                                "--bitserial measured times kernels here (host target) or on a board "
                                "(--rpc-tracker HOST:PORT --rpc-key KEY)")


class KernelChooser:
    """Per-layer kernel choices for one compile: cached on disk, timed once per new layer shape,
    here or on ``board``.

    ``measure`` replaces :func:`time_layer` (tests count its calls). ``timed`` / ``cached``
    count this chooser's lookups. A board that cannot be reached raises (one line, the compile
    stops); a kernel that fails to build or run keeps its layer int8 and is not cached.
    """

    def __init__(self, spec: Any, nhwc: bool, cache_dir: Path | None = None,
                 measure: Callable[..., KernelTiming] | None = None, board: Board | None = None) -> None:
        check_measurable(spec, board)
        self.spec, self.board = spec, board
        self.nhwc = nhwc and "avx512vnni" in spec.features
        self.path = cache_file(spec.tvm(), cache_dir)
        self.entries = load_cache(self.path)
        self.measure = measure or time_layer
        self.timed = self.cached = 0
        #: per layer (name or "#index"), what its plan decided, for the manifest (filled by
        #: toolchain/bitserial_lowering.py, the last plan of a layer wins)
        self.log: dict[str, dict[str, Any]] = {}

    @property
    def int8_form(self) -> str:
        return "int8-nhwc-vnni" if self.nhwc else "int8-nchw"

    def timing(self, layer: ConvLayer) -> KernelTiming:
        from apq.toolchain.errors import ApqError

        key = layer.key(self.int8_form) + (f" on {self.board.name()}" if self.board else "")
        if key in self.entries:
            self.cached += 1
            return self.entries[key]
        try:
            timing = self.measure(layer, self.spec, self.nhwc, board=self.board)
        except ApqError:
            raise  # an unreachable board, a library the board refuses: the user's one-line error
        except Exception as e:  # noqa: BLE001 -- a kernel that cannot be built or run is no choice
            return KernelTiming(None, None, False, "int8", " ".join(str(e).split())[:200],
                                self.board.name() if self.board else "local")
        self.timed += 1
        self.entries[key] = timing
        save_cache(self.path, {key: timing}, self.spec.tvm())
        return timing
