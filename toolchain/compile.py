"""apq-compile: any ONNX CNN (float or QDQ) -> TVM-compiled `.apq` artifact for a target.

Pipeline: load + check ONNX -> resolve static input shapes -> Relax ONNX frontend ->
QDQ lowering to integer kernels (when the model is quantized) -> DecomposeOpsForInference ->
``tvm.compile`` for the target's JSON target -> export the VM executable as a shared library
(cross-compiled for ARM boards) -> artifact with a manifest of what actually executes:
per layer the bit-widths (toolchain/layers.py, before scheduling) and the instruction path
its compiled kernel uses (``impl``, toolchain/kernel_impl.py, read from the scheduled TIR).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apq.targets.registry import TargetSpec, get_target
from apq.toolchain.artifact import LIBRARY, write_artifact
from apq.toolchain.bitserial_lowering import (BitserialPolicy, attach_kernel_choices, bitserial_weights,
                                              kernel_choice_report, lower_bitserial, make_chooser,
                                              name_bitserial_layers, supports_target)
from apq.kernels.pipeline import supports as cpu_pipeline_supports
from apq.toolchain.errors import ApqError, InvalidInputError
from apq.toolchain.float_layout import FLOAT_LAYOUTS, float_model_to_nhwc, has_integer_conv
from apq.toolchain.int8_layout import INT8_LAYOUTS, int8_to_nhwc
from apq.toolchain.kernel_impl import KernelCall, attach_impls
from apq.toolchain.onnx_import import (
    TensorSpec,
    import_to_relax,
    is_qdq_model,
    load_onnx,
    output_names,
    resolve_input_specs,
)


@dataclass
class CompileOptions:
    """Options that change what is compiled; saved in the manifest so a build is reproducible."""

    target: str = "host"
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    lower_qdq: bool = True  # lower QDQ chains to integer kernels (False: keep TVM's fake-quant float)
    # which <= 4-bit integer layers run bit-serial (toolchain/bitserial_lowering.py); None = the
    # target's default: on for the bit-serial accelerator (`bitfusion`), off on CPUs, where apq's int8
    # kernels are faster at the bits that keep accuracy (W2A2 pointwise on VNNI: 0.40-0.61x of int8,
    # kernels/kernel_choice.py). BitserialPolicy(select="measured") decides per layer by timing both.
    bitserial: BitserialPolicy | None = None
    # MetaSchedule trials for the final artifact (kernels/tuning.py); 0 = apq's schedules only.
    # Records are cached per target, so recompiling the same model runs no new trials.
    tune_trials: int = 0
    # knob-tune apq's schedules per kernel (kernels/knob_tuning.py): seconds per kernel, timed on this
    # machine (host target only), choices cached per target so a recompile times nothing.
    knob_tune: bool = False
    # activation layout of float convs on CPU targets (toolchain/float_layout.py): "NHWC" runs them
    # on apq's channel-vector schedule (measured MobileNetV2 224 px float, 1 thread: 1.18x faster
    # than "NCHW", which keeps the ONNX layout and the pixel-vector schedule). Integer graphs: int8_layout.
    float_layout: str = "NHWC"
    # activation layout of lowered int8 graphs on AVX-512 VNNI CPUs (toolchain/int8_layout.py): "NHWC"
    # puts channels in the lanes (packed-weight vpdpbusd pointwise convs, channel-vector depthwise);
    # "NCHW" keeps the pixel-lane VNNI path. Other targets keep NCHW int8 either way.
    int8_layout: str = "NHWC"
    # merge large depthwise blocks ([expand ->] depthwise [-> project]) into one kernel on CPU targets
    # (kernels/fuse_dw_pw.py; 224 px MobileNetV2 float, 1 thread: 1.20x -> 1.42x of onnxruntime).
    # False builds every conv as its own kernel, for comparison.
    fuse_blocks: bool = True
    # the board `--bitserial measured` times kernels on (apq.targets.rpc): tracker HOST:PORT and key;
    # None: on this machine (host target only)
    rpc_tracker: str | None = None
    rpc_key: str | None = None

    def __post_init__(self) -> None:
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise InvalidInputError("timing kernels on a board needs both --rpc-tracker HOST:PORT and --rpc-key KEY")
        if self.float_layout not in FLOAT_LAYOUTS:
            raise InvalidInputError(f"unknown float layout {self.float_layout!r}; use one of {list(FLOAT_LAYOUTS)}")
        if self.int8_layout not in INT8_LAYOUTS:
            raise InvalidInputError(f"unknown int8 layout {self.int8_layout!r}; use one of {list(INT8_LAYOUTS)}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "CompileOptions":
        d = dict(d)
        d["bitserial"] = BitserialPolicy.from_json(d["bitserial"]) if d.get("bitserial") is not None else None
        return CompileOptions(**d)

    def kernel_choice_board(self):
        """The :class:`apq.kernels.kernel_choice.Board` of ``rpc_tracker`` / ``rpc_key``, or None."""
        if self.rpc_tracker is None:
            return None
        from apq.kernels.kernel_choice import Board
        from apq.targets.rpc import parse_tracker

        return Board(*parse_tracker(self.rpc_tracker), str(self.rpc_key))

    def bitserial_policy(self, target: TargetSpec) -> BitserialPolicy:
        if self.bitserial is not None:
            return self.bitserial
        return BitserialPolicy() if target.executor == "simulator" else BitserialPolicy.disabled()


@dataclass
class CompileResult:
    artifact_path: Path
    manifest: dict[str, Any]
    compile_s: float

    def to_json(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact_path), "compile_s": round(self.compile_s, 3),
                "target": self.manifest["target"], "layers": self.manifest["layers"],
                "inputs": self.manifest["inputs"], "outputs": self.manifest["outputs"]}


def tool_versions() -> dict[str, str]:
    import onnx
    import tvm

    import apq

    versions = {"apq": apq.__version__, "tvm": tvm.__version__, "onnx": onnx.__version__,
                "python": platform.python_version()}
    try:
        import tvm_ffi

        versions["tvm_ffi"] = getattr(tvm_ffi, "__version__", "unknown")
    except ImportError:
        pass
    return versions


def lower_module(mod, model, target: TargetSpec, options: CompileOptions):
    """Target-independent Relax lowering shared by compile and benchmarks; returns (mod, layers)."""
    from tvm import relax

    from apq.toolchain.layers import describe_layers

    vnni = False
    if options.lower_qdq and is_qdq_model(model):
        from apq.toolchain.qdq_lowering import lower_qdq, read_bits_hint

        policy = options.bitserial_policy(target)
        bitserial = policy.enabled and supports_target(target)
        hints = read_bits_hint(model)
        # u8 x s8 is what VNNI's vpdpbusd multiplies: re-bias int8 pointwise inputs (exact). Not the
        # layers the bit-serial plan takes (planned on a plain lowering): they need their
        # zero-point-0 activations and int32 accumulators.
        vnni = "avx512vnni" in target.features
        nhwc = vnni and options.int8_layout == "NHWC"
        # --bitserial measured: each admitted pointwise / depthwise layer's bit-serial and int8 kernels timed
        # here (kernels/kernel_choice.py, cached per target); one chooser for both plans below
        chooser = make_chooser(target, policy, nhwc, options.kernel_choice_board()) if bitserial else None
        plain = bitserial_weights(lower_qdq(mod, hints), policy, chooser=chooser) if bitserial else frozenset()
        # float_accumulation: KxK integer convs (stem, depthwise) sum exactly in float32 when the
        # weights prove |acc| <= 2^24 (qdq_lowering.float_accumulation_is_exact); measured 224 px int8
        # whole model 0.71x -> 0.83x of onnxruntime. 1x1 convs stay int32 for VNNI.
        # The requantize division stays in the graph; kernels/requantize.py legalizes it without a
        # divide instruction, bit-identical to the division (ONNX semantics).
        # uint8_stems: a signed RGB stem re-biased to u8 is what the NHWC layout's patch gather +
        # vpdpbusd take (int8_layout.im2col_few_channel_convs); bench/mixed_precision.py int8 model
        # at 32 px 2.19x -> 2.53x of onnxruntime (one interleaved A/B), bit-identical.
        # vnni_depthwise: depthwise convs on vpdpbusd, 4 horizontal taps per lane
        # (kernels/x86_int8_depthwise.py), in place of float accumulation.
        mod = lower_qdq(mod, hints, uint8_pointwise=vnni, float_accumulation=vnni,
                        uint8_stems=nhwc, vnni_depthwise=nhwc, plain_layers=plain)
        if bitserial:  # <= 4-bit layers -> bit-serial kernels
            mod = attach_kernel_choices(lower_bitserial(mod, target, policy, chooser=chooser), chooser)
    layers = name_bitserial_layers(describe_layers(mod), mod)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    if has_integer_conv(mod):
        if vnni and options.int8_layout == "NHWC":
            mod = int8_to_nhwc(mod)  # toolchain/int8_layout.py
    elif options.float_layout == "NHWC" and cpu_pipeline_supports(target.tvm()):
        mod = float_model_to_nhwc(mod)  # float_layout.to_nhwc without its second has_integer_conv walk
    return mod, layers


def schedule_config(target: TargetSpec, options: CompileOptions):
    """The CpuScheduleConfig the build, knob tuning and MetaSchedule share: the target's own
    (:meth:`CpuScheduleConfig.for_spec`: block-merging thresholds from the target's L2 per core),
    with merging off for ``--no-fuse-blocks``. None for targets apq's CPU schedules do not handle."""
    if not cpu_pipeline_supports(target.tvm()):
        return None
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    cfg = CpuScheduleConfig.for_spec(target)
    return cfg if options.fuse_blocks else dataclasses.replace(cfg, fuse_blocks=False)


def fuse_for_tuning(mod, target: TargetSpec, options: CompileOptions, schedule_cfg=None):
    """``(module, prepared)``: when a tuner runs (``--tune-trials``, ``--knob-tune``), ``mod`` fused
    once (``pipeline.fused_module``) for the tuners and the build to share, else ``mod`` as is.
    Why: fusing constant-folds every weight (seconds per float model); each consumer fusing again
    repeated it up to four times. Targets a tuner refuses get their one-line error first."""
    if not options.tune_trials and not options.knob_tune:
        return mod, False
    if options.knob_tune:
        from apq.kernels.knob_tuning import check_tunable

        check_tunable(target)  # one-line refusal for targets whose kernels cannot be timed here
    if options.tune_trials:
        from apq.kernels.tuning import check_tunable as check_tunable_ms

        check_tunable_ms(target)
    from apq.kernels.pipeline import fused_module

    return fused_module(mod, target.tvm(), schedule_cfg), True


def tune_library(mod, target: TargetSpec, trials: int, progress: bool = False, schedule_cfg=None,
                 prepared: bool = False):
    """MetaSchedule records for ``mod`` (kernels/tuning.py) -> (database, report json), or (None, None).
    ``prepared``: ``mod`` is :func:`fuse_for_tuning`'s fused module."""
    if trials == 0:
        return None, None
    from apq.kernels.tuning import TuneConfig, tune_for_target, tuned_functions

    db, report = tune_for_target(mod, target, TuneConfig(trials=trials), progress=progress, schedule_cfg=schedule_cfg,
                                 prepared=prepared)
    info = report.to_json()
    info["tuned_functions"] = tuned_functions(mod, target.tvm(), db, schedule_cfg, prepared)
    return db, info


def knob_tune_library(mod, target: TargetSpec, enabled: bool, progress: bool = False, schedule_cfg=None,
                      prepared: bool = False):
    """Knob-tuned schedule choices (kernels/knob_tuning.py) -> (knobs, report json), or (None, None).
    ``prepared``: ``mod`` is :func:`fuse_for_tuning`'s fused module (what the tuner times and the
    build compiles with ``prepared=True``)."""
    if not enabled:
        return None, None
    from apq.kernels.knob_tuning import check_tunable, knob_tune

    check_tunable(target)
    knobs, report = knob_tune(mod, target.tvm(), progress=progress, prepared=prepared, schedule_cfg=schedule_cfg)
    return knobs, report.to_json()


def build_library(mod, target: TargetSpec, out_dir: Path, database=None) -> Path:
    """tvm.compile for the target and export the executable; cross-compile for ARM.

    ``database``: optional MetaSchedule records (``tune_library``) applied before apq's schedules.
    """
    return build_library_traced(mod, target, out_dir, database)[0]


def build_library_traced(mod, target: TargetSpec, out_dir: Path, database=None, knobs=None,
                         prepared: bool = False, schedule_cfg=None) -> "tuple[Path, list[KernelCall]]":
    """:func:`build_library`, also returning which instruction path each layer's kernel uses.

    The calls come from the scheduled module that code generation received
    (toolchain/kernel_impl.py); pair them with layer records by ``attach_impls``. ``knobs``: per-kernel
    schedule overrides from ``knob_tune_library``; ``prepared``: ``mod`` is already fused (its output).
    ``schedule_cfg``: :func:`schedule_config` (None: the target's own).
    """
    from apq.kernels.pipeline import compile_relax  # apq's CPU schedules (kernels/cpu_schedules.py)
    from apq.toolchain.kernel_impl import capture_scheduled, kernel_calls

    try:
        with capture_scheduled() as scheduled:
            ex = compile_relax(mod, target.tvm(), cfg=schedule_cfg, database=database, knobs=knobs, prepared=prepared)
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise ApqError(f"TVM failed to compile for {target.name}: {msg}") from None
    lib = out_dir / LIBRARY
    if target.is_cross:
        import shutil

        if shutil.which(target.cross_compiler) is None:
            raise ApqError(f"cross compiler {target.cross_compiler} not found; install "
                           "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu (apt)")
        from tvm.support import cc

        ex.export_library(str(lib), fcompile=cc.cross_compiler(target.cross_compiler))
    else:
        ex.export_library(str(lib))
    try:
        calls = kernel_calls(scheduled.module) if scheduled.module is not None else []
    except Exception as e:  # an inspection bug must not fail a good build: layers then say "unknown"
        warnings.warn(f"could not read kernel implementations from the scheduled TIR: {e}", stacklevel=2)
        calls = []
    return lib, calls


def _output_specs(mod, names: list[str]) -> list[TensorSpec]:
    """Static output shapes/dtypes from the Relax main function's return type."""
    from tvm import relax

    ret = mod["main"].ret_ty
    leaves = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    specs = []
    for i, leaf in enumerate(leaves):
        shape = tuple(int(s) for s in leaf.shape.values) if leaf.shape is not None else ()
        name = names[i] if i < len(names) else f"output_{i}"
        specs.append(TensorSpec(name, shape, str(leaf.dtype)))
    return specs


def compile_onnx(onnx_path: str | Path, target: str = "host", out_path: str | Path | None = None,
                 input_shapes: dict[str, tuple[int, ...]] | None = None,
                 options: CompileOptions | None = None, extra_manifest: dict[str, Any] | None = None,
                 progress: bool = False) -> CompileResult:
    """Compile an ONNX file into an `.apq` artifact (see module docstring)."""
    from tqdm import tqdm

    onnx_path = Path(onnx_path)
    spec = get_target(target)
    options = options or CompileOptions(target=target)
    options.target = target
    if input_shapes:
        options.input_shapes = {k: list(v) for k, v in input_shapes.items()}
    out = Path(out_path) if out_path else onnx_path.with_suffix(".apq")
    steps = tqdm(total=4, desc=f"apq-compile {onnx_path.name} -> {target}", disable=None if progress else True, unit="step",
                 leave=False)
    try:
        manifest, compile_s = _compile_steps(onnx_path, spec, options, out, extra_manifest, steps, progress)
    finally:
        steps.close()
    return CompileResult(out, manifest, compile_s)


def _compile_steps(onnx_path: Path, spec: TargetSpec, options: CompileOptions, out: Path,
                   extra_manifest: dict[str, Any] | None, steps, progress: bool = False) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    model = load_onnx(onnx_path)
    inputs = resolve_input_specs(model, {k: tuple(v) for k, v in options.input_shapes.items()})
    steps.update(1)
    mod = import_to_relax(model, inputs)
    steps.update(1)
    mod, layers = lower_module(mod, model, spec, options)
    choice = kernel_choice_report(mod)
    outputs = _output_specs(mod, output_names(model))
    steps.update(1)
    sched_cfg = schedule_config(spec, options)
    mod, prepared = fuse_for_tuning(mod, spec, options, sched_cfg)
    database, tuning = tune_library(mod, spec, options.tune_trials, progress, sched_cfg, prepared)
    knobs, knob_report = knob_tune_library(mod, spec, options.knob_tune, progress, sched_cfg, prepared)
    with tempfile.TemporaryDirectory(prefix="apq-build-") as tmp:
        lib, calls = build_library_traced(mod, spec, Path(tmp), database, knobs, prepared=prepared,
                                          schedule_cfg=sched_cfg)
        layers = attach_impls(layers, calls)
        steps.update(1)
        compile_s = time.perf_counter() - t0
        manifest: dict[str, Any] = {
            "target": spec.name,
            "target_spec": spec.to_json(),
            "source_model": {"file": onnx_path.name, "quantized": is_qdq_model(model)},
            "inputs": [s.to_json() for s in inputs],
            "outputs": [s.to_json() for s in outputs],
            "layers": [layer.to_json() for layer in layers],
            "compile": {"options": options.to_json(), "seconds": round(compile_s, 3),
                        **({"schedule_config": sched_cfg.to_json()} if sched_cfg is not None else {}),
                        **({"tuning": tuning} if tuning else {}),
                        **({"knob_tuning": knob_report} if knob_report else {}),
                        **({"kernel_choice": choice} if choice else {})},
            "versions": tool_versions(),
        }
        if extra_manifest:
            manifest.update(extra_manifest)
        write_artifact(out, {LIBRARY: lib}, manifest)
    return manifest, compile_s


def manifest_json(result: CompileResult) -> str:
    return json.dumps(result.manifest, indent=2, sort_keys=True)
