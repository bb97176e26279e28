"""Payload codec and channel model: known answers, bounds, unbiasedness, budgets, rejection."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from haflq_flower.quant import channel
from haflq_flower.quant.payload import (
    ComponentSet,
    Layout,
    PayloadError,
    allocate_widths,
    component_cost,
    decode,
    dequantize,
    encode,
    encode_within_budget,
    pack_codes,
    quantize,
    record_bytes,
    unpack_codes,
)

DIMS = ((6, 5), (6, 3))  # (d_in, d_out) of two modules
LAYOUT = Layout(module_dims=DIMS, rank=4, head_shapes={"score.weight": (2, 5)})


def _components(n_per_module=4, seed=0):
    rng = np.random.default_rng(seed)
    keys, a, b = [], [], []
    for m, (d_in, d_out) in enumerate(DIMS):
        for i in range(n_per_module):
            keys.append((m, i))
            a.append(rng.normal(size=d_in).astype(np.float32))
            b.append(rng.normal(size=d_out).astype(np.float32))
    return ComponentSet(np.array(keys), a, b)


HEAD = {"score.weight": np.arange(10, dtype=np.float32).reshape(2, 5) / 10}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("count", [1, 3, 5, 7, 8, 13])
def test_pack_unpack_round_trip_odd_lengths(bits, count):
    codes = np.random.default_rng(count).integers(0, 1 << bits, size=count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert len(packed) == math.ceil(count * bits / 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


def test_pack_known_bytes():
    # 2-bit codes 1, 2, 3, 0 -> 0b00_11_10_01 = 0x39 (first code in the low bits)
    assert pack_codes(np.array([1, 2, 3, 0]), 2).tolist() == [0x39]
    assert pack_codes(np.array([0xA, 0x5, 0x1]), 4).tolist() == [0x5A, 0x01]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_error_within_one_step(bits):
    rng = np.random.default_rng(bits)
    lengths = np.array([7, 1, 30, 2])
    flat = rng.normal(size=lengths.sum()).astype(np.float32) * 3
    codes, lo, scale = quantize(flat, lengths, bits, rng)
    back = dequantize(codes, lo, scale, lengths)
    step = np.repeat(scale, lengths)
    # stochastic rounding moves a value to one of its two neighbouring levels
    assert np.all(np.abs(back - flat) <= step + 1e-6)
    # min and max are exact (the levels at 0 and 2^b - 1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    np.testing.assert_allclose(np.minimum.reduceat(back, starts), lo, atol=1e-6)


def test_constant_and_length_one_vectors_are_exact():
    flat = np.array([2.5, 2.5, 2.5, -1.0], dtype=np.float32)
    codes, lo, scale = quantize(flat, np.array([3, 1]), 2, np.random.default_rng(0))
    np.testing.assert_array_equal(dequantize(codes, lo, scale, np.array([3, 1])), flat)


def test_stochastic_rounding_is_unbiased():
    """Mean of N decodes is within 5 standard errors of the true value (fixed seed)."""
    rng = np.random.default_rng(123)
    x = np.array([0.0, 0.13, 0.5, 0.77, 1.0], dtype=np.float32)  # lo 0, hi 1
    n, bits = 4000, 2
    scale = 1.0 / 3
    total = np.zeros_like(x, dtype=np.float64)
    for _ in range(n):
        codes, lo, sc = quantize(x, np.array([5]), bits, rng)
        total += dequantize(codes, lo, sc, np.array([5]))
    mean = total / n
    # a value between two levels is a scaled Bernoulli: std <= scale / 2 per draw
    tolerance = 5 * (scale / 2) / math.sqrt(n)
    assert np.all(np.abs(mean - x) <= tolerance)
    # ... while deterministic rounding would be off by up to scale / 2 = 0.167
    assert tolerance < 0.02


def test_sixteen_bit_round_trip_exact_up_to_fp16():
    comps = _components()
    widths = np.full(len(comps.keys), 16)
    arrays = encode(comps, widths, HEAD, np.random.default_rng(0))
    keys, got_w, a, b, head = decode(arrays, LAYOUT)
    assert (got_w == 16).all() and keys.tolist() == comps.keys.tolist()
    for j in range(len(keys)):
        np.testing.assert_array_equal(a[j], comps.a[j].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(b[j], comps.b[j].astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(head["score.weight"], HEAD["score.weight"], atol=1e-3)


def test_mixed_widths_decode_to_their_components():
    comps = _components()
    widths = np.array([16, 8, 4, 2, 0, 2, 4, 16])
    arrays = encode(comps, widths, HEAD, np.random.default_rng(0))
    keys, got_w, a, b, _ = decode(arrays, LAYOUT)
    assert sorted(map(tuple, keys.tolist())) == sorted(map(tuple, comps.keys[widths > 0].tolist()))
    by_key = {
        tuple(k): (w, av, bv) for k, w, av, bv in zip(keys.tolist(), got_w, a, b, strict=True)
    }
    for j, key in enumerate(map(tuple, comps.keys.tolist())):
        if widths[j] == 0:
            assert key not in by_key
            continue
        w, av, bv = by_key[key]
        assert w == widths[j]
        span = max(np.ptp(comps.a[j]), 1e-9)
        tol = 1e-2 * span if w == 16 else span / ((1 << w) - 1) + 1e-6
        assert np.all(np.abs(av - comps.a[j]) <= tol)


def test_codes_are_really_packed():
    comps = _components()
    two = encode(comps, np.full(8, 2), HEAD, np.random.default_rng(0))
    total = sum(len(a) + len(b) for a, b in zip(comps.a, comps.b, strict=True))
    assert two["code.2"].nbytes == math.ceil(total * 2 / 8)
    # Flower counts exactly our size model
    record = ArrayRecord({k: Array(v) for k, v in two.items()})
    assert record.count_bytes() == record_bytes(two)


def test_allocation_greedy_known_answer():
    lengths = [100, 100, 100]
    c2, c4 = component_cost(100, 2), component_cost(100, 4)
    # budget: everyone at 2 bits, plus one upgrade to 4 bits for the most important
    budget = 3 * c2 + (c4 - c2)
    widths = allocate_widths([0.1, 0.9, 0.5], lengths, budget)
    assert widths.tolist() == [2, 4, 2]
    # too small for all: the least important is dropped
    assert allocate_widths([0.1, 0.9, 0.5], lengths, 2 * c2).tolist() == [0, 2, 2]
    # plenty: everything at 16
    assert allocate_widths([1, 2, 3], lengths, 10**9).tolist() == [16, 16, 16]
    # nothing fits
    assert allocate_widths([1, 2], lengths[:2], 10).tolist() == [0, 0]


def test_allocation_fits_is_maximal_and_sends_more_with_more_budget():
    rng = np.random.default_rng(5)
    imp, lengths = rng.random(20), rng.integers(10, 500, 20)
    steps = {2: 4, 4: 8, 8: 16}
    prev_sent = -1
    for budget in range(0, 20000, 997):
        w = allocate_widths(imp, lengths, budget)
        used = sum(component_cost(int(n), int(b)) for n, b in zip(lengths, w, strict=True))
        assert used <= budget
        for n, b in zip(lengths, w, strict=True):  # no single one-level upgrade still fits
            if b in steps:
                extra = component_cost(int(n), steps[b]) - component_cost(int(n), int(b))
                assert used + extra > budget
            if b == 0:
                assert used + component_cost(int(n), 2) > budget
        sent = int((w > 0).sum())
        assert sent >= prev_sent
        prev_sent = sent


@pytest.mark.parametrize("budget", [0, 400, 900, 1500, 2500, 5000, 100000])
def test_encoded_size_never_exceeds_the_budget(budget):
    comps = _components(seed=budget)
    imp = np.random.default_rng(budget).random(len(comps.keys))
    arrays, widths = encode_within_budget(comps, imp, HEAD, budget, np.random.default_rng(0))
    fixed = record_bytes(
        encode(ComponentSet(np.zeros((0, 2)), [], []), np.zeros(0), HEAD, np.random.default_rng(0))
    )
    if budget >= fixed:
        assert record_bytes(arrays) <= budget
    else:  # not even the head fits: nothing else is sent
        assert not widths.any()
    if budget >= 100000:
        assert (widths == 16).all()


def _payload():
    return dict(
        encode(_components(), np.array([16, 8, 4, 2, 0, 2, 4, 16]), HEAD, np.random.default_rng(0))
    )


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda p: p.pop("code.4"), "missing"),
        (lambda p: p.__setitem__("code.4", p["code.4"][:-1]), "code.4"),
        (lambda p: p.__setitem__("val.16", p["val.16"][:-3]), "val.16"),
        (lambda p: p.__setitem__("idx.2", np.array([[0, 9]], np.int32)), "out of range"),
        (lambda p: p.__setitem__("idx.2", np.array([[7, 0]], np.int32)), "out of range"),
        (lambda p: p.__setitem__("idx.8", np.array([[0, 0]], np.int32)), "more than once"),
        (lambda p: p.__setitem__("meta", np.array([99], np.int32)), "format"),
        (lambda p: p.__setitem__("scale.8", np.array([np.nan, 1.0], np.float32)), "non-finite"),
        (lambda p: p.__setitem__("lo.2", p["lo.2"][:1]), "lo.2"),
    ],
)
def test_malformed_payload_is_rejected(tamper, match):
    payload = _payload()
    tamper(payload)
    with pytest.raises(PayloadError, match=match):
        decode(payload, LAYOUT)


def test_huge_claimed_index_allocates_nothing():
    """A payload naming a billion components fails on its shapes, not on memory."""
    payload = _payload()
    payload["idx.4"] = np.zeros((1, 2), np.int32)
    payload["code.4"] = np.zeros(10**6, np.uint8)  # claims far more codes than the layout allows
    with pytest.raises(PayloadError, match="code.4"):
        decode(payload, LAYOUT)


def test_channel_model_known_values():
    assert channel.path_loss_db(1.0) == pytest.approx(128.1)
    assert channel.path_loss_db(10.0) == pytest.approx(165.7)
    # d = 1 km: SNR = 0.1 W * 10^-12.81 / (10^-20.4 W/Hz * 1e6 Hz) = 10^0.59 * ... computed:
    snr = 0.1 * 10 ** (-12.81) / (10 ** (-20.4) * 1e6)
    assert channel.shannon_rate_bps(1e6, 0.1, 1.0) == pytest.approx(1e6 * math.log2(1 + snr))
    # farther -> slower; more power -> faster
    assert channel.shannon_rate_bps(1e6, 0.1, 2.0) < channel.shannon_rate_bps(1e6, 0.1, 1.1)
    assert channel.shannon_rate_bps(1e6, 0.2, 1.5) > channel.shannon_rate_bps(1e6, 0.1, 1.5)
    assert channel.round_budget_bits(1e6, 2.5) == 2_500_000
    assert channel.spread_distances(3) == pytest.approx([2.0, 1.55, 1.1])
    with pytest.raises(ValueError):
        channel.path_loss_db(0)
