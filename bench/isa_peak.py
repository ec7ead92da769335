#!/usr/bin/env python3
"""Instruction-level ceilings: how much faster can AND+popcount bit-serial ever be than VNNI int8 here?

    python bench/isa_peak.py [--json] [--seconds 0.5]

Why this exists: issue #3 asks bit-serial W2A2 to be >= 3x and W1A1 >= 6x faster than apq's best
int8 kernel, which on this host is AVX-512 VNNI (``vpdpbusd``: 64 u8 x s8 MACs per instruction).
A bit-serial kernel computes a ``wb x ab``-bit dot product as ``wb * ab`` binary dot products, each
an AND plus a popcount plus an add over 512 one-bit lanes. Whether the goals are reachable is a
property of the CPU's instruction throughput, so this script *measures* both inner loops on the
same core, in one run:

- ``vnni``: 12 independent ``vpdpbusd zmm`` accumulator chains on register operands;
- ``and_popcnt`` (zmm, and a ymm variant): 12 independent ``vpandq`` + ``vpopcntq`` + ``vpaddq`` chains on register bit
  planes (the minimal bit-serial step: 512 binary MACs);
- ``fma``: 12 independent ``vfmadd231ps zmm`` chains (16 float32 MACs each), the float kernels' ceiling
  (bench/kernels.py reports every kernel's GOPS as a fraction of its family's ceiling from here).
Both loops are inline assembly with operands in registers, so neither is limited by loads or by
compiler artefacts: these are the arithmetic ceilings of the core.

Both are compiled with gcc from the C/inline assembly below. They are measuring instruments (like a
STREAM run), not kernels apq ships: apq's kernels are TVM TensorIR (kernels/). The ceilings are
``binary_macs_per_s / (wb * ab) / int8_macs_per_s``: a real kernel also pays loads of the weight
planes, bit-packing of activations and the requantize epilogue, so it can only be slower.
Reported figures are measurements of this machine (``source: measured``), nothing is assumed.

Where the CPU has AMX (``amx_int8``: Sapphire Rapids and later), a third loop times ``tdpbusd``
(one 16x16 int32 tile += 16x64 u8 . 64x16 s8 per instruction, four independent accumulator
tiles) after asking the kernel for tile-data permission (``arch_prctl(ARCH_REQ_XCOMP_PERM)``).
apq's kernels do not use AMX: the record says how far above VNNI the int8 ceiling of this core
really is (``amx_int8_gops``, ``amx_vs_vnni``), so the bit-serial ceilings are read against the
right int8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

C_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 12
#define BUF 16
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

/* CHAINS independent chains of one instruction ``op src, %zmm14, %zmm<i>`` (sources alternating
   zmm12/zmm13, accumulators zmm0-zmm11): the timed loop of the one-instruction ceilings. */
#define ONE_OP_CHAINS(op) \
  op " %%zmm12, %%zmm14, %%zmm0\n\t" op " %%zmm13, %%zmm14, %%zmm1\n\t" \
  op " %%zmm12, %%zmm14, %%zmm2\n\t" op " %%zmm13, %%zmm14, %%zmm3\n\t" \
  op " %%zmm12, %%zmm14, %%zmm4\n\t" op " %%zmm13, %%zmm14, %%zmm5\n\t" \
  op " %%zmm12, %%zmm14, %%zmm6\n\t" op " %%zmm13, %%zmm14, %%zmm7\n\t" \
  op " %%zmm12, %%zmm14, %%zmm8\n\t" op " %%zmm13, %%zmm14, %%zmm9\n\t" \
  op " %%zmm12, %%zmm14, %%zmm10\n\t" op " %%zmm13, %%zmm14, %%zmm11\n\t"

/* The inner loops are written in assembly on purpose: with intrinsics gcc adds register moves
   around the destructive vpdpbusd and may hoist loop-invariant work, and the point here is to time
   exactly N independent instruction chains with operands in registers (no loads). */
__attribute__((noinline)) static void run_vnni(const __m512i *a, const __m512i *b, long iters) {
  __asm__ volatile("vmovdqa64 (%0), %%zmm12\n\tvmovdqa64 64(%0), %%zmm13\n\tvmovdqa64 (%1), %%zmm14\n\t"
                   :: "r"(a), "r"(b) : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14");
  for (long i = 0; i < iters; ++i)
    __asm__ volatile(
      ONE_OP_CHAINS("vpdpbusd")
      ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14");
}

__attribute__((noinline)) static void run_popcnt(const __m512i *a, const __m512i *b, long iters) {
  __asm__ volatile("vmovdqa64 (%0), %%zmm12\n\tvmovdqa64 64(%0), %%zmm13\n\tvmovdqa64 (%1), %%zmm14\n\t"
                   :: "r"(a), "r"(b) : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14");
  for (long i = 0; i < iters; ++i)
    __asm__ volatile(
      "vpandq %%zmm12, %%zmm14, %%zmm15\n\t"
      "vpopcntq %%zmm15, %%zmm15\n\t"
      "vpaddq %%zmm15, %%zmm0, %%zmm0\n\t"
      "vpandq %%zmm13, %%zmm14, %%zmm16\n\t"
      "vpopcntq %%zmm16, %%zmm16\n\t"
      "vpaddq %%zmm16, %%zmm1, %%zmm1\n\t"
      "vpandq %%zmm12, %%zmm14, %%zmm17\n\t"
      "vpopcntq %%zmm17, %%zmm17\n\t"
      "vpaddq %%zmm17, %%zmm2, %%zmm2\n\t"
      "vpandq %%zmm13, %%zmm14, %%zmm18\n\t"
      "vpopcntq %%zmm18, %%zmm18\n\t"
      "vpaddq %%zmm18, %%zmm3, %%zmm3\n\t"
      "vpandq %%zmm12, %%zmm14, %%zmm19\n\t"
      "vpopcntq %%zmm19, %%zmm19\n\t"
      "vpaddq %%zmm19, %%zmm4, %%zmm4\n\t"
      "vpandq %%zmm13, %%zmm14, %%zmm20\n\t"
      "vpopcntq %%zmm20, %%zmm20\n\t"
      "vpaddq %%zmm20, %%zmm5, %%zmm5\n\t"
      "vpandq %%zmm12, %%zmm14, %%zmm21\n\t"
      "vpopcntq %%zmm21, %%zmm21\n\t"
      "vpaddq %%zmm21, %%zmm6, %%zmm6\n\t"
      "vpandq %%zmm13, %%zmm14, %%zmm22\n\t"
      "vpopcntq %%zmm22, %%zmm22\n\t"
      "vpaddq %%zmm22, %%zmm7, %%zmm7\n\t"
      "vpandq %%zmm12, %%zmm14, %%zmm23\n\t"
      "vpopcntq %%zmm23, %%zmm23\n\t"
      "vpaddq %%zmm23, %%zmm8, %%zmm8\n\t"
      "vpandq %%zmm13, %%zmm14, %%zmm24\n\t"
      "vpopcntq %%zmm24, %%zmm24\n\t"
      "vpaddq %%zmm24, %%zmm9, %%zmm9\n\t"
      "vpandq %%zmm12, %%zmm14, %%zmm25\n\t"
      "vpopcntq %%zmm25, %%zmm25\n\t"
      "vpaddq %%zmm25, %%zmm10, %%zmm10\n\t"
      "vpandq %%zmm13, %%zmm14, %%zmm26\n\t"
      "vpopcntq %%zmm26, %%zmm26\n\t"
      "vpaddq %%zmm26, %%zmm11, %%zmm11\n\t"
      ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26");
}

/* float32: 12 independent vfmadd231ps zmm chains (16 MACs each), the float kernels' ceiling. */
__attribute__((noinline)) static void run_fma(const __m512i *a, const __m512i *b, long iters) {
  __asm__ volatile("vmovaps (%0), %%zmm12\n\tvmovaps 64(%0), %%zmm13\n\tvmovaps (%1), %%zmm14\n\t"
                   :: "r"(a), "r"(b) : "xmm12", "xmm13", "xmm14");
  for (long i = 0; i < iters; ++i)
    __asm__ volatile(
      ONE_OP_CHAINS("vfmadd231ps")
      ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14");
}

/* The same step on 256-bit registers: on cores whose 512-bit integer units are fewer than their
   256-bit ones, this can be the faster bit-serial step (256 binary MACs per group). */
__attribute__((noinline)) static void run_popcnt256(const __m512i *a, const __m512i *b, long iters) {
  __asm__ volatile("vmovdqa64 (%0), %%zmm12\n\tvmovdqa64 64(%0), %%zmm13\n\tvmovdqa64 (%1), %%zmm14\n\t"
                   :: "r"(a), "r"(b) : "xmm12", "xmm13", "xmm14");
  for (long i = 0; i < iters; ++i)
    __asm__ volatile(
      "vpandq %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpopcntq %%ymm15, %%ymm15\n\t"
      "vpaddq %%ymm15, %%ymm0, %%ymm0\n\t"
      "vpandq %%ymm13, %%ymm14, %%ymm16\n\t"
      "vpopcntq %%ymm16, %%ymm16\n\t"
      "vpaddq %%ymm16, %%ymm1, %%ymm1\n\t"
      "vpandq %%ymm12, %%ymm14, %%ymm17\n\t"
      "vpopcntq %%ymm17, %%ymm17\n\t"
      "vpaddq %%ymm17, %%ymm2, %%ymm2\n\t"
      "vpandq %%ymm13, %%ymm14, %%ymm18\n\t"
      "vpopcntq %%ymm18, %%ymm18\n\t"
      "vpaddq %%ymm18, %%ymm3, %%ymm3\n\t"
      "vpandq %%ymm12, %%ymm14, %%ymm19\n\t"
      "vpopcntq %%ymm19, %%ymm19\n\t"
      "vpaddq %%ymm19, %%ymm4, %%ymm4\n\t"
      "vpandq %%ymm13, %%ymm14, %%ymm20\n\t"
      "vpopcntq %%ymm20, %%ymm20\n\t"
      "vpaddq %%ymm20, %%ymm5, %%ymm5\n\t"
      "vpandq %%ymm12, %%ymm14, %%ymm21\n\t"
      "vpopcntq %%ymm21, %%ymm21\n\t"
      "vpaddq %%ymm21, %%ymm6, %%ymm6\n\t"
      "vpandq %%ymm13, %%ymm14, %%ymm22\n\t"
      "vpopcntq %%ymm22, %%ymm22\n\t"
      "vpaddq %%ymm22, %%ymm7, %%ymm7\n\t"
      "vpandq %%ymm12, %%ymm14, %%ymm23\n\t"
      "vpopcntq %%ymm23, %%ymm23\n\t"
      "vpaddq %%ymm23, %%ymm8, %%ymm8\n\t"
      "vpandq %%ymm13, %%ymm14, %%ymm24\n\t"
      "vpopcntq %%ymm24, %%ymm24\n\t"
      "vpaddq %%ymm24, %%ymm9, %%ymm9\n\t"
      "vpandq %%ymm12, %%ymm14, %%ymm25\n\t"
      "vpopcntq %%ymm25, %%ymm25\n\t"
      "vpaddq %%ymm25, %%ymm10, %%ymm10\n\t"
      "vpandq %%ymm13, %%ymm14, %%ymm26\n\t"
      "vpopcntq %%ymm26, %%ymm26\n\t"
      "vpaddq %%ymm26, %%ymm11, %%ymm11\n\t"
      ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26");
}

static double timed(int which, const __m512i *a, const __m512i *b, double seconds, long *iters_out) {
  long iters = 1 << 16;
  for (;;) {
    double t0 = now();
    if (which == 3) run_fma(a, b, iters);
    else if (which == 2) run_popcnt256(a, b, iters); else if (which) run_popcnt(a, b, iters); else run_vnni(a, b, iters);
    double dt = now() - t0;
    if (dt >= seconds) { *iters_out = iters; return dt; }
    iters *= 2;
  }
}

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 0.5;
  __m512i *a = aligned_alloc(64, 2 * BUF * 64), *b = aligned_alloc(64, BUF * 64);
  for (int i = 0; i < 2 * BUF * 64; ++i) ((uint8_t *)a)[i] = (uint8_t)(i * 37 + 11);
  for (int i = 0; i < BUF * 64; ++i) ((uint8_t *)b)[i] = (uint8_t)(i * 91 + 5);
  long it_v, it_p, it_y, it_f;
  double best_v = 1e30, best_p = 1e30, best_y = 1e30, best_f = 1e30;
  for (int rep = 0; rep < 5; ++rep) {  /* interleaved, best of 5: ratios from one run */
    double tv = timed(0, a, b, seconds / 5, &it_v) / it_v;
    double tp = timed(1, a, b, seconds / 5, &it_p) / it_p;
    double ty = timed(2, a, b, seconds / 5, &it_y) / it_y;
    double tf = timed(3, a, b, seconds / 5, &it_f) / it_f;
    if (tv < best_v) best_v = tv;
    if (tp < best_p) best_p = tp;
    if (ty < best_y) best_y = ty;
    if (tf < best_f) best_f = tf;
  }
  printf("{\"vnni_int8_macs_per_s\": %.6e, \"and_popcnt512_binary_macs_per_s\": %.6e, "
         "\"and_popcnt256_binary_macs_per_s\": %.6e, \"fma_f32_macs_per_s\": %.6e}\n",
         CHAINS * 64.0 / best_v, CHAINS * 512.0 / best_p, CHAINS * 256.0 / best_y, CHAINS * 16.0 / best_f);
  return 0;
}
"""


AMX_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 0.5;
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) return 3;  /* no permission */
  tile_config cfg; memset(&cfg, 0, sizeof cfg); cfg.palette = 1;
  for (int t = 0; t < 6; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
  static uint8_t a[16 * 64]; static int8_t b[16 * 64];
  for (int i = 0; i < 16 * 64; ++i) { a[i] = (uint8_t)(i * 37 + 11); b[i] = (int8_t)(i * 91 + 5); }
  _tile_loadd(4, a, 64); _tile_loadd(5, b, 64);
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    long iters = 1 << 12;
    for (;;) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      double t0 = now();
      for (long i = 0; i < iters; ++i) {  /* four independent accumulator tiles */
        _tile_dpbusd(0, 4, 5); _tile_dpbusd(1, 4, 5); _tile_dpbusd(2, 4, 5); _tile_dpbusd(3, 4, 5);
      }
      double dt = now() - t0;
      if (dt >= seconds / 5) { if (dt / iters < best) best = dt / iters; break; }
      iters *= 2;
    }
  }
  int32_t c[16 * 16]; _tile_stored(0, c, 64); _tile_release();
  printf("{\"amx_int8_macs_per_s\": %.6e, \"check\": %d}\n", 4 * 16.0 * 16 * 64 / best, c[0]);
  return 0;
}
"""


#: /proc/cpuinfo flags the loops of C_SOURCE need (AMX_SOURCE is optional, see measure_amx).
REQUIRED_FLAGS = frozenset({"avx512f", "avx512_vnni", "avx512_vpopcntdq"})


class MeasureError(RuntimeError):
    """Why nothing could be measured (printed as one line, exit 2)."""


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(seconds: float) -> dict[str, float]:
    """Compile the two loops with gcc and run them pinned to one thread; returns MAC rates."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise MeasureError("no C compiler (gcc) found")
    with tempfile.TemporaryDirectory(prefix="apq-isa-") as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(C_SOURCE)
        built = subprocess.run([cc, "-O2", "-mavx512f", "-mavx512vnni", "-mavx512vpopcntdq", "-mavx512vl", str(src),
                                "-o", str(exe)], capture_output=True, text=True)
        if built.returncode != 0:
            raise MeasureError(f"{cc} could not build the AVX-512 loops: {built.stderr.strip().splitlines()[-1:]}")
        ran = subprocess.run([str(exe), str(seconds)], capture_output=True, text=True)
        if ran.returncode != 0:
            raise MeasureError(f"the measuring program failed with exit code {ran.returncode}")
        out = ran.stdout
    return json.loads(out)


def measure_amx(seconds: float) -> float | None:
    """AMX ``tdpbusd`` int8 MACs per second on one core, or None where the CPU, the compiler or
    the kernel (tile-data permission) does not allow AMX."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or "amx_int8" not in cpu_flags():
        return None
    with tempfile.TemporaryDirectory(prefix="apq-isa-") as tmp:
        src, exe = Path(tmp) / "amx.c", Path(tmp) / "amx"
        src.write_text(AMX_SOURCE)
        if subprocess.run([cc, "-O2", "-mamx-tile", "-mamx-int8", str(src), "-o", str(exe)],
                          capture_output=True, text=True).returncode != 0:
            return None
        ran = subprocess.run([str(exe), str(seconds)], capture_output=True, text=True)
        if ran.returncode != 0:
            return None
        return float(json.loads(ran.stdout)["amx_int8_macs_per_s"])


def ceilings(rates: dict[str, float]) -> list[dict[str, float | int | str]]:
    """Best possible speedup of AND+popcount bit-serial over VNNI int8 for each bit pair."""
    int8 = rates["vnni_int8_macs_per_s"]
    binary = max(rates["and_popcnt512_binary_macs_per_s"], rates["and_popcnt256_binary_macs_per_s"])
    rows = []
    for wb, ab in [(1, 1), (1, 2), (2, 2), (2, 4), (4, 4)]:
        rows.append({"w_bits": wb, "a_bits": ab, "planes": wb * ab,
                     "ceiling_speedup_vs_vnni_int8": round(binary / (wb * ab) / int8, 3), "source": "measured"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="timing budget per loop (split over 5 rounds)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    missing = sorted(REQUIRED_FLAGS - cpu_flags())
    if missing:
        print(f"isa_peak: this CPU lacks {missing}; nothing to measure", file=sys.stderr)
        return 2
    try:
        rates = measure(args.seconds)
    except MeasureError as err:
        print(f"isa_peak: {err}", file=sys.stderr)
        return 2
    record = {
        "cpu": cpu_model(), "threads": 1, "source": "measured",
        "vnni_int8_gops": round(2 * rates["vnni_int8_macs_per_s"] / 1e9, 1),
        "and_popcnt512_binary_gops": round(2 * rates["and_popcnt512_binary_macs_per_s"] / 1e9, 1),
        "and_popcnt256_binary_gops": round(2 * rates["and_popcnt256_binary_macs_per_s"] / 1e9, 1),
        "fma_f32_gflops": round(2 * rates["fma_f32_macs_per_s"] / 1e9, 1),
        "ceilings": ceilings(rates),
    }
    amx = measure_amx(args.seconds)
    if amx is not None:
        record["amx_int8_gops"] = round(2 * amx / 1e9, 1)
        record["amx_vs_vnni"] = round(amx / rates["vnni_int8_macs_per_s"], 2)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{record['cpu']}: VNNI int8 {record['vnni_int8_gops']} GOPS, AND+popcount "
              f"{record['and_popcnt512_binary_gops']} (zmm) / {record['and_popcnt256_binary_gops']} (ymm) binary GOPS, "
              f"FMA float32 {record['fma_f32_gflops']} GFLOPS (1 thread)")
        for r in record["ceilings"]:
            print(f"  W{r['w_bits']}A{r['a_bits']}: at most {r['ceiling_speedup_vs_vnni_int8']}x VNNI int8")
        if "amx_int8_gops" in record:
            print(f"  AMX int8 (tdpbusd, not used by apq's kernels): {record['amx_int8_gops']} GOPS, "
                  f"{record['amx_vs_vnni']}x VNNI")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
