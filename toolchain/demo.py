"""`apq demo`: the main job on the default data, end to end, resumable.

Stages (each writes plain files into the output directory and is skipped when its output
is already there, so an interrupted demo resumes where it stopped):
1. model: a subnet of the checked-in Fashion-MNIST supernet (extracted with its bit policy and
   exported as apq-convention QDQ ONNX) when the checkpoint and dataset are available, else a
   seeded MobileNetV2-style example model quantized with onnxruntime (int8 QDQ);
2. compile for the host and for an ARM board;
3. verify both against onnxruntime (the ARM build under qemu-aarch64: correctness only);
4. profile the host build (measured) and write a JSON report.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm


@dataclass
class DemoConfig:
    out_dir: str = "apq-demo"
    arm_target: str = "raspberry-pi/4b-aarch64"
    skip_arm: bool = False
    min_time_s: float = 0.5
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _stage(out: Path, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a stage unless its JSON record exists (resume after interrupt)."""
    record = out / f"stage_{name}.json"
    if record.exists():
        return json.loads(record.read_text())
    result = fn()
    tmp = record.with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    tmp.replace(record)
    return result


def _make_model(out: Path, seed: int) -> dict[str, Any]:
    try:
        from apq.toolchain.supernet.deploy import export_demo_subnet
    except ImportError:
        export_demo_subnet = None
    if export_demo_subnet is not None:
        info = export_demo_subnet(out, seed=seed)
        if info is not None:
            return info
    from apq.toolchain.examples import mobilenetv2_onnx, quantize_qdq

    fp = mobilenetv2_onnx(out / "model_float.onnx", resolution=32, width=0.5, seed=seed)
    q = quantize_qdq(fp, out / "model.onnx", per_channel=True)
    return {"onnx": str(q), "description": "example MobileNetV2-style (random weights), int8 QDQ via onnxruntime"}


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    from apq.targets.qemu import qemu_available
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.profile import MeasureConfig, profile_library
    from apq.toolchain.verify import verify_artifact

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": cfg.to_json()}
    targets = ["host"] + ([] if cfg.skip_arm else [cfg.arm_target])
    bar = tqdm(total=2 + 2 * len(targets), desc="apq demo", disable=None if progress else True, unit="stage")
    try:
        model = _stage(out, "model", lambda: _make_model(out, cfg.seed))
        report["model"] = model
        bar.update(1)
        onnx_path = Path(model["onnx"])
        for t in targets:
            safe = t.replace("/", "_")
            art_path = out / f"model.{safe}.apq"
            comp = _stage(out, f"compile_{safe}", lambda t=t, art_path=art_path: compile_onnx(
                onnx_path, t, art_path).to_json())
            report.setdefault("compile", {})[t] = {"artifact": comp["artifact"], "compile_s": comp["compile_s"]}
            bar.update(1)
            if t != "host":
                ok, why = qemu_available()
                if not ok:
                    report.setdefault("verify", {})[t] = {"skipped": f"qemu not available: {why}"}
                    bar.update(1)
                    continue
            ver = _stage(out, f"verify_{safe}", lambda art_path=art_path: verify_artifact(
                open_artifact(art_path), onnx_path, seed=cfg.seed).to_json())
            report.setdefault("verify", {})[t] = ver
            bar.update(1)
        art = open_artifact(out / "model.host.apq")
        prof = profile_library(art.lib_path, art.random_inputs(cfg.seed), None,
                               MeasureConfig(min_time_s=cfg.min_time_s))
        report["profile_host"] = prof.to_json()
        report["profile_host_text"] = prof.format_table(top=10)
        from apq.toolchain.plots import plot_layer_latency

        report["plot"] = str(plot_layer_latency(
            [r.to_json() for r in prof.layers], out / "profile_host.png",
            f"demo model on host: measured, median {prof.e2e.median_ms:.3f} ms, {prof.e2e.threads} thread(s)"))
        report["layers"] = art.manifest["layers"]
        bar.update(1)
    finally:
        bar.close()
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return report
