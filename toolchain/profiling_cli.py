"""`apq profile`: compile if needed, then time on the right device, or say why it can't.

Where a figure comes from decides how it is obtained: the host is timed in-process; an ARM
build is timed only on a real board over TVM RPC (qemu timings are never latencies); the
`bitfusion` target additionally reports its analytic model's figures labelled `simulated`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from apq.targets.registry import get_target
from apq.toolchain.artifact import open_artifact
from apq.toolchain.errors import ArtifactError, InvalidInputError
from apq.toolchain.profile import MeasureConfig, profile_library


def _artifact_for(args: argparse.Namespace, tmp: Path):
    """Open the given .apq, or compile the given .onnx into a temporary one."""
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.onnx_import import parse_input_shape

    path = Path(args.model)
    if path.suffix == ".onnx":
        target = args.target or "host"
        shapes = dict(parse_input_shape(v) for v in args.input_shape or [])
        res = compile_onnx(path, target, tmp / (path.stem + ".apq"), shapes, progress=not args.json)
        return open_artifact(res.artifact_path, expect_target=target)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file")
    return open_artifact(path, expect_target=args.target)


def profile_command(args: argparse.Namespace) -> dict[str, Any]:
    cfg = MeasureConfig(min_time_s=args.min_time)
    with tempfile.TemporaryDirectory(prefix="apq-profile-") as tmp:
        art = _artifact_for(args, Path(tmp))
        spec = get_target(art.target)
        inputs = art.random_inputs(0)
        report: dict[str, Any] = {"model": str(args.model), "target": spec.name}
        if args.rpc_tracker or args.rpc_key:
            from apq.targets.rpc import parse_tracker, remote_profile

            if not (args.rpc_tracker and args.rpc_key):
                raise InvalidInputError("remote profiling needs both --rpc-tracker HOST:PORT and --rpc-key KEY")
            host, port = parse_tracker(args.rpc_tracker)
            stats = remote_profile(art.lib_path, inputs, host, port, args.rpc_key, cfg, args.threads,
                                   timeout=args.timeout)
            report["latency"] = stats.to_json()
            report["layers"] = []
            report["text"] = (f"{spec.name} on board {args.rpc_key!r}: {stats.summary()}\n"
                              "(per-layer timing is only available for local runs)")
            return report
        if spec.executor == "qemu":
            raise ArtifactError(f"{spec.name} builds run here only under qemu, which is never timed; "
                                "time them on a board: --rpc-tracker HOST:PORT --rpc-key KEY")
        prof = profile_library(art.lib_path, inputs, args.threads, cfg, progress=not args.json)
        report["latency"] = prof.e2e.to_json()
        report["layers"] = [r.to_json() for r in prof.layers]
        text = [f"{spec.name} ({prof.e2e.device}):", prof.format_table(top=args.top)]
        if spec.executor == "simulator":
            sim = simulated_cost(art.manifest)
            report["simulated"] = sim
            text.append(sim["text"])
        if getattr(args, "plot", None):
            from apq.toolchain.plots import plot_layer_latency

            title = (f"{Path(args.model).name} on {spec.name}: measured, median {prof.e2e.median_ms:.3f} ms, "
                     f"{prof.e2e.threads} thread(s), {prof.e2e.device}")
            report["plot"] = str(plot_layer_latency(report["layers"], args.plot, title))
            text.append(f"plot: {report['plot']}")
        report["text"] = "\n".join(text)
        return report


def simulated_cost(manifest: dict[str, Any]) -> dict[str, Any]:
    """BitFusion analytic figures for the layers recorded in the manifest (labelled simulated)."""
    from apq.targets.bitfusion import simulate_network
    from apq.targets.layers import LayerShape

    shapes, widened = [], 0
    for layer in manifest.get("layers", []):
        geo = layer.get("geometry")
        if not geo:
            continue
        # BitFusion has no float datapath: float layers are simulated at its widest (16-bit) bricks.
        w, a = (min(layer["weight_bits"], 16), min(layer["activation_bits"], 16))
        widened += layer["weight_bits"] > 16 or layer["activation_bits"] > 16
        shapes.append(LayerShape(w_bits=max(w, 1), a_bits=max(a, 1), **geo))
    if not shapes:
        return {"source": "simulated", "text": "bitfusion: no layer geometry in the manifest to simulate"}
    net = simulate_network(shapes)
    note = f"; {widened} float layer(s) simulated as 16-bit" if widened else ""
    return {"source": net.source, "model": net.model, "latency_ms": net.latency_ms, "energy_uj": net.energy_uj,
            "layers": len(shapes), "float_layers_as_16bit": widened,
            "text": f"bitfusion (simulated, {net.model}): {net.latency_ms:.4f} ms, {net.energy_uj:.2f} uJ "
                    f"over {len(shapes)} layers{note}"}
