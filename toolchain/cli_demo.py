"""`apq demo` command (registered into the CLI on import)."""

from __future__ import annotations

import argparse

from apq.toolchain.cli import _print_json, _print_layers, command


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="apq-demo", help="output directory (rerun to resume)")
    p.add_argument("--arm-target", default="raspberry-pi/4b-aarch64")
    p.add_argument("--skip-arm", action="store_true", help="host only (no cross compile / qemu)")
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--json", action="store_true")


@command("demo", "the main job on the default data: model -> compile (host + ARM) -> verify -> profile", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    from apq.toolchain.demo import DemoConfig, run_demo

    rep = run_demo(DemoConfig(args.out, args.arm_target, args.skip_arm, args.min_time), progress=not args.json)
    if args.json:
        _print_json({k: v for k, v in rep.items() if k != "profile_host_text"})
    else:
        print(f"model: {rep['model']['onnx']} ({rep['model']['description']})")
        for t, c in rep["compile"].items():
            v = rep["verify"].get(t, {})
            status = v.get("skipped") or ("PASS" if v.get("passed") else "FAIL")
            err = f", max abs err {v['max_abs_err']:.3g}" if "max_abs_err" in v else ""
            where = f" on {v['executed_on']}" if "executed_on" in v else ""
            print(f"{t}: {c['artifact']} compiled in {c['compile_s']:.1f} s; verify{where}: {status}{err}")
        _print_layers(rep["layers"])
        print(rep["profile_host_text"])
        print(f"plot: {rep['plot']}")
        print(f"report: {args.out}/report.json")
    ok = all(v.get("passed", "skipped" in v) for v in rep["verify"].values())
    return 0 if ok else 1
