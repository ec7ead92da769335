"""The elastic supernet: weight sharing, exact extraction, training with resume, calibration,
evaluation. Everything runs on a tiny space and tiny synthetic data (seconds on 2 cores)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from apq.toolchain.data import AugmentConfig, DatasetSpec, LoadedDataset
from apq.toolchain.errors import ArtifactError, InvalidInputError
from apq.toolchain.supernet.calibrate import calibrate_bit_clips, calibrate_clips, mse_clip, recalibrate_bn
from apq.toolchain.supernet.evaluate import (
    SubnetEvaluator,
    apply_bits,
    eval_subnet,
    evaluate_subnet,
    qat_finetune,
    resolve_config,
)
from apq.toolchain.supernet.qlayers import StaticNet
from apq.toolchain.supernet.space import BlockConfig, SearchSpace, SubnetConfig
from apq.toolchain.supernet.supernet import Supernet, file_sha256, load_checkpoint
from apq.toolchain.supernet.train import EpochBatches, PhaseConfig, Schedule, TrainConfig, train_supernet

torch.set_num_threads(1)

TINY = SearchSpace(in_channels=1, image_size=8, num_classes=3, stem_width=4, stem_stride=1, stage_widths=(4, 6),
                   stage_strides=(1, 2), depth_choices=(1, 2), kernel_choices=(3, 5, 7), expand_choices=(2, 3),
                   bit_choices=(2, 4, 8), head_width=8)


def _warm(net: Supernet, rng: np.random.Generator, steps: int = 4) -> None:
    """A few train-mode forwards of random subnets, so BN stats and clips are non-trivial."""
    net.train()
    with torch.no_grad():
        for _ in range(steps):
            net.set_active(TINY.sample(rng))
            net(torch.randn(16, 1, 8, 8) * 2 + 0.5)
        for p in net.parameters():  # make BN affine params and transforms non-trivial too
            p.add_(0.05 * torch.randn_like(p))


def _synthetic(n_train: int = 96, n_test: int = 48, seed: int = 0) -> LoadedDataset:
    """Three learnable classes of 8x8 images (a bright row, column or diagonal plus noise)."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 60, (n, 8, 8, 1))
        for i, c in enumerate(y):
            k = rng.integers(1, 7)
            if c == 0:
                x[i, k, :, 0] += 180
            elif c == 1:
                x[i, :, k, 0] += 180
            else:
                x[i, np.arange(8), np.arange(8), 0] += 180
        return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)

    (xt, yt), (xs, ys) = make(n_train), make(n_test)
    return LoadedDataset(spec=DatasetSpec("synthetic"), root=Path("."), train_images=xt, train_labels=yt,
                         test_images=xs, test_labels=ys, class_names=("row", "col", "diag"),
                         augment=AugmentConfig(pad=1, hflip=True))


def _tiny_train_config(**kw) -> TrainConfig:
    phases = [PhaseConfig("full", 1.0, 0.05), PhaseConfig("kernel", 0.5, 0.02, ("kernel",)),
              PhaseConfig("width", 0.5, 0.02, ("kernel", "depth", "expand"), sort_channels=True),
              PhaseConfig("quant", 1.0, 0.02, ("kernel", "depth", "expand", "bits"))]
    base = dict(batch_size=16, phases=phases, space=TINY, val_size=16, checkpoint_every=3, warmup_steps=2,
                calib_samples=32)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- weight sharing


@pytest.mark.parametrize("quantized", [False, True])
def test_extract_equals_supernet_forward_exactly(quantized: bool) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = Supernet(TINY)
    _warm(net, rng)
    net.eval()
    x = torch.randn(8, 1, 8, 8) * 2
    for cfg in [TINY.largest(), TINY.smallest()] + [TINY.sample(rng, quantized) for _ in range(6)]:
        if not quantized:
            cfg = cfg.with_bits(None, None)
        net.set_active(cfg)
        with torch.no_grad():
            ref = net(x)
            static = net.extract(cfg)
            assert isinstance(static, StaticNet) and not static.training
            out = static(x)
        assert torch.equal(ref, out), cfg.to_string()
        rows = static.describe()
        assert [r["kernel"] for r in rows if r["op"] == "dwconv"] == [b.kernel for b in cfg.blocks]
        fixed = TINY.fixed_bits if quantized else None
        assert rows[0]["w_bits"] == fixed and rows[-1]["a_bits"] == fixed
        if quantized:
            dw = [r for r in rows if r["op"] == "dwconv"]
            assert [(r["w_bits"], r["a_bits"]) for r in dw] == [(b.dw_w, b.dw_a) for b in cfg.blocks]


def test_quantization_changes_the_function() -> None:
    torch.manual_seed(1)
    net = Supernet(TINY)
    _warm(net, np.random.default_rng(1))
    x = torch.randn(16, 1, 8, 8) * 2
    calibrate_clips(net, TINY.largest(8), x)
    net.eval()
    err = {}
    with torch.no_grad():
        net.set_active(TINY.largest(bits=None))
        ref = net(x)
        for bits in (8, 4, 2):
            net.set_active(TINY.largest(bits=bits))
            err[bits] = float((net(x) - ref).abs().mean() / ref.abs().mean())
    assert 0 < err[8] < err[4] < err[2]


def test_weights_are_shared_and_extract_copies() -> None:
    torch.manual_seed(2)
    net = Supernet(TINY).eval()
    small = TINY.smallest(bits=None)
    x = torch.randn(2, 1, 8, 8)
    net.set_active(small)
    static = net.extract(small)
    with torch.no_grad():
        before = net(x)
        blk = net.stages[0][0]
        blk.expand.weight[: blk.in_ch * min(TINY.expand_choices)].mul_(-1.0)  # channels every subnet uses
        after = net(x)
        assert not torch.equal(before, after)
        assert torch.equal(static(x), before)  # the extracted copy is independent
        # channels beyond the smallest width do not influence the smallest subnet
        blk.expand.weight[blk.in_ch * min(TINY.expand_choices):].mul_(5.0)
        assert torch.equal(net(x), after)


def test_gradients_reach_only_active_slices_and_kernel_transforms() -> None:
    torch.manual_seed(3)
    net = Supernet(TINY).train()
    cfg = SubnetConfig((1, 1), (BlockConfig(3, 2, 4, 4, 4, 4),) * 2)
    net.set_active(cfg)
    net(torch.randn(4, 1, 8, 8)).square().sum().backward()
    blk = net.stages[0][0]
    mid = blk.in_ch * 2
    g = blk.expand.weight.grad
    assert g[:mid].abs().sum() > 0 and g[mid:].abs().sum() == 0
    assert net.stages[0][1].expand.weight.grad is None  # inactive block
    t = blk.depthwise.kernel_transforms
    assert t["7to5"].grad.abs().sum() > 0 and t["5to3"].grad.abs().sum() > 0
    assert blk.expand.bit_clips["a4"].grad is not None  # the 4-bit policy's own clip


def test_kernel_transform_starts_as_centre_crop() -> None:
    torch.manual_seed(4)
    layer = Supernet(TINY).stages[0][0].depthwise
    w7 = layer.active_weight(6, 6, 7)
    assert torch.equal(layer.active_weight(6, 6, 5), w7[:, :, 1:6, 1:6])
    assert torch.equal(layer.active_weight(6, 6, 3), w7[:, :, 2:5, 2:5])
    with torch.no_grad():
        layer.kernel_transforms["7to5"].mul_(2.0)
    assert torch.allclose(layer.active_weight(6, 6, 3), 2 * w7[:, :, 2:5, 2:5])
    with pytest.raises(ValueError, match="kernel 4"):
        layer.active_weight(6, 6, 4)


def test_sort_channels_keeps_largest_function_and_orders_importance() -> None:
    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    net = Supernet(TINY)
    _warm(net, rng)
    net.eval()
    cfg = TINY.largest(bits=None)
    net.set_active(cfg)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ref = net(x)
        net.sort_channels()
        out = net(x)
    assert torch.allclose(ref, out, atol=1e-5)
    imp = net.stages[1][1].project.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(imp[:-1] >= imp[1:])


def test_set_active_validates() -> None:
    net = Supernet(TINY)
    with pytest.raises(ValueError, match="kernel 9"):
        net.set_active(SubnetConfig((1, 1), (BlockConfig(9, 2),) * 2))


# --------------------------------------------------------------------------- calibration


def test_recalibrate_bn_matches_batch_statistics() -> None:
    torch.manual_seed(6)
    net = Supernet(TINY)
    static = net.extract(TINY.smallest(bits=None))
    x = torch.randn(32, 1, 8, 8) * 3 + 1
    used = recalibrate_bn(static, [x[:16], x[16:]], num_batches=5)
    assert used == 2 and not static.training
    # stem BN sees conv(x): its running mean is the mean of the two batch means
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(x, static.stem.conv.weight, None, 1, 1)
    assert torch.allclose(static.stem.bn.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)


def test_calibrate_clips_on_supernet_and_static() -> None:
    torch.manual_seed(7)
    net = Supernet(TINY)
    x = torch.randn(16, 1, 8, 8) * 4
    calibrate_clips(net, TINY.largest(), x)
    clip = net.stem.act_quant.clip.item()
    assert clip != 6.0 and abs(clip - float(torch.quantile(x.abs().flatten(), 0.999))) < 1e-4
    assert net.stages[1][1].project.act_quant.clip.item() != 6.0
    static = Supernet(TINY).extract(TINY.smallest())
    calibrate_clips(static, None, x)
    assert static.blocks[0].depthwise.act_quant.clip.item() != 6.0


def test_each_low_bit_width_has_its_own_clip_and_extract_takes_it() -> None:
    torch.manual_seed(8)
    net = Supernet(TINY).train()
    layer = net.stages[0][0].expand
    assert sorted(layer.bit_clips) == ["a2", "a4"]  # 8 = fixed_bits uses act_quant.clip
    with torch.no_grad():
        layer.bit_clips["a2"].fill_(0.7)
        layer.bit_clips["a4"].fill_(2.5)
    cfg = SubnetConfig((1, 1), (BlockConfig(3, 2, 2, 2, 2, 2),) * 2)
    net.set_active(cfg)
    net(torch.randn(4, 1, 8, 8)).square().sum().backward()
    assert layer.bit_clips["a2"].grad is not None and layer.bit_clips["a4"].grad is None
    assert layer.act_quant.clip.grad is None
    for bits, want in ((2, 0.7), (4, 2.5), (8, 6.0)):
        static = net.extract(cfg.with_bits(bits, bits))
        assert static.blocks[0].expand.act_quant.clip.item() == pytest.approx(want)


def test_checkpoint_without_bit_clips_loads_with_the_shared_clip() -> None:
    """Checkpoints written before per-bit clips still load and compute what they did."""
    torch.manual_seed(9)
    net = Supernet(TINY)
    with torch.no_grad():
        net.stages[1][0].depthwise.act_quant.clip.fill_(1.25)
    old = {k: v for k, v in net.state_dict().items() if ".bit_clips." not in k}
    fresh = Supernet(TINY)
    fresh.load_state_dict(old)  # strict
    dw = fresh.stages[1][0].depthwise
    assert dw.bit_clips["a2"].item() == dw.bit_clips["a4"].item() == 1.25


def test_mse_clip_is_smaller_at_low_bits_and_beats_the_percentile() -> None:
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    c2, c4, c8 = (mse_clip(x, b, signed=True) for b in (2, 4, 8))
    assert c2 < c4 < c8

    def err(clip: float, bits: int) -> float:
        s = clip / (2 ** (bits - 1) - 1)
        return float(((torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s - x) ** 2).mean())

    pct = float(torch.quantile(x.abs(), 0.999))
    assert err(c2, 2) < 0.5 * err(pct, 2)
    assert mse_clip(x.clamp_min(0), 2, signed=False) > 0 and mse_clip(torch.zeros(10), 2, True) == 1e-3


def test_calibrate_bit_clips_lowers_the_2bit_quantization_error() -> None:
    torch.manual_seed(10)
    net = Supernet(TINY)
    _warm(net, np.random.default_rng(10))
    x = torch.randn(32, 1, 8, 8) * 2
    calibrate_clips(net, TINY.largest(8), x)  # percentile clips, shared by all bit-widths
    layer = net.stages[0][0].expand  # its input (the 8-bit stem's output) is the same at any block bits
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    net.eval()
    with torch.no_grad():
        net.set_active(TINY.largest(bits=2))
        net(x)

    def err() -> float:
        q = layer.act_quant.__class__(signed=True)
        q.clip.data.fill_(layer.bit_clips["a2"].item())
        with torch.no_grad():  # the fresh quantizer's clip is a parameter: no graph to build
            return float((q(seen[0], 2) - seen[0]).square().mean())

    before = err()
    clip8 = layer.act_quant.clip.item()
    assert calibrate_bit_clips(net, x) == {2: 12, 4: 12}  # 2 stages x 2 blocks x 3 elastic layers
    handle.remove()
    assert err() < 0.8 * before and layer.bit_clips["a2"].item() < layer.bit_clips["a4"].item() < clip8
    assert layer.act_quant.clip.item() == clip8  # the 8-bit clip is untouched
    assert net.training is False and net.active == TINY.largest(bits=2)


# --------------------------------------------------------------------------- training


def test_train_config_json_round_trip() -> None:
    cfg = _tiny_train_config(subset=50)
    back = TrainConfig.from_json(cfg.to_json())
    assert back == cfg and back.phases[2].elastic == ("kernel", "depth", "expand")
    with pytest.raises(InvalidInputError, match="unknown elastic"):
        PhaseConfig("x", 1.0, 0.1, ("colour",))
    assert TrainConfig.from_json(TrainConfig().to_json()) == TrainConfig()


def test_epoch_batches_are_a_pure_function_of_seed_epoch_index() -> None:
    ds = _synthetic()
    a = EpochBatches(ds, np.arange(64), 16, seed=3)
    b = EpochBatches(ds, np.arange(64), 16, seed=3)
    x1, y1 = a.batch(1, 2)
    a.batch(0, 0)
    x2, y2 = b.batch(1, 2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (16, 1, 8, 8)
    assert not torch.equal(a.batch(0, 2)[0], x1)
    sched = Schedule(_tiny_train_config().phases, a.steps_per_epoch, 2)
    assert sched.total == 4 + 2 + 2 + 4 and sched.locate(5) == (1, 1) and sched.lr(0) < sched.lr(1)


def test_student_gradients_are_clipped_per_subnet() -> None:
    from apq.toolchain.supernet.train import _accumulate

    w = torch.nn.Parameter(torch.zeros(3))
    target = torch.tensor([3.0, 4.0, 0.0])
    assert _accumulate([w], (w * target).sum(), 1.0) == pytest.approx(5.0)
    assert torch.allclose(w.grad, target / 5.0)  # clipped to norm 1
    _accumulate([w], (w * target).sum(), 0.0)  # unclipped, accumulated
    assert torch.allclose(w.grad, target / 5.0 + target)


def test_label_smoothing_reaches_the_teacher_loss() -> None:
    from apq.toolchain.supernet.train import train_step

    import torch.nn.functional as F

    torch.manual_seed(0)
    net = Supernet(TINY)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 3
    full = PhaseConfig("full", 1.0, 0.1)
    net.set_active(TINY.largest(bits=None))
    with torch.no_grad():
        logits = net(x)
    rng = np.random.default_rng(0)
    plain = train_step(net, full, x, y, rng, _tiny_train_config())["loss"]
    smooth = train_step(net, full, x, y, rng, _tiny_train_config(label_smoothing=0.2))["loss"]
    assert plain == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert smooth == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.2).item(), rel=1e-5)
    assert abs(smooth - plain) > 10 * 1e-5 * plain  # the two references are told apart by the tolerance


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, LoadedDataset]:
    out = tmp_path_factory.mktemp("tiny_run")
    ds = _synthetic()
    final = train_supernet(ds, out, _tiny_train_config(), progress=False)
    return final, ds


def test_resume_after_kill_gives_identical_weights(trained, tmp_path) -> None:
    final, ds = trained
    ref = load_checkpoint(final)["model"]
    out = tmp_path / "killed"
    cfg = _tiny_train_config()
    train_supernet(ds, out, cfg, halt_after=7, progress=False)  # "killed" mid-phase; last checkpoint at 6
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 6
    resumed = load_checkpoint(train_supernet(ds, out, cfg, progress=False))
    assert resumed["steps"] == 14  # 80 training samples / 16 = 5 steps per epoch; 5+2+2+5 steps
    assert ref.keys() == resumed["model"].keys()
    for k, v in ref.items():
        assert torch.equal(v, resumed["model"][k]), k
    with pytest.raises(ArtifactError, match="different training config"):
        train_supernet(ds, out, replace(cfg, seed=1), progress=False)


def test_training_learns_and_checkpoint_loads(trained) -> None:
    final, ds = trained
    ck = load_checkpoint(final)
    assert ck["wall_time_s"] > 0 and TrainConfig.from_dict(ck["train_config"]).space == TINY
    net, _ = Supernet.from_checkpoint(final)
    lines = [json.loads(s) for s in (final.parent / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines][-1] == "quant" and "student_loss" in lines[-1]
    assert lines[-1]["loss"] < lines[0]["loss"]
    with pytest.raises(ArtifactError, match="not an apq supernet"):
        bad = final.parent / "bad.pt"
        torch.save({"x": 1}, bad)
        load_checkpoint(bad)


# --------------------------------------------------------------------------- evaluation


def test_evaluate_subnet_reports_measured_accuracy(trained) -> None:
    final, ds = trained
    r = evaluate_subnet(final, TINY.largest(), "float", split="test", calib_batches=2, data=ds)
    assert set(r) >= {"top1", "split", "config", "bits", "checkpoint"}
    assert r["checkpoint"] == file_sha256(final) and r["bits"] == "float" and r["samples"] == 48
    assert SubnetConfig.from_dict(r["config"]) == TINY.largest(bits=None)
    assert r["top1"] > 0.5  # three easy classes; chance is 1/3
    ev = SubnetEvaluator(final, ds, calib_batches=2)
    r2 = ev.evaluate(apply_bits(TINY.largest(), "W8A8"), "test")
    assert r2["bits"] == "W8A8" and abs(r2["top1"] - r["top1"]) <= 0.15
    assert ev.evaluate(apply_bits(TINY.largest(), "float"), "test")["top1"] == r["top1"]  # deterministic


def test_eval_subnet_strings(trained, tmp_path) -> None:
    final, ds = trained
    sp = Supernet.from_checkpoint(final)[0].space
    assert resolve_config(sp, "smallest") == sp.smallest()
    p = tmp_path / "cfg.json"
    p.write_text(sp.smallest().to_json())
    assert resolve_config(sp, str(p)) == sp.smallest()
    with pytest.raises(InvalidInputError, match="not in the search space"):
        resolve_config(sp, "d3,3|" + ",".join(["k3e2w8a8d8a8"] * 6))
    with pytest.raises(InvalidInputError):
        eval_subnet(final, "largest", "W9", data=ds)  # type: ignore[arg-type]
    r = eval_subnet(final, "smallest", "W4A4", split="val", calib_batches=1, data=ds)  # type: ignore[arg-type]
    assert r["bits"] == "W4A4" and r["split"] == "val" and 0.0 <= r["top1"] <= 1.0


def test_qat_finetune_updates_weights_and_keeps_bits(trained) -> None:
    final, ds = trained
    net, _ = Supernet.from_checkpoint(final)
    cfg = TINY.smallest(bits=2)
    static = net.extract(cfg)
    w0 = static.blocks[0].depthwise.conv.weight.clone()
    batches = EpochBatches(ds, np.arange(64), 16, seed=0)
    out = qat_finetune(static, [batches.batch(0, i) for i in range(4)], steps=5, progress=False,
                       teacher=net.extract(TINY.largest(bits=None)))
    assert out is static and not out.training
    assert not torch.equal(w0, static.blocks[0].depthwise.conv.weight)
    assert static.blocks[0].depthwise.w_bits == 2 and static.stem.w_bits == TINY.fixed_bits


# --------------------------------------------------------------------------- the checked-in checkpoint

CHECKPOINT = Path(__file__).resolve().parents[1] / "apq_namespace" / "checkpoints" / "fmnist_supernet.pt"


@pytest.mark.skipif(not CHECKPOINT.is_file(), reason="checked-in supernet checkpoint missing")
def test_checked_in_checkpoint_matches_its_record() -> None:
    record = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    assert record["sha256"] == file_sha256(CHECKPOINT) and CHECKPOINT.stat().st_size < 8 << 20
    net, ck = Supernet.from_checkpoint(CHECKPOINT)
    assert net.space == SearchSpace() and ck["data"] == "fashion-mnist"
    assert TrainConfig.from_dict(record["train_config"]) == TrainConfig.from_dict(ck["train_config"])
    x = torch.zeros(2, 1, 28, 28)
    net.eval()
    net.set_active(net.space.smallest())
    assert net(x).shape == (2, 10)


@pytest.mark.skipif(not CHECKPOINT.is_file() or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="checkpoint or Fashion-MNIST missing")
def test_checked_in_checkpoint_is_accurate_on_fashion_mnist() -> None:
    r = eval_subnet(CHECKPOINT, "largest", "W8A8", split="test", calib_batches=2, eval_subset=512)
    assert r["samples"] == 512 and r["top1"] > 0.8


@pytest.mark.skipif(not CHECKPOINT.is_file() or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="checkpoint or Fashion-MNIST missing")
def test_checked_in_checkpoint_2bit_is_far_above_chance() -> None:
    """The 2-bit recipe (per-bit-width MSE clips) must show in the shipped weights (10% = chance)."""
    r = eval_subnet(CHECKPOINT, "smallest", "W2A2", split="test", calib_batches=2, eval_subset=512)
    assert r["samples"] == 512 and r["top1"] > 0.5

