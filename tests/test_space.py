"""The search space: one dataclass, JSON/string round-trips, sampling, mutation, encoding."""

from __future__ import annotations

import numpy as np
import pytest

from apq.toolchain.supernet.space import BlockConfig, SearchSpace, SubnetConfig, parse_bits

SPACE = SearchSpace()


def test_space_json_round_trip_and_unknown_fields() -> None:
    other = SearchSpace(stage_widths=(8, 16), stage_strides=(2, 2), bit_choices=(4, 8))
    for sp in (SPACE, other):
        back = SearchSpace.from_json(sp.to_json())
        assert back == sp and isinstance(back.stage_widths, tuple)
    with pytest.raises(ValueError, match="unknown search space fields"):
        SearchSpace.from_dict({**SPACE.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="sorted and unique"):
        SearchSpace(kernel_choices=(5, 3))


@pytest.mark.parametrize("seed", range(5))
def test_subnet_round_trips(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cfg = SPACE.sample(rng, quantized=seed % 2 == 0)
    assert SubnetConfig.from_json(cfg.to_json()) == cfg
    assert SubnetConfig.from_string(cfg.to_string()) == cfg
    assert SubnetConfig.from_dict({"string": cfg.to_string()}) == cfg


def test_string_form() -> None:
    cfg = SubnetConfig((2, 2, 2), (BlockConfig(3, 4, 8, 8, 4, 4),) * 2 + (BlockConfig(7, 6, None, None, None, None),) * 4)
    s = cfg.to_string()
    assert s.startswith("d2,2,2|k3e4w8a8d4a4,k3e4w8a8d4a4,k7e6wfafdfaf")
    for bad in ("2,2,2|k3e4w8a8d4a4", "d2,x|k3e4w8a8d4a4", "d1|k3e4w8a8"):
        with pytest.raises(ValueError):
            SubnetConfig.from_string(bad)
    with pytest.raises(ValueError, match="blocks but depths"):
        SubnetConfig((2, 2), (BlockConfig(3, 4),))


def test_largest_smallest_and_validate() -> None:
    big, small = SPACE.largest(), SPACE.smallest()
    assert big.depths == (4, 4, 4) and all(b == BlockConfig(7, 6, 8, 8, 8, 8) for b in big.blocks)
    assert small.depths == (2, 2, 2) and all(b == BlockConfig(3, 3, 2, 2, 2, 2) for b in small.blocks)
    assert SPACE.largest(bits=None).blocks[0].bits == (None,) * 4
    SPACE.validate(big)
    SPACE.validate(SPACE.largest(bits=None))  # float is always allowed
    bad = [
        (SubnetConfig((4, 4), big.blocks[:8]), "stages"),
        (SubnetConfig((5, 4, 3), (big.blocks[0],) * 12), "depth 5"),
        (SubnetConfig(small.depths, (BlockConfig(9, 3, 8, 8, 8, 8),) * 6), "kernel 9"),
        (SubnetConfig(small.depths, (BlockConfig(3, 5, 8, 8, 8, 8),) * 6), "expand 5"),
        (SubnetConfig(small.depths, (BlockConfig(3, 3, 8, 6, 8, 8),) * 6), "pw_a bits 6"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            SPACE.validate(cfg)


def test_sample_mutate_crossover_stay_in_space() -> None:
    rng = np.random.default_rng(0)
    seen_depths, seen_bits = set(), set()
    for _ in range(200):
        a, b = SPACE.sample(rng), SPACE.sample(rng)
        for cfg in (a, SPACE.mutate(a, 0.3, rng), SPACE.crossover(a, b, rng)):
            SPACE.validate(cfg)
            seen_depths.update(cfg.depths)
            seen_bits.update(x for blk in cfg.blocks for x in blk.bits)
    assert seen_depths == set(SPACE.depth_choices) and seen_bits == set(SPACE.bit_choices)
    a = SPACE.sample(rng)
    assert SPACE.mutate(a, 0.0, rng) == a
    assert any(SPACE.mutate(a, 1.0, rng) != a for _ in range(5))
    # crossover of a config with itself is itself; float stays float under mutation
    assert SPACE.crossover(a, a, rng) == a
    f = SPACE.sample(rng, quantized=False)
    assert all(x is None for blk in SPACE.mutate(f, 1.0, rng).blocks for x in blk.bits)


def test_crossover_takes_genes_from_parents() -> None:
    rng = np.random.default_rng(1)
    a, b = SPACE.largest(), SPACE.smallest()
    for _ in range(20):
        c = SPACE.crossover(a, b, rng)
        for blk in c.blocks:
            assert blk.kernel in (3, 7) and blk.expand in (3, 6) and set(blk.bits) <= {2, 8}


def test_encode_one_hot_fixed_length() -> None:
    rng = np.random.default_rng(2)
    n = SPACE.encoding_size
    assert n == SPACE.num_slots * (3 + 3 + 4 * 3)
    codes = set()
    for _ in range(50):
        cfg = SPACE.sample(rng)
        v = SPACE.encode(cfg)
        assert v.shape == (n,) and v.dtype == np.float32 and set(np.unique(v)) <= {0.0, 1.0}
        slots = v.reshape(SPACE.num_slots, -1)
        active = slots.sum(axis=1) > 0
        assert active.sum() == len(cfg.blocks)
        assert np.all(slots[active].sum(axis=1) == 6)  # kernel + expand + 4 bit one-hots
        # inactive slots are the tail of each stage
        for s, d in enumerate(cfg.depths):
            assert active[s * SPACE.max_depth: s * SPACE.max_depth + d].all()
            assert not active[s * SPACE.max_depth + d: (s + 1) * SPACE.max_depth].any()
        codes.add(v.tobytes())
    assert len(codes) == 50
    f = SPACE.encode(SPACE.largest(bits=None)).reshape(SPACE.num_slots, -1)
    assert np.all(f.sum(axis=1) == 2)
    # bits matter in the code: W8 vs W2 differ in exactly the bit one-hots
    d = SPACE.encode(SPACE.largest(8)) - SPACE.encode(SPACE.largest(2))
    assert np.abs(d).sum() == 2 * 4 * SPACE.num_slots


def test_restrict_bits_to_a_target() -> None:
    sp = SPACE.restrict_bits((1, 4, 8))
    assert sp.bit_choices == (4, 8) and sp.kernel_choices == SPACE.kernel_choices
    rng = np.random.default_rng(3)
    assert all(set(b.bits) <= {4, 8} for b in sp.sample(rng).blocks)
    with pytest.raises(ValueError, match="W2|bits 2"):
        sp.validate(SPACE.smallest())
    with pytest.raises(ValueError, match="no bit-width in common"):
        SPACE.restrict_bits((16,))


def test_parse_bits() -> None:
    assert parse_bits("W8A8") == (8, 8) and parse_bits("w2a4") == (2, 4) and parse_bits("float") == (None, None)
    with pytest.raises(ValueError, match="bad bit policy"):
        parse_bits("int8")
