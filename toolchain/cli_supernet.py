"""`apq train-supernet`, `apq eval-subnet`, `apq export-subnet` (registered into the CLI on import)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from apq.toolchain.cli import _print_json, command
from apq.toolchain.errors import InvalidInputError


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist | mnist:PATH | idx:PATH | cifar10:PATH | imagefolder:PATH")
    p.add_argument("--out", default="apq-supernet", help="run directory (checkpoints; rerun to resume)")
    p.add_argument("--config", help="TrainConfig JSON (default: the built-in schedule)")
    p.add_argument("--epochs", type=float, help="total epochs; the phases are scaled to sum to this")
    p.add_argument("--subset", type=int, help="train on the first N training images only")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--json", action="store_true")


@command("train-supernet", "train the elastic quantization-aware supernet (progressive shrinking)", _train_args)
def cmd_train_supernet(args: argparse.Namespace) -> int:
    from apq.toolchain.supernet.train import TrainConfig, train_supernet

    if args.config:
        try:
            cfg = TrainConfig.from_json(Path(args.config).read_text())
        except FileNotFoundError:
            raise InvalidInputError(f"{args.config}: no such file") from None
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"{args.config}: bad TrainConfig JSON: {e}") from None
    else:
        cfg = TrainConfig()
    overrides = {k: v for k, v in (("subset", args.subset), ("batch_size", args.batch_size), ("seed", args.seed),
                                   ("threads", args.threads)) if v is not None}
    cfg = replace(cfg, **overrides)
    if args.epochs is not None:
        if args.epochs <= 0:
            raise InvalidInputError("--epochs must be > 0")
        total = sum(p.epochs for p in cfg.phases)
        cfg = replace(cfg, phases=[replace(p, epochs=p.epochs * args.epochs / total) for p in cfg.phases])
    final = train_supernet(args.data, Path(args.out), cfg, resume=not args.no_resume, progress=not args.json)
    report = {"checkpoint": str(final), "out": args.out, "config": cfg.to_dict()}
    if args.json:
        _print_json(report)
    else:
        print(f"supernet checkpoint: {final}")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="supernet .pt (default: the checked-in Fashion-MNIST supernet)")
    p.add_argument("--config", default="largest", help="largest | smallest | FILE.json | compact string")
    p.add_argument("--bits", default="W8A8", help="float | W8A8 | W4A4 | W2A2 | ... | FILE.json")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--data", help="dataset (default: the checkpoint's)")
    p.add_argument("--eval-subset", type=int, help="evaluate on the first N images only")
    p.add_argument("--json", action="store_true")


@command("eval-subnet", "top-1 of one subnet of a supernet (after BN re-calibration)", _eval_args)
def cmd_eval_subnet(args: argparse.Namespace) -> int:
    from apq.toolchain.supernet.deploy import default_checkpoint
    from apq.toolchain.supernet.evaluate import eval_subnet

    ck = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if not ck.is_file():
        raise InvalidInputError(f"{ck}: no such checkpoint")
    rep = eval_subnet(ck, args.config, args.bits, args.split, eval_subset=args.eval_subset, data=args.data)
    if args.json:
        _print_json(rep)
    else:
        print(f"{rep['config_string']} {rep['bits']}: top-1 {100 * rep['top1']:.2f}% on {rep['split']} "
              f"({rep['samples']} images)")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    _eval_args(p)
    p.add_argument("-o", "--output", required=True, help="ONNX file to write (apq QDQ convention)")
    p.add_argument("--qat-steps", type=int, default=0, help="short QAT fine-tune with the bit policy first")
    p.add_argument("--qdq-format", default="apq",
                   help="apq: 8-bit containers + Clip (default); onnx-int4: opset-21 INT4/UINT4 QDQ for <= 4-bit "
                        "layers (docs/qdq_convention.md)")


@command("export-subnet", "extract a subnet with its bit policy and export it as QDQ ONNX", _export_args)
def cmd_export_subnet(args: argparse.Namespace) -> int:
    from apq.toolchain.supernet.deploy import export_subnet

    rep = export_subnet(args.output, args.checkpoint, args.config, args.bits, args.qat_steps, args.split,
                        args.eval_subset, args.data, qdq_format=args.qdq_format)
    if args.json:
        _print_json(rep.to_json())
    else:
        acc = f", top-1 {100 * rep.top1:.2f}% on {rep.split}" if rep.top1 is not None else ""
        print(f"wrote {rep.onnx} ({rep.config} {rep.bits}, QDQ format {rep.qdq_format}{acc})")
    return 0
