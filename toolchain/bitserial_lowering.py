"""Lower sub-8-bit integer layers to apq's bit-serial (popcount) kernels.

Runs after :func:`apq.toolchain.qdq_lowering.lower_qdq`, which leaves every quantized layer as
``conv2d / matmul(x_int8|uint8, W_int8, out_dtype="int32")`` followed by the requantize epilogue
(bias add, per-channel rescale, quantize). apq stores 2/4-bit values in 8-bit containers, so
those layers still run on the int8 kernel although their values would fit a bit-serial kernel
whose cost scales with ``a_bits * w_bits`` (kernels/bitserial.py).

Why it is exact: the rewrite replaces *only the integer dot product*. The replacement computes
the same int32 accumulator (bit-serial kernels are exact integer arithmetic), and the epilogue
is left untouched, so the network's output is bit-identical to the int8 path. What must be
proven first is that every operand fits the kernel:

- activations: the integer range of the conv input is read from the IR (the ``quantize`` dtype
  tightened by the ``clip`` that bounds it, apq's QDQ convention) and must fit ``a_bits``
  unsigned, i.e. zero point 0 after ReLU6. Signed inputs (block inputs, linear projections) of
  *unpadded* layers are shifted into the unsigned range, ``u = x + 2^(a-1)``, and the shift's
  contribution ``2^(a-1) * sum_c W[o, c]`` (a per-channel constant) is subtracted from the
  accumulator; with padding the shift would change the padded zeros, so those stay int8;
- weights: constants, packed at compile time (:mod:`apq.kernels.bitpack`) in the first weight
  mode (signed two's complement, then bipolar for apq's binary {-1, +1} weights) that represents
  every value.

Layout: the kernels are NHWC; each bit-serial layer is emitted with a ``permute_dims`` on its
uint8 input and on its int32 output, and then (``BitserialPolicy.nhwc_runs``, default on)
:func:`apq.toolchain.layout.sink_nhwc_permutes` sinks the output permutes through the requantize
epilogue / ReLU6 / residual adds and cancels them against the next layer's input permute, and
(``nhwc_depthwise``) runs the int8 depthwise conv between two bit-serial pointwise convs as an NHWC
conv, so a run of blocks is NHWC end to end with permutes only at its edges. Why: with a permute
pair per kernel, FuseOps folds the output permute into the requantize epilogue, which then reads
int32 with a transposed pattern, and the input permute after an int8 conv runs standalone
(bench/mixed_precision.py, 32 px, 1 thread, this host: 0.63 ms with permutes vs 0.41 ms with NHWC
runs; int8 kernels for the same file 0.36 ms).

Epilogues (``BitserialPolicy.fuse_epilogues``, on CPU targets apq schedules): a pointwise kernel is
emitted as its bare, int64-indexed compute, fusable (``op_pattern`` 4), so FuseOps folds the
requantize epilogue into it as it does for int8 convs, and the ``bitserial-pointwise`` schedule
rule (kernels/cpu_schedules.py) tiles the fused PrimFunc with the epilogue computed per register
tile. A pre-scheduled kernel cannot be fused (FuseTIR merges unscheduled PrimFuncs only, with one
index type: an int32 kernel output mapped onto an int64 epilogue input is rejected). Measured, 32
px, 1 thread, interleaved: 1.05-1.10x faster than opaque kernels with separate epilogues.

On x86 CPUs with VNNI the layers that stay int8 keep the VNNI forms of the int8 path (compile.py
plans this pass on a plain lowering and exempts the planned layers from lower_qdq's uint8 re-bias
and float32 accumulation: :func:`bitserial_weights`), so a mixed network runs bit-serial, VNNI
int8 and float-accumulated depthwise kernels side by side (0.49 -> 0.28 ms on the benchmark's
mixed model, 32 px, 1 thread).

Which layers go bit-serial is a :class:`BitserialPolicy` (JSON round-trip, saved in the
artifact's compile options): per op kind the largest (activation, weight) bits. The defaults
follow bench/kernels.py on this machine: pointwise conv and dense up to 4x4 bits, depthwise only
up to 2x2 (packing a-bit windows costs more than int8 MACs at 4 bits), full KxK convs stay int8,
and the first and last compute layers (stem, classifier) stay int8 as in APQ.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from apq.toolchain.errors import InvalidInputError
from apq.toolchain.layers import (
    WEIGHT_BITS_ATTR,
    WEIGHT_NAMES_ATTR,
    LayerRecord,
    const_value,
    range_bits,
    static_shape,
    tensor_dtype,
    weight_fingerprint,
)

#: Op kinds a policy can name (what :func:`layer_kind` returns).
OP_KINDS = ("pointwise", "conv", "depthwise", "dense")
#: Weight encodings tried in order: apq's symmetric weights are two's complement; 1-bit {-1, +1} is bipolar.
WEIGHT_MODE_ORDER = ("signed", "bipolar", "unipolar")
#: PrimFunc attributes describe_layers reads (apq.toolchain.layers).
WEIGHT_BITS_FUNC_ATTR = "apq.weight_bits"
ACT_BITS_FUNC_ATTR = "apq.activation_bits"
#: BitserialPolicy.select values: admit by bits only, or by bits and a measured speed comparison.
SELECT_MODES = ("bits", "measured")
#: Module attribute holding lower_bitserial's decisions (JSON list of LayerDecision).
DECISIONS_ATTR = "apq_bitserial"
#: Module attribute: the measured kernel choices of a "measured" policy (JSON object, kernel_choice_report).
KERNEL_CHOICE_ATTR = "apq_kernel_choice"
#: Module attribute: geometry of the convs the NHWC pass relaid out, in program order (JSON list).
NHWC_CONVS_ATTR = "apq_nhwc_convs"


# --------------------------------------------------------------------------- policy


@dataclass
class OpRule:
    """Layers of ``op`` kind go bit-serial when a_bits <= max_a_bits and w_bits <= max_w_bits."""

    op: str
    max_a_bits: int
    max_w_bits: int

    def __post_init__(self) -> None:
        if self.op not in OP_KINDS:
            raise InvalidInputError(f"unknown op kind {self.op!r} in bit-serial policy; valid: {', '.join(OP_KINDS)}")
        for v in (self.max_a_bits, self.max_w_bits):
            if not 0 <= int(v) <= 8:
                raise InvalidInputError(f"bit-serial policy bits must be in 0..8, got {v} for {self.op}")

    def admits(self, a_bits: int, w_bits: int) -> bool:
        return a_bits <= self.max_a_bits and w_bits <= self.max_w_bits


def _default_rules() -> list[OpRule]:
    return [OpRule("pointwise", 4, 4), OpRule("dense", 4, 4), OpRule("depthwise", 2, 2)]


@dataclass
class BitserialPolicy:
    """Which integer layers :func:`lower_bitserial` moves to bit-serial kernels.

    ``rules``: per op kind, the largest bits admitted (a kind without a rule stays int8).
    ``keep_first_last``: the first and the last compute layer stay int8 whatever their bits.
    ``signed_offset``: allow signed inputs of unpadded layers via the exact offset shift.
    ``nhwc_runs``: keep runs of bit-serial layers and the elementwise ops between them in NHWC
    (:func:`apq.toolchain.layout.sink_nhwc_permutes`) instead of transposing around every kernel.
    ``nhwc_depthwise``: also run int8 depthwise convs inside such a run as NHWC convs.
    ``fuse_epilogues``: on targets apq's CPU schedules handle, emit pointwise kernels unscheduled
    and fusable (``op_pattern`` 4), so FuseOps folds their requantize epilogue into them and
    :func:`apq.kernels.bitserial.schedule_fused_pointwise` schedules the result; off (or other
    targets), they are opaque, pre-scheduled kernels with the epilogue as a kernel of its own.
    ``select``: ``"bits"`` moves every layer the rules admit; ``"measured"`` also times each
    admitted pointwise and depthwise layer's bit-serial kernel against the target's int8 kernel on
    this machine and keeps it bit-serial only where that is faster (:mod:`apq.kernels.kernel_choice`;
    host target only). Dense layers follow the rules either way.
    """

    enabled: bool = True
    rules: list[OpRule] = field(default_factory=_default_rules)
    keep_first_last: bool = True
    signed_offset: bool = True
    nhwc_runs: bool = True
    nhwc_depthwise: bool = True
    fuse_epilogues: bool = True
    select: str = "bits"

    def __post_init__(self) -> None:
        if self.select not in SELECT_MODES:
            raise InvalidInputError(f"unknown bit-serial select {self.select!r}; valid: {', '.join(SELECT_MODES)}")

    def rule(self, op: str) -> OpRule | None:
        return next((r for r in self.rules if r.op == op), None)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | str | None) -> "BitserialPolicy":
        if d is None:
            return cls()
        d = dict(json.loads(d) if isinstance(d, str) else d)
        if "rules" in d:
            d["rules"] = [r if isinstance(r, OpRule) else OpRule(**r) for r in d["rules"]]
        try:
            return cls(**d)
        except TypeError as e:
            raise InvalidInputError(f"bad bit-serial policy: {e}") from None

    @classmethod
    def disabled(cls) -> "BitserialPolicy":
        return cls(enabled=False)


# --------------------------------------------------------------------------- target support


def supports_target(target: Any) -> bool:
    """Bit-serial kernels need a popcount: AArch64 (NEON cnt) or x86 with POPCNT; and a registered
    bit-serial kernel for the target's arch."""
    from apq.kernels.registry import find_kernel
    from apq.toolchain.errors import UnsupportedModelError

    if target.arch == "x86_64" and "popcnt" not in target.features and "bit-serial" not in target.features:
        return False
    try:
        find_kernel("conv2d", 2, 2, target.arch)
    except UnsupportedModelError:
        return False
    return True


# --------------------------------------------------------------------------- decisions


@dataclass
class LayerDecision:
    """What the pass decided for one integer layer, and why (for reports and tests)."""

    index: int  # position among the integer conv2d / matmul calls of main
    op: str  # pointwise | conv | depthwise | dense | other
    a_bits: int
    w_bits: int
    bitserial: bool
    reason: str
    kernel: str = ""
    weight_mode: str = ""
    a_offset: int = 0  # added to signed inputs to make them unsigned (0 = already unsigned)
    layer: str = ""  # ONNX weight initializer name, when lower_qdq recorded it
    geometry: dict[str, Any] | None = None  # describe_layers' geometry of the original layer
    measured: dict[str, Any] | None = None  # kernel_choice timing (BitserialPolicy.select "measured")
    # channel-packed kernels: packing word and accumulator lanes (kernels/bitserial.narrow_words)
    word_bits: int = 0
    acc_bits: int = 0

    @property
    def kernel_family(self) -> str:
        """Kernel name without the per-shape suffix, e.g. ``bitserial_conv2d_a4w2``."""
        kind = {"dense": "dense", "depthwise": "depthwise_conv2d"}.get(self.op, "conv2d")
        return f"bitserial_{kind}_a{self.a_bits}w{self.w_bits}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _op_name(call: Any) -> str:
    op = getattr(call, "op", None)
    return str(getattr(op, "name", "")) if op is not None else ""


def _integer_operands(call: Any) -> bool:
    """8-bit integer data times a constant int8 weight."""
    return (tensor_dtype(call.args[0]) in ("int8", "uint8") and tensor_dtype(call.args[1]) == "int8"
            and const_value(call.args[1]) is not None)


def _is_integer_dot(call: Any) -> bool:
    return (_op_name(call) in ("relax.nn.conv2d", "relax.matmul") and tensor_dtype(call) == "int32"
            and _integer_operands(call))


def _is_float_accumulated_conv(call: Any) -> bool:
    """An integer-operand conv2d that lower_qdq made accumulate in float32 (exact; KxK convs on
    VNNI CPUs): still a layer of the network, counted like the int32 ones (first/last, indices)."""
    return _op_name(call) == "relax.nn.conv2d" and tensor_dtype(call) == "float32" and _integer_operands(call)


def _is_integer_layer(call: Any) -> bool:
    return _is_integer_dot(call) or _is_float_accumulated_conv(call)


def layer_kind(call: Any) -> str:
    """pointwise | conv | depthwise | dense | other, for an integer conv2d / matmul call."""
    if _op_name(call) == "relax.matmul":
        x = static_shape(call.args[0])
        return "dense" if x is not None and len(x) == 2 and const_value(call.args[1]).ndim == 2 else "other"
    a = call.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
        return "other"
    w, x = const_value(call.args[1]), static_shape(call.args[0])
    if x is None or len(x) != 4:
        return "other"
    groups, cin = int(a.groups), x[1]
    if groups == 1:
        return "pointwise" if w.shape[2] == w.shape[3] == 1 else "conv"
    if groups == cin == w.shape[0] and w.shape[1] == 1:
        return "depthwise"
    return "other"


class _Producers:
    """var -> bound value of one function (to follow a conv input back to its quantize/clip)."""

    def __init__(self, func: Any) -> None:
        from tvm import relax

        self._by_var: dict[Any, Any] = {}
        if isinstance(func.body, relax.SeqExpr):
            for block in func.body.blocks:
                for b in block.bindings:
                    if hasattr(b, "value"):
                        self._by_var[b.var] = b.value

    def __call__(self, expr: Any) -> Any:
        return self._by_var.get(expr)

    def values(self) -> list[Any]:
        """Bound values in program order."""
        return list(self._by_var.values())


def integer_range(producers: _Producers, data: Any) -> tuple[int, int]:
    """Proven [lo, hi] of an integer activation: its dtype range tightened by the clips bounding it.

    Only clips are trusted (``quantize`` saturates to the dtype, which the start value covers);
    any other producer ends the walk with what has been proven so far.
    """
    from apq.toolchain.layers import _clip_step  # one reader of ONNX-imported Clip forms

    info = np.iinfo(np.dtype(tensor_dtype(data)))
    lo, hi = int(info.min), int(info.max)
    expr = data
    for _ in range(8):
        step = _clip_step(producers(expr))
        if step is None:
            break
        expr, step_lo, step_hi = step
        lo = max(lo, int(np.ceil(step_lo))) if step_lo is not None else lo
        hi = min(hi, int(np.floor(step_hi))) if step_hi is not None else hi
    return lo, hi


def _weight_mode(w: np.ndarray, w_bits: int) -> str | None:
    from apq.kernels import bitpack

    for mode in WEIGHT_MODE_ORDER:
        lo, hi = bitpack.weight_range(w_bits, mode)
        if w.size and (int(w.min()) < lo or int(w.max()) > hi):
            continue
        if mode == "bipolar" and np.any((w.astype(np.int64) + hi) % 2):
            continue
        return mode
    return None


def _weight_bits(w: np.ndarray, declared: dict[str, int]) -> int:
    """Declared bits (lower_qdq's record) else the fewest two's complement bits holding the values."""
    bits = declared.get(weight_fingerprint(w))
    if bits is not None:
        return int(bits)
    return min(8, range_bits(int(w.min()), int(w.max()))) if w.size else 8


def _conv_geometry_ok(call: Any) -> str:
    """'' if the conv's attributes fit the bit-serial kernels, else the reason they do not."""
    a = call.attrs
    pad = [int(p) for p in a.padding]
    strides, dil = [int(s) for s in a.strides], [int(d) for d in a.dilation]
    w = const_value(call.args[1])
    if len(set(pad)) != 1:
        return f"asymmetric padding {pad}"
    if len(set(strides)) != 1 or any(d != 1 for d in dil):
        return f"strides {strides} / dilation {dil} not supported"
    if w.shape[2] != w.shape[3]:
        return f"non-square kernel {w.shape[2]}x{w.shape[3]}"
    if str(a.out_layout) not in ("NCHW", ""):
        return f"out_layout {a.out_layout}"
    return ""


def decide(call: Any, index: int, n_layers: int, producers: _Producers, declared: dict[str, int],
           policy: BitserialPolicy, names: dict[str, str] | None = None) -> LayerDecision:
    """Decide one integer layer (pure: reads the IR, changes nothing)."""
    from apq.kernels import bitpack
    from apq.toolchain.layers import _geometry  # the manifest's geometry format, one implementation

    op = layer_kind(call)
    w = const_value(call.args[1])
    w_bits = _weight_bits(w, declared)
    lo, hi = integer_range(producers, call.args[0])
    signed = lo < 0
    a_bits = range_bits(0, hi - lo) if signed else range_bits(0, hi)
    d = LayerDecision(index, op, a_bits, w_bits, False, "", layer=(names or {}).get(weight_fingerprint(w), ""),
                      geometry=_geometry("matmul" if op == "dense" else "conv2d", call))
    rule = policy.rule(op)
    if not policy.enabled:
        d.reason = "bit-serial lowering disabled"
    elif not _is_integer_dot(call):
        d.reason = "accumulates in float32 (lower_qdq, exact): stays on the int8 kernels"
    elif policy.keep_first_last and index in (0, n_layers - 1):
        d.reason = "first/last layer stays int8 (policy)"
    elif rule is None:
        d.reason = f"policy has no rule for {op} layers"
    elif not rule.admits(a_bits, w_bits):
        d.reason = f"a{a_bits}w{w_bits} above the policy's {op} limit a{rule.max_a_bits}w{rule.max_w_bits}"
    elif op != "dense" and _conv_geometry_ok(call):
        d.reason = _conv_geometry_ok(call)
    elif op == "depthwise" and w.shape[2] * w.shape[3] > 64:
        d.reason = "depthwise window larger than 64 bits"
    elif signed and not policy.signed_offset:
        d.reason = "signed activation (policy forbids the offset shift)"
    elif signed and op != "dense" and any(int(p) for p in call.attrs.padding):
        d.reason = "signed activation of a padded conv (shift would change the padding)"
    elif _weight_mode(w, w_bits) is None:
        d.reason = f"weights not representable in {w_bits} bits"
    else:
        d.bitserial, d.reason = True, "policy"
        d.weight_mode = _weight_mode(w, w_bits) or ""
        d.a_offset = -lo if signed else 0
        bitpack.check_bits(a_bits, "a_bits")
    return d


def _plan(mod: Any, policy: BitserialPolicy | None, func_name: str,
          chooser: Any = None) -> list[tuple[Any, LayerDecision]]:
    policy = policy or BitserialPolicy()
    if policy.select == "measured" and policy.enabled and chooser is None:
        raise InvalidInputError("a measured bit-serial policy needs a kernel chooser (bitserial_lowering.make_chooser)")
    func = mod[func_name]
    producers = _Producers(func)
    calls = [v for v in producers.values() if _is_integer_layer(v)]
    declared = {k: int(v) for k, v in _module_attr(mod, WEIGHT_BITS_ATTR).items()}
    names = {k: str(v) for k, v in _module_attr(mod, WEIGHT_NAMES_ATTR).items()}
    plan = [(c, decide(c, i, len(calls), producers, declared, policy, names)) for i, c in enumerate(calls)]
    if policy.select == "measured":
        from tqdm import tqdm

        admitted = [(c, d) for c, d in plan if d.bitserial]
        # timing is ~1 s per new layer shape (cached ones are instant); disable=None: a bar on a terminal only
        for c, d in tqdm(admitted, desc="apq kernel choice", unit="layer", disable=None, leave=False):
            _measured_choice(c, d, chooser)
    return plan


def plan_bitserial(mod: Any, policy: BitserialPolicy | None = None, func_name: str = "main",
                   chooser: Any = None) -> list[LayerDecision]:
    """Decisions for every integer conv2d / matmul of ``mod[func_name]``, in program order.
    ``chooser``: a :class:`apq.kernels.kernel_choice.KernelChooser`, required when the policy's
    ``select`` is ``"measured"`` (:func:`make_chooser`)."""
    return [d for _, d in _plan(mod, policy, func_name, chooser)]


def bitserial_weights(mod: Any, policy: BitserialPolicy | None = None, func_name: str = "main",
                      chooser: Any = None) -> frozenset[str]:
    """Fingerprints of the integer weights of the layers the plan moves to bit-serial kernels.

    Why: on VNNI CPUs lower_qdq re-biases pointwise inputs to uint8 and accumulates KxK convs in
    float32, which would hide these layers' zero-point-0 inputs and int32 accumulators from
    :func:`lower_bitserial`. Planned on a plain lowering, passed back to lower_qdq as
    ``plain_layers``, the rest of the network keeps the VNNI forms (bit-serial and VNNI int8
    kernels in one network)."""
    return frozenset(weight_fingerprint(const_value(c.args[1])) for c, d in _plan(mod, policy, func_name, chooser)
                     if d.bitserial)


def make_chooser(target_spec: Any, policy: BitserialPolicy, nhwc_int8: bool = True, board: Any = None) -> Any:
    """The kernel chooser a ``"measured"`` policy needs (None for ``"bits"``); one per compile, so
    the plain-lowering plan and :func:`lower_bitserial` see the same timings. ``nhwc_int8``: the
    int8 layers of this build run in NHWC (CompileOptions.int8_layout); ``board``: a
    :class:`apq.kernels.kernel_choice.Board` to time on instead of this machine."""
    if policy.select != "measured" or not policy.enabled:
        return None
    from apq.kernels.kernel_choice import KernelChooser

    return KernelChooser(target_spec, nhwc_int8, board=board)


def _measured_choice(call: Any, d: LayerDecision, chooser: Any) -> None:
    """Time an admitted layer's two kernels (kernels/kernel_choice.py); move it back to int8 when
    that is faster. Op kinds the module cannot time keep the rules' decision."""
    from apq.kernels.kernel_choice import MEASURED_OPS, ConvLayer

    if d.op not in MEASURED_OPS:
        d.reason = f"policy (select=measured times {' and '.join(MEASURED_OPS)} layers only)"
        return
    _, c, h, w = static_shape(call.args[0])
    o, _, k, _ = const_value(call.args[1]).shape  # OIHW
    timing = chooser.timing(ConvLayer(d.op, h, w, c, int(o), int(k), int(call.attrs.strides[0]),
                                      int(call.attrs.padding[0]), d.a_bits, d.w_bits, d.weight_mode))
    d.measured = timing.to_json()
    d.reason = timing.summary()
    chooser.log[d.layer or f"#{d.index}"] = {"index": d.index, "layer": d.layer, "op": d.op, "a_bits": d.a_bits,
                                             "w_bits": d.w_bits, **d.measured}
    if timing.kernel != "bitserial":
        d.bitserial, d.weight_mode, d.a_offset = False, "", 0


def _module_attr(mod: Any, key: str) -> dict[str, Any]:
    value = mod.get_attr(key) if mod.attrs is not None else None
    return {str(k): v for k, v in dict(value or {}).items()}


# --------------------------------------------------------------------------- emission


def _finish(func: Any, d: LayerDecision, fusable: bool = False) -> Any:
    """Prepare a PrimFunc for the module: no symbol (Relax names it), the bits describe_layers
    reports, and either scheduled + opaque (apq's dlight rules skip it, FuseTIR leaves it alone) or
    unscheduled + fusable with its elementwise consumers (``fusable``: a schedule rule takes the
    fused PrimFunc)."""
    from apq.kernels.bitserial import fusable_unscheduled, opaque_scheduled

    func = (func.with_attr(WEIGHT_BITS_FUNC_ATTR, d.w_bits).with_attr(ACT_BITS_FUNC_ATTR, d.a_bits)
            .with_attr("apq.weight_mode", d.weight_mode))
    return fusable_unscheduled(func) if fusable else opaque_scheduled(func)


def _fuses_epilogue(call: Any, d: LayerDecision, target: Any, policy: BitserialPolicy) -> bool:
    """Whether this layer's kernel is emitted fusable (BitserialPolicy.fuse_epilogues)."""
    from apq.kernels.bitserial import fuses_epilogue

    padding = max(int(p) for p in call.attrs.padding)
    return policy.fuse_epilogues and fuses_epilogue(d.op, int(call.attrs.strides[0]), padding, target.tvm())


def _unsigned_input(x: Any, d: LayerDecision) -> Any:
    """The activation as uint8 codes in [0, 2^a): shifted by the offset when it was signed."""
    from tvm import relax

    if d.a_offset:
        x = relax.op.add(x, relax.const(d.a_offset, tensor_dtype(x)))  # no overflow: range proven
    return relax.op.astype(x, "uint8") if tensor_dtype(x) != "uint8" else x


def _offset_correction(acc: Any, d: LayerDecision, wsum: np.ndarray, shape: tuple[int, ...]) -> Any:
    from tvm import relax

    if not d.a_offset:
        return acc
    corr = (d.a_offset * wsum.astype(np.int64)).astype(np.int32).reshape(shape)
    return relax.op.subtract(acc, relax.const(corr))


def _emit_conv(bb: Any, call: Any, x: Any, d: LayerDecision, target: Any, policy: BitserialPolicy) -> Any:
    """NCHW integer conv -> NHWC bit-serial call (permute in/out), same int32 NCHW result."""
    from tvm import relax

    from apq.kernels import bitpack
    from apq.kernels.bitserial import conv_out_size, kernel_config
    from apq.kernels.registry import find_kernel

    w = const_value(call.args[1])  # OIHW
    o, ci, k, _ = w.shape
    cfg = kernel_config(d.op, d.a_bits, d.w_bits, d.weight_mode, int(call.attrs.strides[0]),
                        int(call.attrs.padding[0]), ci, k, target.tvm())
    xt = bb.emit(relax.op.permute_dims(_unsigned_input(x, d), [0, 2, 3, 1]))
    x_shape = tuple(static_shape(xt))
    if d.op == "depthwise":
        packed = bitpack.pack_depthwise_weights(np.transpose(w[:, 0], (1, 2, 0)), d.w_bits, d.weight_mode)
        spec = find_kernel("depthwise_conv2d", d.a_bits, d.w_bits, target.arch)
    else:
        packed = bitpack.pack_conv_weights_hwio(np.transpose(w, (2, 3, 1, 0)), d.w_bits, d.weight_mode,
                                                cfg.word_bits)
        spec = find_kernel("conv2d", d.a_bits, d.w_bits, target.arch)
        d.word_bits, d.acc_bits = cfg.word_bits, cfg.acc_bits
    fusable = _fuses_epilogue(call, d, target, policy)
    func = spec.builder(x_shape, packed.shape, cfg=cfg, kernel_size=k, target=target.tvm(), scheduled=not fusable)
    d.kernel = d.kernel_family
    gv = bb.add_func(_finish(func, d, fusable), f"{d.kernel}_nhwc")
    oh = conv_out_size(x_shape[1], k, cfg.stride, cfg.padding)
    ow = conv_out_size(x_shape[2], k, cfg.stride, cfg.padding)
    out = bb.emit(relax.call_tir(gv, [xt, relax.const(packed)], relax.TensorType((x_shape[0], oh, ow, o), "int32")))
    acc = relax.op.permute_dims(out, [0, 3, 1, 2])
    return _offset_correction(acc, d, w.reshape(o, -1).sum(axis=1), (1, o, 1, 1))


def _emit_dense(bb: Any, call: Any, x: Any, d: LayerDecision, target: Any, policy: BitserialPolicy) -> Any:
    """(M, K) x const (K, N) integer matmul -> bit-serial dense, same int32 result."""
    from tvm import relax

    from apq.kernels import bitpack
    from apq.kernels.bitserial import BitserialConfig
    from apq.kernels.registry import find_kernel

    w_kn = const_value(call.args[1])
    cfg = BitserialConfig(d.a_bits, d.w_bits, d.weight_mode)
    packed = bitpack.pack_dense_weights(w_kn.T, d.w_bits, d.weight_mode, cfg.word_bits)
    xu = bb.emit(_unsigned_input(x, d)) if d.a_offset or tensor_dtype(x) != "uint8" else x
    x_shape = tuple(static_shape(xu))
    spec = find_kernel("dense", d.a_bits, d.w_bits, target.arch)
    func = spec.builder(x_shape, packed.shape, cfg=cfg, target=target.tvm())
    d.kernel = d.kernel_family
    d.word_bits, d.acc_bits = cfg.word_bits, cfg.acc_bits
    gv = bb.add_func(_finish(func, d), f"{d.kernel}_mk")
    out = relax.call_tir(gv, [xu, relax.const(packed)], relax.TensorType((x_shape[0], w_kn.shape[1]), "int32"))
    return _offset_correction(out, d, w_kn.sum(axis=0), (w_kn.shape[1],))


#: Registry: op kind -> emitter. A new bit-serial kernel family is one entry.
EMITTERS: dict[str, Callable[[Any, Any, Any, LayerDecision, Any, BitserialPolicy], Any]] = {
    "pointwise": _emit_conv,
    "conv": _emit_conv,
    "depthwise": _emit_conv,
    "dense": _emit_dense,
}


def lower_bitserial(mod: Any, target_spec: Any, policy: BitserialPolicy | None = None,
                    func_name: str = "main", chooser: Any = None) -> Any:
    """Replace the policy-selected integer conv2d / matmul calls of ``mod[func_name]`` by bit-serial kernels.

    ``mod`` is lower_qdq's output; ``target_spec`` an :class:`apq.targets.registry.TargetSpec`
    (its arch picks the kernels from :mod:`apq.kernels.registry`, its TVM target the vector
    width). Returns a new module; the epilogues are untouched, so outputs are bit-identical.
    The decisions are stored as the module attribute :data:`DECISIONS_ATTR` (JSON), see
    :func:`read_decisions` and :func:`name_bitserial_layers`. ``chooser``: the compile's
    :func:`make_chooser` (a ``"measured"`` policy without one makes its own).
    """
    from tvm import relax

    policy = policy or BitserialPolicy()
    chooser = chooser or make_chooser(target_spec, policy)
    decisions = plan_bitserial(mod, policy, func_name, chooser)
    chosen = [d for d in decisions if d.bitserial]
    if not chosen:
        return mod.with_attr(DECISIONS_ATTR, json.dumps([d.to_json() for d in decisions]))
    import tvm

    # a copy: the mutator's builder adds the kernels to (and we then overwrite main of) its module
    func = mod[func_name]
    by_index = {d.index: d for d in chosen}

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, m: Any) -> None:
            super().__init__(m)
            self.count = 0

        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's visitor name)
            new = self.visit_expr_post_order(call)
            if not _is_integer_layer(call):
                return new
            d = by_index.get(self.count)
            self.count += 1
            if d is None:
                return new
            return EMITTERS[d.op](self.builder_, call, new.args[0], d, target_spec, policy)

    rewriter = _Rewriter(tvm.IRModule(dict(mod.functions), attrs=mod.attrs))
    new_func = rewriter.visit_expr(func)
    out = rewriter.builder_.get()
    out[func_name] = new_func
    out = relax.transform.Normalize()(out)
    if mod.attrs is not None:
        for key in mod.attrs.keys():
            out = out.with_attr(str(key), mod.attrs[key])
    if policy.nhwc_runs:  # after the attrs: it re-keys lower_qdq's weight tables
        from apq.toolchain.layout import sink_nhwc_permutes

        out, stats = sink_nhwc_permutes(out, func_name, depthwise=policy.nhwc_depthwise)
        # a JSON object, never a short string: tvm-ffi stores <= 7-byte strings inline ("[]"), which
        # IRModule.get_attr cannot return
        out = out.with_attr(NHWC_CONVS_ATTR, json.dumps({"geometry": [c["geometry"] for c in stats.convs]}))
    return out.with_attr(DECISIONS_ATTR, json.dumps([d.to_json() for d in decisions]))


def read_decisions(mod: Any) -> list[LayerDecision]:
    """The decisions lower_bitserial stored on ``mod`` (empty if the pass did not run)."""
    raw = mod.get_attr(DECISIONS_ATTR) if mod.attrs is not None else None
    return [LayerDecision(**d) for d in json.loads(str(raw))] if raw is not None else []


def kernel_choice_report(mod: Any) -> list[dict[str, Any]]:
    """The measured kernel choices (BitserialPolicy.select "measured") stored on ``mod`` by
    :func:`attach_kernel_choices`: per measured layer its bits, both kernels' times and the kernel
    chosen, for the artifact's manifest; [] when none were measured."""
    if mod.attrs is None or KERNEL_CHOICE_ATTR not in mod.attrs:
        return []
    return list(json.loads(str(mod.attrs[KERNEL_CHOICE_ATTR]))["layers"])


def attach_kernel_choices(mod: Any, chooser: Any) -> Any:
    """``mod`` with the chooser's per-layer timings as :data:`KERNEL_CHOICE_ATTR` (a no-op without)."""
    if chooser is None or not chooser.log:
        return mod
    layers = sorted(chooser.log.values(), key=lambda e: e["index"])
    return mod.with_attr(KERNEL_CHOICE_ATTR, json.dumps({"layers": layers}))


def name_bitserial_layers(records: list[LayerRecord], mod: Any) -> list[LayerRecord]:
    """Give bit-serial layer records their ONNX layer name, kernel family and geometry.

    describe_layers sees a ``call_tir`` whose weight is a packed constant inside an argument
    tuple, so it can name the layer only by position and has no geometry; the pass knows both.
    Records and decisions are both in program order, so the k-th bit-serial record is the k-th
    bit-serial decision.
    """
    chosen = iter([d for d in read_decisions(mod) if d.bitserial])
    raw = mod.get_attr(NHWC_CONVS_ATTR) if mod.attrs is not None else None
    nhwc = iter(json.loads(str(raw))["geometry"] if raw is not None else [])
    out = []
    for rec in records:
        if rec.kernel.startswith("bitserial"):
            d = next(chosen, None)
            if d is not None:
                rec = dataclasses.replace(rec, name=d.layer or rec.name, kernel=d.kernel_family,
                                          geometry=d.geometry)
        elif rec.kernel.startswith("conv2d") and rec.geometry is None:
            # an NHWC conv of the layout pass: describe_layers reads NCHW geometry only
            rec = dataclasses.replace(rec, geometry=next(nhwc, None))
        out.append(rec)
    return out
