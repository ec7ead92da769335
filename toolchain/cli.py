"""The `apq` and `apq-compile` command lines: argument parsing and printing only.

All work happens in importable functions; this module maps user mistakes (ApqError) to one
line on stderr and exit code 2, and Ctrl-C to exit code 130, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, NoReturn

from apq.toolchain.errors import ApqError, InvalidInputError

Handler = Callable[[argparse.Namespace], int]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``) and exit status 2.

    Why: every other bad input gets one line (the project's rule); argparse's default prints
    the whole usage block first. ``-h`` still prints it. Sub-command parsers inherit the class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: its arguments and its handler."""

    def deco(fn: Handler) -> Handler:
        _COMMANDS[name] = (help_text, add_args, fn)
        return fn

    return deco


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    from apq.toolchain.onnx_import import parse_input_shape

    return dict(parse_input_shape(v) for v in values or [])


# --------------------------------------------------------------------------- compile


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model (float or QDQ-quantized)")
    p.add_argument("--target", "-t", default="host", help="target name (see `apq targets`)")
    p.add_argument("-o", "--output", help="artifact path (default: MODEL.apq)")
    p.add_argument("--input-shape", action="append", metavar="NAME:1x3x32x32",
                   help="static shape for an input with dynamic dims (repeatable)")
    p.add_argument("--verify", action="store_true", help="run the artifact and compare with onnxruntime")
    p.add_argument("--inputs", help="inputs .npz for --verify (default: seeded random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lower-qdq", action="store_true",
                   help="keep TVM's fake-quant float execution of QDQ models (for comparison)")
    p.add_argument("--bitserial", choices=["auto", "on", "off", "measured"], default="auto",
                   help="run <=4-bit layers on bit-serial kernels (auto: on for bitfusion, off on CPUs; "
                        "measured: per pointwise / depthwise layer the faster of its bit-serial and int8 kernels, "
                        "both timed here (host target) or on a board (--rpc-tracker, --rpc-key); timings cached "
                        "per target under $APQ_CACHE_DIR/kernel_choice)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="with --bitserial measured: time the kernels on a board behind this TVM RPC tracker "
                        "(with --rpc-key) instead of on this machine")
    p.add_argument("--rpc-key", metavar="KEY", help="the board's key at --rpc-tracker")
    p.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="MetaSchedule-tune the kernels with N trials (cached per target under "
                        "$APQ_CACHE_DIR/tuning; a recompile reuses the records); 0: apq's schedules only. "
                        "A tuned kernel replaces apq's schedule only when timed >= 3%% faster side by side "
                        "(at 32 trials that is rare)")
    p.add_argument("--knob-tune", action="store_true",
                   help="tune apq's schedule knobs per kernel (seconds per kernel, timed here: host target "
                        "only; choices cached per target under $APQ_CACHE_DIR/knobs, a recompile times nothing)")
    p.add_argument("--no-fuse-blocks", action="store_true",
                   help="build every conv as its own kernel instead of merging large depthwise blocks "
                        "(expand -> depthwise -> project) into one (for comparison)")
    p.add_argument("--float-layout", choices=["NHWC", "NCHW"], default="NHWC",
                   help="activation layout of float convs on CPU targets (NHWC: apq's channel-vector schedules; "
                        "NCHW: the ONNX layout). Integer graphs: --int8-layout")
    p.add_argument("--int8-layout", choices=["NHWC", "NCHW"], default="NHWC",
                   help="activation layout of lowered int8 graphs on AVX-512 VNNI CPUs (NHWC: channels in the "
                        "lanes, pointwise weights packed at compile time; NCHW: the pixel-lane VNNI kernels). "
                        "Other targets keep int8 in NCHW")
    p.add_argument("--json", action="store_true", help="print a JSON report")


@command("compile", "compile an ONNX model into a .apq artifact for a target", _compile_args)
def cmd_compile(args: argparse.Namespace) -> int:
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import CompileOptions, compile_onnx
    from apq.toolchain.verify import verify_artifact

    from apq.toolchain.bitserial_lowering import BitserialPolicy

    policy = {"auto": None, "on": BitserialPolicy(), "off": BitserialPolicy.disabled(),
              "measured": BitserialPolicy(select="measured")}[args.bitserial]
    options = CompileOptions(target=args.target, lower_qdq=not args.no_lower_qdq, bitserial=policy,
                             tune_trials=args.tune_trials, knob_tune=args.knob_tune, float_layout=args.float_layout,
                             int8_layout=args.int8_layout, fuse_blocks=not args.no_fuse_blocks,
                             rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key)
    if (args.rpc_tracker or args.rpc_key) and args.bitserial != "measured":
        raise InvalidInputError("--rpc-tracker / --rpc-key time kernels for --bitserial measured; "
                                "to time a compiled artifact on a board use `apq profile`")
    res = compile_onnx(args.model, args.target, args.output, _shapes(args.input_shape), options,
                       progress=not args.json)
    report: dict[str, Any] = res.to_json()
    if "tuning" in res.manifest["compile"]:
        report["tuning"] = res.manifest["compile"]["tuning"]
    if "knob_tuning" in res.manifest["compile"]:
        report["knob_tuning"] = {k: v for k, v in res.manifest["compile"]["knob_tuning"].items() if k != "choices"}
    if "kernel_choice" in res.manifest["compile"]:
        report["kernel_choice"] = res.manifest["compile"]["kernel_choice"]
    rc = 0
    if args.verify:
        art = open_artifact(res.artifact_path, expect_target=args.target)
        ver = verify_artifact(art, args.model, args.inputs, args.seed)
        report["verify"] = ver.to_json()
        rc = 0 if ver.passed else 1
    if args.json:
        _print_json(report)
    else:
        print(f"wrote {res.artifact_path} ({res.manifest['target']}, {len(res.manifest['layers'])} layers, "
              f"compiled in {res.compile_s:.1f} s)")
        _print_layers(res.manifest["layers"])
        if "knob_tuning" in report:
            k = report["knob_tuning"]
            print(f"knob-tune: {k['kernels']} kernels, {k['timed']} timed, {k['cached']} cached, {k['changed']} "
                  f"changed, {k['seconds']:.1f} s ({k['cache_file']})")
        if "kernel_choice" in report:
            _print_kernel_choice(report["kernel_choice"])
        if args.verify:
            v = report["verify"]
            status = "PASS" if v["passed"] else "FAIL"
            for o in v["outputs"]:
                print(f"verify [{v['executed_on']}] {o['name']}: max abs err {o['max_abs_err']:.3g} "
                      f"(tolerance {o['tolerance']:.3g}: {o['tolerance_rule']})")
            print(f"verify: {status}")
    return rc


def _print_kernel_choice(choices: list[dict]) -> None:
    """One line per measured layer and a count (apq compile --bitserial measured)."""
    fmt = lambda ms: "n/a" if ms is None else f"{ms * 1e3:.1f} us"  # noqa: E731
    for c in choices:
        name = c["layer"] or f"#{c['index']}"
        where = "" if c.get("device", "local") == "local" else f" on {c['device']}"
        print(f"  kernel choice: {name} ({c['op']}) a{c['a_bits']}w{c['w_bits']}: bit-serial "
              f"{fmt(c.get('bitserial_ms'))}, int8 {fmt(c.get('int8_ms'))} -> {c['kernel']} (measured{where})")
    n_bs = sum(c["kernel"] == "bitserial" for c in choices)
    print(f"kernel choice: {n_bs} of {len(choices)} measured low-bit layers run bit-serial, the rest int8")


def _print_layers(layers: list[dict]) -> None:
    if not layers:
        return
    from collections import Counter

    # impl: the instruction path read from the scheduled TIR (toolchain/kernel_impl.py); absent in
    # manifests written before it existed
    counts = Counter((lay["kernel"], lay.get("impl") or "-", lay["weight_bits"], lay["activation_bits"])
                     for lay in layers)
    print("executed kernels (kernel, instruction path, weight bits, activation bits): count")
    for (kernel, impl, wb, ab), n in sorted(counts.items()):
        print(f"  {kernel:<40} {impl:<18} W{wb:<2} A{ab:<2} x{n}")


def compile_main(argv: list[str] | None = None) -> int:
    """Entry point of `apq-compile` (same as `apq compile`)."""
    parser = OneLineErrorParser(prog="apq-compile", description=_COMMANDS["compile"][0])
    _compile_args(parser)
    return _run(parser, cmd_compile, argv)


# --------------------------------------------------------------------------- targets


@command("targets", "list the targets apq can compile for", lambda p: p.add_argument("--json", action="store_true"))
def cmd_targets(args: argparse.Namespace) -> int:
    from apq.targets.registry import list_targets

    targets = list_targets()
    if args.json:
        _print_json([t.to_json() for t in targets])
        return 0
    for t in targets:
        l2 = f"{t.l2_cache_bytes >> 10}KiB" if t.l2_cache_bytes else "?"
        print(f"{t.name:<26} {t.arch:<8} {t.executor:<10} bits={','.join(map(str, t.bits)):<8} "
              f"l2/core={l2:<8} features={','.join(t.features) or '-'}")
        print(f"{'':<26} {t.description}")
    return 0


# --------------------------------------------------------------------------- run / verify


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact")
    p.add_argument("--inputs", help=".npz keyed by input name (default: seeded random)")
    p.add_argument("--outputs", help="write outputs to this .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="refuse the artifact unless it was built for this target")
    p.add_argument("--json", action="store_true")


@command("run", "run an artifact on this machine (ARM artifacts under qemu, for correctness only)", _run_args)
def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.onnx_import import load_inputs_npz
    from apq.toolchain.runtime import run_artifact

    art = open_artifact(args.artifact, expect_target=args.target)
    inputs = load_inputs_npz(args.inputs, art.input_specs) if args.inputs else art.random_inputs(args.seed)
    outs = run_artifact(art, inputs)
    names = [s.name for s in art.output_specs]
    if args.outputs:
        np.savez(args.outputs, **dict(zip(names, outs)))
    summary = [{"name": n, "shape": list(o.shape), "dtype": str(o.dtype),
                "argmax": int(np.argmax(o)) if o.size else None} for n, o in zip(names, outs)]
    if args.json:
        _print_json({"artifact": args.artifact, "target": art.target, "outputs": summary})
    else:
        for s in summary:
            print(f"{s['name']}: shape {s['shape']} {s['dtype']} argmax {s['argmax']}")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact")
    p.add_argument("model", help="the ONNX file the artifact was compiled from")
    p.add_argument("--inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


@command("verify", "compare an artifact's outputs with onnxruntime on the same ONNX", _verify_args)
def cmd_verify(args: argparse.Namespace) -> int:
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.verify import verify_artifact

    rep = verify_artifact(open_artifact(args.artifact), args.model, args.inputs, args.seed)
    if args.json:
        _print_json(rep.to_json())
    else:
        for o in rep.outputs:
            print(f"{o.name}: max abs err {o.max_abs_err:.3g} (tolerance {o.tolerance:.3g}) "
                  f"{'PASS' if o.passed else 'FAIL'}")
    return 0 if rep.passed else 1


# --------------------------------------------------------------------------- profile / flash / devices


def _rpc_args(p: argparse.ArgumentParser, key_required: bool) -> None:
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="TVM RPC tracker of the device farm")
    p.add_argument("--rpc-key", required=False, help="board key registered at the tracker")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for tracker/board")


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model.onnx (compiled first) or model.apq")
    p.add_argument("--target", "-t", default=None, help="target (default: host, or the artifact's)")
    p.add_argument("--input-shape", action="append", metavar="NAME:1x3x32x32")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed repeats (at least)")
    p.add_argument("--top", type=int, default=15, help="rows of the per-layer table to print")
    p.add_argument("--plot", metavar="PNG", help="also write a per-kernel latency bar chart")
    _rpc_args(p, key_required=False)
    p.add_argument("--json", action="store_true")


@command("profile", "measure end-to-end and per-layer latency on a target", _profile_args)
def cmd_profile(args: argparse.Namespace) -> int:
    from apq.toolchain.profiling_cli import profile_command

    report = profile_command(args)
    if args.json:
        _print_json(report)
    else:
        print(report["text"])
    return 0


def _flash_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact")
    _rpc_args(p, key_required=True)
    p.add_argument("--json", action="store_true")


@command("flash", "deploy an artifact to a board over TVM RPC, check its hash, smoke-test it", _flash_args)
def cmd_flash(args: argparse.Namespace) -> int:
    from apq.targets.flash import flash_artifact
    from apq.targets.rpc import parse_tracker

    if not args.rpc_tracker or not args.rpc_key:
        raise InvalidInputError("flash needs --rpc-tracker HOST:PORT and --rpc-key KEY")
    host, port = parse_tracker(args.rpc_tracker)
    rep = flash_artifact(args.artifact, host, port, args.rpc_key)
    d = rep.to_json()
    if args.json:
        _print_json(d)
    else:
        for k, v in d.items():
            print(f"{k}: {v}")
    return 0 if d.get("ok", True) else 1


def _devices_args(p: argparse.ArgumentParser) -> None:
    _rpc_args(p, key_required=False)
    p.add_argument("--json", action="store_true")


@command("devices", "list boards and queues at a TVM RPC tracker", _devices_args)
def cmd_devices(args: argparse.Namespace) -> int:
    from apq.targets.rpc import parse_tracker, query_devices

    if not args.rpc_tracker:
        raise InvalidInputError("devices needs --rpc-tracker HOST:PORT")
    host, port = parse_tracker(args.rpc_tracker)
    devs = query_devices(host, port, args.timeout)
    rows = [d.to_json() if hasattr(d, "to_json") else d for d in devs]
    if args.json:
        _print_json(rows)
    elif not rows:
        print(f"tracker {host}:{port} is up but no board is registered")
    else:
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
    return 0


# --------------------------------------------------------------------------- driver


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="apq", description="APQ: joint architecture / pruning / "
                                     "quantization search with compiled, measured deployment artifacts")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, fn) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_args(sp)
        sp.set_defaults(handler=fn)
    return parser


def _run(parser: argparse.ArgumentParser, handler: Handler | None, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    handler = handler or getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except ApqError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (checkpoints, if any, are kept; rerun to resume)", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    _register_late_commands()
    return _run(build_parser(), None, argv)


def _register_late_commands() -> None:
    """Commands of other stages live beside their code; importing registers them."""
    import importlib

    for mod in ("apq.toolchain.cli_supernet", "apq.toolchain.cli_demo"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


if __name__ == "__main__":
    sys.exit(main())
