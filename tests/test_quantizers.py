"""Quantizers and static quantized layers: torch fake-quant vs the NumPy references, STE
gradients, BN folding, calibration and ``describe``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apq.toolchain.errors import InvalidInputError
from apq.toolchain.supernet.qlayers import (
    ActQuant,
    InvertedResidual,
    QConvBNAct,
    QLinear,
    StaticNet,
    act_qrange,
    act_scale_divisor,
    calibrate_net,
    fake_quant_weight,
    quantize_act_numpy,
    quantize_weight_numpy,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 1, 5, 5), (7, 11)])
def test_fake_quant_weight_equals_numpy_reference(bits: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(*shape, generator=g)
    w[1] = 0.0  # an all-zero channel must not produce a zero/NaN scale
    q, scale = quantize_weight_numpy(w.numpy(), bits)
    ref = q.astype(np.float32) * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    out = fake_quant_weight(w, bits).numpy()
    np.testing.assert_array_equal(out, ref)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and np.all(scale > 0)
    qmax = max(2 ** (bits - 1) - 1, 1)
    assert q.min() >= -qmax and q.max() <= qmax
    levels = np.unique(q[0])
    assert len(levels) <= (2 if bits == 1 else 2 * qmax + 1)
    if bits == 1:  # binary: sign * mean|w| per channel
        np.testing.assert_allclose(np.abs(out[0]), np.abs(w[0].numpy()).mean(), rtol=1e-6)
        assert set(levels.tolist()) <= {-1, 1}
    else:  # the largest |w| of each channel is exactly representable
        np.testing.assert_allclose(np.abs(out[0]).max(), np.abs(w[0].numpy()).max(), rtol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", range(1, 9))
def test_act_quant_equals_numpy_reference(bits: int, signed: bool) -> None:
    # clip chosen so the scale is exactly 1/8: then k + 0.5 steps are exact float ties
    clip = act_scale_divisor(bits, signed) / 8.0
    aq = ActQuant(signed=signed, init_clip=clip)
    lo, hi = act_qrange(bits, signed)
    ties = torch.arange(lo - 2, hi + 2, dtype=torch.float32) + 0.5
    x = torch.cat([torch.randn(4 * 3 * 7 * 7) * clip * 1.5, ties / 8.0])
    out = aq(x, bits).detach().numpy()
    q, scale = quantize_act_numpy(x.numpy(), clip, bits, signed)
    assert scale == np.float32(0.125)
    np.testing.assert_array_equal(out, q.astype(np.float32) * scale)
    assert q.dtype == (np.int8 if signed else np.uint8)
    assert q.min() == lo and q.max() == hi  # saturates at exactly the Clip bounds
    # round half to even (QuantizeLinear's rule) on the ties inside the range
    tq = q[-len(ties):].astype(np.int64)
    inside = (ties.numpy() > lo) & (ties.numpy() < hi)
    np.testing.assert_array_equal(tq[inside], np.round(ties.numpy()[inside]).astype(np.int64))
    assert np.all(tq[inside] % 2 == 0)


def test_float_bits_are_identity_and_bad_bits_raise() -> None:
    w = torch.randn(4, 3, 3, 3)
    assert fake_quant_weight(w, None) is w
    assert fake_quant_weight(w, 32) is w
    assert ActQuant(signed=True)(w, None) is w
    with pytest.raises(InvalidInputError):
        fake_quant_weight(w, 12)
    with pytest.raises(InvalidInputError):
        QConvBNAct(3, 4, 3, w_bits=0)


def test_weight_ste_gradient_is_identity() -> None:
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(8, 4, 3, 3)
    (fake_quant_weight(w, 2) * upstream).sum().backward()
    assert w.grad is not None
    torch.testing.assert_close(w.grad, upstream, rtol=0, atol=0)


@pytest.mark.parametrize("signed", [False, True])
def test_act_ste_gradient_passes_in_range_and_trains_clip(signed: bool) -> None:
    aq = ActQuant(signed=signed, init_clip=1.0)
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    aq(x, 4).sum().backward()
    assert x.grad is not None and aq.clip.grad is not None
    lo, hi = act_qrange(4, signed)
    scale = 1.0 / (7 if signed else 15)
    inside = (x.detach() / scale > lo + 0.5) & (x.detach() / scale < hi - 0.5)
    outside = (x.detach() / scale < lo - 0.5) | (x.detach() / scale > hi + 0.5)
    assert torch.all(x.grad[inside] == 1.0)
    assert torch.all(x.grad[outside] == 0.0)
    assert float(aq.clip.grad) != 0.0  # the clip is learned


def test_calibrate_sets_clip_from_percentile() -> None:
    x = torch.cat([torch.rand(10000) * 2.0, torch.tensor([1000.0])])
    unsigned = ActQuant(signed=False)
    unsigned.calibrate(x)
    assert 1.9 < float(unsigned.clip.detach()) < 2.01  # the outlier is ignored
    signed = ActQuant(signed=True)
    signed.calibrate(-x)
    assert 1.9 < float(signed.clip.detach()) < 2.01


def _randomize_bn(module: torch.nn.Module, seed: int = 0) -> None:
    from apq.toolchain.supernet.qlayers import randomize_batchnorm

    randomize_batchnorm(module, torch.Generator().manual_seed(seed), negative_gamma=True)


@pytest.mark.parametrize("w_bits", [1, 2, 4, 8, None])
def test_bn_folding_commutes_with_per_channel_weight_quant(w_bits: int | None) -> None:
    """Eval path (fold BN, then quantize) == quantize, conv, then eval BN, up to float rounding."""
    layer = QConvBNAct(6, 8, 3, stride=2, w_bits=w_bits, a_bits=None)
    with torch.no_grad():
        _randomize_bn(layer)
    layer.eval()
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        folded = layer(x)
        unfolded = torch.nn.functional.relu6(layer.bn(layer._conv(x, fake_quant_weight(layer.conv.weight, w_bits), None)))
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-5)


def _tiny_net() -> StaticNet:
    torch.manual_seed(0)
    stem = QConvBNAct(3, 8, 3, 2, in_signed=True)
    blocks = [
        InvertedResidual(8, 8, 8, 3, 1, 4, 4, 2, 2),
        InvertedResidual(8, 24, 16, 5, 2, 4, 8, 8, 4),
    ]
    head = QConvBNAct(16, 32, 1, in_signed=True)
    return StaticNet(stem, blocks, head, QLinear(32, 10))


def test_describe_lists_every_layer_in_order() -> None:
    net = _tiny_net()
    rows = net.describe((1, 3, 32, 32))
    names = [r["name"] for r in rows]
    assert names == [
        "stem", "blocks.0.depthwise", "blocks.0.project", "blocks.1.expand",
        "blocks.1.depthwise", "blocks.1.project", "head", "classifier",
    ]
    by = {r["name"]: r for r in rows}
    assert by["blocks.0.depthwise"]["in_signed"]  # no expand: the block input is signed
    assert not by["blocks.1.depthwise"]["in_signed"] and by["blocks.1.expand"]["in_signed"]
    assert (by["blocks.1.depthwise"]["op"], by["blocks.1.depthwise"]["kernel"]) == ("dwconv", 5)
    assert (by["blocks.1.depthwise"]["w_bits"], by["blocks.1.depthwise"]["a_bits"]) == (8, 4)
    assert (by["blocks.1.project"]["w_bits"], by["blocks.1.project"]["a_bits"]) == (4, 8)
    assert by["blocks.1.depthwise"]["in_hw"] == [16, 16] and by["blocks.1.depthwise"]["out_hw"] == [8, 8]
    assert by["classifier"]["op"] == "linear" and by["classifier"]["in_ch"] == 32
    named = dict(net.named_modules())
    assert all(n in named for n in names)  # describe names address the modules


def test_static_net_trains_and_calibrates() -> None:
    net = _tiny_net()
    x = torch.randn(4, 3, 32, 32)
    net.train()
    loss = torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.eval()
    calibrate_net(net, x)
    clips = [float(layer.act_quant.clip.detach()) for _, layer in net.quant_layers()]
    assert all(c != 6.0 and c > 0 for c in clips)
    assert torch.isfinite(net(x)).all()
