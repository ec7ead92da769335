"""Latency measurement protocol and per-layer profiles of compiled Relax VM libraries.

Why a protocol of its own: a latency figure is only worth comparing if it was taken the same
way every time. So every measurement here does warm-up calls (caches, lazy allocation, page
faults), then repeats until both a minimum number of repeats and a minimum total time are
reached, and reports the median with its spread (p10/p90, std) together with what could skew
it: the number of runtime threads actually in use, the CPU model and the frequency governor.

Threads matter more than one would think with TVM: its thread pool is sized once per OS thread
from ``TVM_NUM_THREADS`` (default: cores / 2 on x86, assuming hyper-threading, i.e. *one*
thread on a 2-core machine), and ``runtime.config_threadpool`` can only shrink it afterwards.
:func:`set_runtime_threads` therefore sets the cap before the pool exists and reports the count
the runtime actually uses, which is what goes into :class:`LatencyStats`.

Per-layer tables come from ``VirtualMachine.set_instrument`` (TVM 0.27 dropped the profiling
VM): every packed-function call of the VM is timed and aggregated by kernel name. Instrumented
runs are slower than plain ones (a Python callback per call), so the table is normalised to the
instrumented run's own wall time and never mixed with the end-to-end statistics.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import struct
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from apq.toolchain.errors import ArtifactError, InvalidInputError
from apq.toolchain.runtime import vm_outputs

GOVERNOR_PATH = "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"
BUILTIN_PREFIX = "vm.builtin."
BUILTINS_ROW = "(vm builtins)"


# --------------------------------------------------------------------------- configuration


@dataclass
class MeasureConfig:
    """How to time one callable; saved beside every figure so it can be reproduced."""

    warmup: int = 3  # untimed calls first: caches, lazy allocation, thread-pool start
    min_repeats: int = 10  # never fewer timed calls than this ...
    min_time_s: float = 0.5  # ... and keep going until this much time was timed ...
    max_repeats: int = 2000  # ... but never more calls than this (slow callables stop early)
    layer_runs: int = 5  # instrumented runs; the table is the one with the median wall time
    version: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.warmup < 0 or self.min_repeats < 1 or self.max_repeats < 1 or self.layer_runs < 1:
            raise InvalidInputError(
                f"measure config needs warmup >= 0 and min_repeats, max_repeats, layer_runs >= 1, got {self}")
        if self.min_repeats > self.max_repeats:
            raise InvalidInputError(f"min_repeats ({self.min_repeats}) > max_repeats ({self.max_repeats})")
        if not (self.min_time_s >= 0 and math.isfinite(self.min_time_s)):
            raise InvalidInputError(f"min_time_s must be a finite number >= 0, got {self.min_time_s}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "MeasureConfig":
        known = {f.name for f in fields(MeasureConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidInputError(f"unknown measure config keys {unknown}")
        return MeasureConfig(**d)

    @staticmethod
    def quick() -> "MeasureConfig":
        """A short protocol for tests and smoke runs (figures are real, just noisier)."""
        return MeasureConfig(warmup=1, min_repeats=3, min_time_s=0.02, max_repeats=200, layer_runs=3)


# --------------------------------------------------------------------------- environment facts


def read_governor(path: str = GOVERNOR_PATH) -> str | None:
    """The cpufreq governor ('performance', 'powersave', ...) or None where not exposed (VMs)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def host_device_name() -> str:
    from apq.targets.registry import read_cpu_model

    return read_cpu_model()


_ELF_MACHINES = {3: "x86", 62: "x86_64", 40: "arm", 183: "aarch64", 243: "riscv"}


def elf_arch(path: str | Path) -> str | None:
    """The architecture an ELF shared library was built for, from its header; None if not ELF.

    Why: dlopen of a library built for another CPU fails with an opaque loader message deep in
    TVM; checking the header first lets us say "built for aarch64, this host is x86_64".
    """
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    endian = "<" if head[5] == 1 else ">"
    machine = struct.unpack(endian + "H", head[18:20])[0]
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine}")


def host_arch() -> str:
    m = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m.lower(), m)


# --------------------------------------------------------------------------- statistics


@dataclass
class LatencyStats:
    """One latency figure with its spread and where it came from."""

    median_ms: float
    mean_ms: float
    std_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    repeats: int
    threads: int
    device: str
    governor: str | None = None
    source: str = "measured"  # "measured" (compiled code on `device`) | "predicted" | "simulated"

    @staticmethod
    def from_samples(samples_s: Sequence[float], threads: int, device: str, governor: str | None = None,
                     source: str = "measured") -> "LatencyStats":
        if not samples_s:
            raise ValueError("no samples")
        ms = np.asarray(samples_s, dtype=np.float64) * 1e3
        return LatencyStats(
            median_ms=float(np.median(ms)), mean_ms=float(ms.mean()),
            std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            p10_ms=float(np.percentile(ms, 10)), p90_ms=float(np.percentile(ms, 90)),
            min_ms=float(ms.min()), repeats=int(len(ms)), threads=int(threads), device=device,
            governor=governor, source=source)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "LatencyStats":
        return LatencyStats(**d)

    def summary(self) -> str:
        return (f"{self.median_ms:.4f} ms median (p10 {self.p10_ms:.4f}, p90 {self.p90_ms:.4f}, "
                f"{self.repeats} repeats, {self.threads} thread(s), {self.source} on {self.device})")


def measure(fn: Callable[[], Any], cfg: MeasureConfig | None = None, *, threads: int = 1,
            device: str | None = None, clock: Callable[[], float] = time.perf_counter,
            progress: bool = False) -> LatencyStats:
    """Time ``fn()`` by the protocol: warm-up, then repeat until min repeats and min time.

    ``fn`` must be synchronous (CPU calls are). ``clock`` is injectable so tests can check the
    stopping rule without depending on wall time. Python's garbage collector is off while it
    times (as in ``timeit``): every call allocates Python objects (result tensors, arrays), and a
    collection falling into a sample times the interpreter, not the compiled code (measured: 5.75%
    of the perf samples of a 32 px int8 benchmark loop were in ``gc_collect_main``). The previous
    collector state is restored afterwards, also when ``fn`` raises.
    """
    cfg = cfg or MeasureConfig()
    for _ in range(cfg.warmup):
        fn()
    samples: list[float] = []
    total = 0.0
    bar = tqdm(desc="measure", unit="run", disable=not progress, leave=False)  # count unknown up front
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(samples) < cfg.max_repeats and (len(samples) < cfg.min_repeats or total < cfg.min_time_s):
            t0 = clock()
            fn()
            dt = clock() - t0
            samples.append(dt)
            total += dt
            bar.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
        bar.close()
    return LatencyStats.from_samples(samples, threads, device or host_device_name(), read_governor())


# --------------------------------------------------------------------------- TVM runtime threads


def set_runtime_threads(threads: int | None) -> int:
    """Make the TVM runtime of this OS thread use ``threads`` workers; return the count in use.

    None means all cores of this process's affinity set. The pool cap (``TVM_NUM_THREADS``) is
    read once, when the pool is first created; we raise it to the core count if nobody set it,
    which only helps if the pool does not exist yet, so the return value is what counts.
    """
    import tvm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = cores if threads is None else int(threads)
    if want < 1:
        raise InvalidInputError(f"threads must be >= 1, got {threads}")
    os.environ.setdefault("TVM_NUM_THREADS", str(max(cores, want)))
    tvm.get_global_func("runtime.config_threadpool")(1, want)  # 1 = kBig: all (big) cores
    return int(tvm.get_global_func("runtime.NumThreads")())


# --------------------------------------------------------------------------- per-layer profile


@dataclass
class LayerRow:
    """One kernel (or the VM builtins together), per inference."""

    name: str
    kind: str  # "kernel" (a compiled PrimFunc) | "builtin" (VM allocation/shape bookkeeping)
    calls: float  # calls per inference
    total_ms: float  # time per inference
    percent: float  # of the instrumented inference's wall time

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProfileReport:
    """End-to-end statistics plus a per-kernel table of one compiled library."""

    lib_path: str
    e2e: LatencyStats
    layers: list[LayerRow]
    instrumented_ms: float  # wall time of the instrumented inference the table comes from (its 100 %)
    layer_runs: int  # instrumented inferences run; the table is the one with the median wall time
    config: MeasureConfig
    # Cheapest instrumented call (µs): bounds the instrumentation cost inside every row's time.
    call_overhead_us: float = 0.0
    outputs: list[np.ndarray] = field(default_factory=list, repr=False)  # of the first run

    @property
    def kernel_ms(self) -> float:
        return float(sum(r.total_ms for r in self.layers if r.kind == "kernel"))

    def to_json(self) -> dict[str, Any]:
        return {"lib": self.lib_path, "e2e": self.e2e.to_json(),
                "instrumented_ms": self.instrumented_ms, "kernel_ms": self.kernel_ms,
                "layer_runs": self.layer_runs, "config": self.config.to_json(),
                "call_overhead_us": self.call_overhead_us,
                "layers": [r.to_json() for r in self.layers],
                "outputs": [{"shape": list(o.shape), "dtype": str(o.dtype)} for o in self.outputs]}

    def format_table(self, top: int | None = None) -> str:
        e = self.e2e
        lines = [f"end-to-end: {e.summary()}",
                 f"per-layer (median of {self.layer_runs} instrumented runs: {self.instrumented_ms:.4f} ms "
                 f"incl. instrumentation; each call's time includes <= {self.call_overhead_us:.1f} us of it):",
                 f"  {'kernel':<40} {'calls':>6} {'ms':>10} {'%':>6}"]
        rows = self.layers if top is None else self.layers[:top]
        for r in rows:
            lines.append(f"  {r.name[:40]:<40} {r.calls:>6.0f} {r.total_ms:>10.4f} {r.percent:>6.1f}")
        if top is not None and len(self.layers) > top:
            rest = self.layers[top:]
            lines.append(f"  {'(' + str(len(rest)) + ' more)':<40} {sum(r.calls for r in rest):>6.0f} "
                         f"{sum(r.total_ms for r in rest):>10.4f} {sum(r.percent for r in rest):>6.1f}")
        other = self.instrumented_ms - sum(r.total_ms for r in self.layers)
        lines.append(f"  {'(interpreter + instrumentation)':<40} {'':>6} {other:>10.4f} "
                     f"{100.0 * other / self.instrumented_ms if self.instrumented_ms else 0.0:>6.1f}")
        return "\n".join(lines)


class _CallTimer:
    """VM instrument callback: times every packed call, paired before/after with a stack."""

    def __init__(self) -> None:
        self.stack: list[tuple[str, float]] = []
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.min_interval = math.inf  # cheapest call seen: an upper bound of the per-call overhead

    def __call__(self, func: Any, symbol: str, before_run: bool, ret: Any, *args: Any) -> int:
        now = time.perf_counter()
        name = str(symbol)
        if before_run:
            self.stack.append((name, now))
        elif self.stack:
            start_name, t0 = self.stack.pop()
            if start_name == name:
                self.totals[name] = self.totals.get(name, 0.0) + (now - t0)
                self.calls[name] = self.calls.get(name, 0) + 1
                self.min_interval = min(self.min_interval, now - t0)
        return 0  # VMInstrumentReturnKind.kNoOp: run the call normally


def layer_rows(totals_s: dict[str, float], calls: dict[str, int], runs: int, instrumented_ms: float) -> list[LayerRow]:
    """Aggregate raw per-symbol sums into per-inference rows; VM builtins become one row."""
    rows: list[LayerRow] = []
    b_ms = b_calls = 0.0
    for name, tot in totals_s.items():
        ms = tot * 1e3 / runs
        if name.startswith(BUILTIN_PREFIX):
            b_ms += ms
            b_calls += calls[name] / runs
            continue
        rows.append(LayerRow(name, "kernel", calls[name] / runs, ms, 0.0))
    rows.sort(key=lambda r: -r.total_ms)
    if b_calls:
        rows.append(LayerRow(BUILTINS_ROW, "builtin", b_calls, b_ms, 0.0))
    for r in rows:
        r.percent = 100.0 * r.total_ms / instrumented_ms if instrumented_ms > 0 else 0.0
    return rows


def _to_tensors(inputs: Sequence[np.ndarray], device: Any) -> list[Any]:
    import tvm

    return [tvm.runtime.tensor(np.ascontiguousarray(x), device=device) for x in inputs]


def check_loadable_here(lib_path: str | Path) -> None:
    """Refuse, with a clear message, a library this host cannot dlopen."""
    p = Path(lib_path)
    if not p.is_file():
        raise InvalidInputError(f"{p}: no such library")
    arch = elf_arch(p)
    if arch is None:
        raise ArtifactError(f"{p}: not an ELF shared library")
    if arch != host_arch():
        raise ArtifactError(f"{p}: built for {arch}, cannot run on this {host_arch()} host "
                            "(time it on a board with --rpc-tracker/--rpc-key)")


def profile_library(lib_path: str | Path, inputs: Sequence[np.ndarray], threads: int | None = None,
                    cfg: MeasureConfig | None = None, per_layer: bool = True,
                    progress: bool = False) -> ProfileReport:
    """Measure an exported Relax VM library on this CPU: end-to-end stats + per-kernel table."""
    import tvm
    from tvm import relax

    cfg = cfg or MeasureConfig()
    check_loadable_here(lib_path)
    used = set_runtime_threads(threads)
    dev = tvm.cpu()
    lib = tvm.runtime.load_module(str(lib_path))
    args = _to_tensors(inputs, dev)

    vm = relax.VirtualMachine(lib, dev)
    try:
        outputs = vm_outputs(vm["main"](*args))
    except Exception as e:  # wrong input count/shape/dtype surfaces here as a TVM error
        raise InvalidInputError(f"running {Path(lib_path).name} failed: {' '.join(str(e).split())[:200]}") from None
    vm.save_function("main", "__apq_timed", *args)  # bound args: no per-call argument marshalling
    timed = vm["__apq_timed"]
    e2e = measure(timed, cfg, threads=used, progress=progress)

    rows: list[LayerRow] = []
    inst_ms = overhead_us = 0.0
    if per_layer:
        ivm = relax.VirtualMachine(lib, dev)  # separate VM: the timed one stays uninstrumented
        timer = _CallTimer()
        ivm.set_instrument(timer)
        main = ivm["main"]
        main(*args)  # warm-up: first-call allocations stay out of the table
        runs: list[tuple[float, dict[str, float], dict[str, int]]] = []
        for _ in tqdm(range(cfg.layer_runs), desc="per-layer", disable=not progress, leave=False):
            timer.totals, timer.calls = {}, {}
            t0 = time.perf_counter()
            main(*args)
            runs.append((time.perf_counter() - t0, timer.totals, timer.calls))
        # The run with the median wall time, not a mean over runs: a run hit by preemption on a
        # shared machine inflates a mean, and one real run keeps rows summing to its wall time.
        wall, totals, calls = sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]
        inst_ms = wall * 1e3
        rows = layer_rows(totals, calls, 1, inst_ms)
        overhead_us = timer.min_interval * 1e6 if math.isfinite(timer.min_interval) else 0.0
    return ProfileReport(str(lib_path), e2e, rows, inst_ms, cfg.layer_runs if per_layer else 0, cfg,
                         overhead_us, outputs)

