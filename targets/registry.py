"""Target registry: one entry per deployable target.

A target couples a TVM JSON target (TVM 0.27 rejects ``"llvm -mcpu=..."`` strings) with
how apq builds for it (native or cross compiler) and how it can be executed:

- ``local``: run in-process on this machine (the host CPU);
- ``qemu``: cross-compiled for AArch64 and run here under qemu-aarch64 for correctness
  only (never timed; timing needs a real board over TVM RPC);
- ``simulator``: an analytic model (the BitFusion accelerator) that gives simulated
  latency/energy; its TVM kernels are compiled for and run on the host CPU.

Adding a board is one :func:`register_target` call. ARM entries reuse TVM's own tag names
(``raspberry-pi/4b-aarch64``) so a name means the same thing in TVM and in apq.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
from dataclasses import dataclass
from typing import Any, Callable

from apq.toolchain.errors import UnknownTargetError


@dataclass(frozen=True)
class TargetSpec:
    """Everything apq needs to know about one target."""

    name: str
    description: str
    arch: str  # "x86_64" or "aarch64"
    tvm_target: dict[str, Any]
    executor: str  # "local" | "qemu" | "simulator"
    cross_compiler: str | None = None  # e.g. "aarch64-linux-gnu-g++"; None = native
    features: tuple[str, ...] = ()
    bits: tuple[int, ...] = (4, 8)  # bit-widths the search may choose on this target
    num_cores: int = 1
    #: L2 bytes one worker thread can keep on chip: a private L2, or a shared L2 divided by the
    #: cores sharing it. None = unknown (the schedules keep the defaults measured on the 2 MiB-L2
    #: development host). It sets when merging a MobileNet block into one kernel pays
    #: (kernels/fuse_dw_pw.py, :meth:`apq.kernels.cpu_schedules.CpuScheduleConfig.with_l2_cache`).
    l2_cache_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features"] = list(self.features)
        d["bits"] = list(self.bits)
        return d

    def tvm(self):  # -> tvm.target.Target
        """The TVM Target object (imported lazily: `apq targets` should not need TVM)."""
        import tvm

        return tvm.target.Target(self.tvm_target)

    @property
    def is_cross(self) -> bool:
        return self.cross_compiler is not None


_REGISTRY: dict[str, Callable[[], TargetSpec]] = {}


def register_target(name: str) -> Callable[[Callable[[], TargetSpec]], Callable[[], TargetSpec]]:
    """Register a factory for a target; factories run lazily (host detection reads /proc)."""

    def deco(factory: Callable[[], TargetSpec]) -> Callable[[], TargetSpec]:
        if name in _REGISTRY:
            raise ValueError(f"target {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def target_names() -> list[str]:
    return sorted(_REGISTRY)


def get_target(name: str) -> TargetSpec:
    """Look a target up by name; unknown names raise UnknownTargetError listing valid ones."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownTargetError(
            f"unknown target {name!r}; valid targets: {', '.join(target_names())}"
        ) from None
    return _cached(name, factory)


@functools.lru_cache(maxsize=None)
def _cached(name: str, factory: Callable[[], TargetSpec]) -> TargetSpec:
    return factory()


def list_targets() -> list[TargetSpec]:
    return [get_target(n) for n in target_names()]


# --------------------------------------------------------------------------- host detection


def read_cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str]:
    """CPU feature flags of this machine (x86 'flags' or ARM 'Features' line)."""
    try:
        with open(cpuinfo_path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def read_cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo_path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# Flags apq's kernels care about, in the order they are reported.
_X86_FEATURES = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512vnni",
    "avx_vnni": "avxvnni",
    "avx512_vpopcntdq": "avx512vpopcntdq",
    "avx512_bitalg": "avx512bitalg",  # 16-bit vector popcount: narrow bit-serial words (kernels/bitserial.py)
    "popcnt": "popcnt",
}


def detect_host_features(flags: set[str] | None = None) -> tuple[str, ...]:
    flags = read_cpu_flags() if flags is None else flags
    return tuple(name for flag, name in _X86_FEATURES.items() if flag in flags)


def _llvm_host_cpu() -> str:
    """LLVM's name for this CPU (e.g. 'znver4'); falls back to a feature-based guess."""
    try:
        from tvm.target import codegen

        cpu = codegen.llvm_get_system_cpu()
        if cpu and cpu != "generic":
            return str(cpu)
    except Exception:  # TVM missing or built without LLVM: degrade to a safe generic CPU
        pass
    feats = detect_host_features()
    if "avx512f" in feats:
        return "skylake-avx512"
    if "avx2" in feats:
        return "haswell"
    return "x86-64"


def _cpu_list_len(text: str) -> int:
    """Number of CPUs in a sysfs CPU list such as ``0-3,8``."""
    count = 0
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
    return count


def read_l2_per_core(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """This machine's L2 bytes per core (sysfs ``index*/``: level 2, size ``2048K``, divided by
    the CPUs in ``shared_cpu_list``); None when sysfs does not say."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        for entry in sorted(os.listdir(cache_dir)):
            d = os.path.join(cache_dir, entry)
            if not entry.startswith("index"):
                continue
            with open(os.path.join(d, "level"), encoding="utf-8") as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(d, "size"), encoding="utf-8") as f:
                size = f.read().strip()
            with open(os.path.join(d, "shared_cpu_list"), encoding="utf-8") as f:
                sharing = max(1, _cpu_list_len(f.read()))
            value = int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)
            return value // sharing
    except (OSError, ValueError):
        return None
    return None


def host_num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@register_target("host")
def _host() -> TargetSpec:
    machine = platform.machine()
    cores = host_num_cores()
    if machine in ("aarch64", "arm64"):
        flags = read_cpu_flags()
        feats = tuple(f for f in ("asimd", "asimddp", "i8mm") if f in flags)
        mattr = ["+neon"] + (["+dotprod"] if "asimddp" in flags else [])
        tvm_target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr, "num-cores": cores}
        return TargetSpec("host", f"this machine: {read_cpu_model()}", "aarch64", tvm_target, "local",
                          features=feats, bits=(2, 4, 8), num_cores=cores, l2_cache_bytes=read_l2_per_core())
    feats = detect_host_features()
    bits = (2, 4, 8) if "popcnt" in feats else (4, 8)
    tvm_target = {"kind": "llvm", "mcpu": _llvm_host_cpu(), "num-cores": cores}
    return TargetSpec("host", f"this machine: {read_cpu_model()}", "x86_64", tvm_target, "local",
                      features=feats, bits=bits, num_cores=cores, l2_cache_bytes=read_l2_per_core())


# --------------------------------------------------------------------------- ARM boards

_AARCH64_GXX = "aarch64-linux-gnu-g++"


def _arm(name: str, description: str, mcpu: str | None, mattr: list[str], cores: int,
         l2_cache_bytes: int | None = None) -> TargetSpec:
    tvm_target: dict[str, Any] = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr,
                                  "num-cores": cores}
    if mcpu:
        tvm_target["mcpu"] = mcpu
    feats = tuple(a.lstrip("+") for a in mattr)
    return TargetSpec(name, description, "aarch64", tvm_target, "qemu", cross_compiler=_AARCH64_GXX,
                      features=feats, bits=(2, 4, 8), num_cores=cores, l2_cache_bytes=l2_cache_bytes)


# L2 per core from the SoC datasheets (not measured: no board here): BCM2711 (Pi 4) has 1 MiB of L2
# shared by its 4 Cortex-A72s, BCM2712 (Pi 5) 512 KiB private per Cortex-A76 (plus a 2 MiB L3),
# BCM2837 (Pi 3) 512 KiB shared by 4 Cortex-A53s. A generic board: unknown.
register_target("aarch64")(lambda: _arm("aarch64", "generic ARMv8-A Linux board with NEON", None, ["+neon"], 4))
register_target("raspberry-pi/4b-aarch64")(
    lambda: _arm("raspberry-pi/4b-aarch64", "Raspberry Pi 4 Model B (Cortex-A72, 4 cores)", "cortex-a72",
                 ["+neon"], 4, l2_cache_bytes=(1 << 20) // 4))
register_target("raspberry-pi/5")(
    lambda: _arm("raspberry-pi/5", "Raspberry Pi 5 (Cortex-A76, 4 cores, dot product)", "cortex-a76",
                 ["+neon", "+dotprod"], 4, l2_cache_bytes=512 << 10))
register_target("raspberry-pi/3b-aarch64")(
    lambda: _arm("raspberry-pi/3b-aarch64", "Raspberry Pi 3 Model B (Cortex-A53, 4 cores)", "cortex-a53",
                 ["+neon"], 4, l2_cache_bytes=(512 << 10) // 4))


# --------------------------------------------------------------------------- simulated accelerator


@register_target("bitfusion")
def _bitfusion() -> TargetSpec:
    host = get_target("host")
    return TargetSpec(
        "bitfusion",
        "BitFusion bit-serial accelerator (analytic latency/energy model; kernels run bit-serial on the host CPU)",
        host.arch, dict(host.tvm_target), "simulator", features=("bit-serial", "simulated"),
        bits=(1, 2, 4, 8), num_cores=host.num_cores, l2_cache_bytes=host.l2_cache_bytes)


def targets_table_json() -> str:
    return json.dumps([t.to_json() for t in list_targets()], indent=2)
