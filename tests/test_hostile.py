"""Hostile values and self-reported profiles (issue 20; issue 19 part 6): none of them can
crash a round, put a non-finite value into the global state or the importance, or take
over an average. Every test here failed on the code before the fix (see the note at each)."""

import logging
import tracemalloc
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from haflq_flower.lora.robust import clip_weights
from haflq_flower.lora.state import from_array_record, to_array_record
from haflq_flower.profiles import ClientProfile, ProfileError
from haflq_flower.quant import channel
from haflq_flower.quant.payload import (
    ComponentSet,
    Layout,
    PayloadError,
    bound_budget,
    decode,
    encode,
    fixed_payload_bytes,
    max_payload_bytes,
    record_bytes,
)
from haflq_flower.strategy import FedIT, HAFLQStrategy
from haflq_flower.untrusted import FLOAT32_MAX, printable, within
from haflq_flower.wire import SCORES_KEY

from .test_haflq_strategy import D_IN, D_OUT, TIERS, FakeGrid, RawProfileGrid, _reply, _round
from .test_reliability import _fedit_reply, _fedit_round

INT64_MAX = 2**63 - 1


# ------------------------------------------------------------------ profiles


@pytest.mark.parametrize(
    "field, value",
    [
        ("uplink-bps", 1e308),
        ("uplink-bps", 1e20),
        ("uplink-bps", 10**400),
        ("distance-km", 1e-100),
        ("distance-km", 1e300),
        ("memory-mb", 1e300),
        ("lora-rank", 10**30),
        ("tier", "edge\nINFO haflq forged line"),
        ("tier", "x" * 1000),
    ],
)
def test_absurd_profile_fields_are_refused_with_the_field_named(field, value):
    # old code: 1e308, 1e20, 1e-100, 1e300, 10**30 and the tiers were all accepted
    with pytest.raises(ProfileError, match=field):
        ClientProfile.from_mapping({field: value})


def test_server_caps_claimed_uplink_and_memory():
    profile = ClientProfile.from_mapping({"uplink-bps": 1e12, "memory-mb": 1e8})
    capped, note = profile.capped(max_uplink_bps=1e9, max_memory_mb=262144)
    assert capped.uplink_bps == 1e9 and capped.memory_mb == 262144
    assert "uplink-bps" in note and "memory-mb" in note
    assert profile.capped(0, 0) == (profile, "")


def test_channel_functions_do_not_overflow():
    # old code: OverflowError (10 ** 363 in the path-loss gain; int(inf) in the budget)
    rate = channel.shannon_rate_bps(1e6, 0.1, 1e-100)
    assert np.isfinite(rate) and rate > channel.shannon_rate_bps(1e6, 0.1, 1.0)
    assert channel.round_budget_bits(1e308, 3.0) == channel.MAX_BUDGET_BITS <= INT64_MAX
    assert channel.round_budget_bits(float("inf"), 3.0) == channel.MAX_BUDGET_BITS
    # the decibel form agrees with the linear one where both work
    for d in (0.05, 1.0, 1.5, 2.0, 30.0):
        gain = channel.channel_gain(d)
        linear = 1e6 * np.log2(1 + 0.1 * gain / (10 ** (-20.4) * 1e6))
        assert channel.shannon_rate_bps(1e6, 0.1, d) == pytest.approx(linear, rel=1e-12)


@pytest.mark.parametrize(
    "record",
    [
        {"uplink-bps": 1e308},
        {"distance-km": 1e-100},
        {"uplink-bps": 1e20},
        {"uplink-bps": 1e12},
        {"memory-mb": 1e300, "lora-rank": 2},
        {"lora-rank": 2**62},
        {"tier": "a\r\nb"},
    ],
)
def test_hostile_profiles_never_kill_the_round(record):
    """Old code: OverflowError in configure_train for 1e308/1e-100, a budget that does
    not fit int64 for 1e20, a 375 GB budget for 1e12."""
    grid = RawProfileGrid({1: record, 2: {"tier": "mid", "lora-rank": 4}})
    strategy = HAFLQStrategy(mode="truncate")
    state, msgs = _round(strategy, grid)
    largest = max_payload_bytes([D_IN + D_OUT] * 16, {"score.weight": (2, D_OUT)})
    for node, msg in msgs.items():
        budget = msg.content["config"]["uplink-budget-bytes"]
        assert isinstance(budget, int) and 0 < budget <= largest
        assert strategy.stats[1].clients[node].budget_bytes == budget
    # a valid reply from the hostile node still works; the round completes
    arrays, _ = strategy.aggregate_train(1, [_reply(msgs[1], 10), _reply(msgs[2], 10)])
    assert all(np.isfinite(v).all() for v in from_array_record(arrays).values())


def test_uplink_budget_below_the_fixed_part_is_raised_and_recorded():
    """Issue 19 part 6. Old code: the 3-byte budget was assigned, the client sent its
    fixed part (over budget) and the reply was rejected whole: head delta and scores lost."""
    grid = RawProfileGrid({1: {"tier": "slow", "lora-rank": 2, "uplink-bps": 8.0}})
    strategy = HAFLQStrategy(mode="truncate", channel=None)
    state, msgs = _round(strategy, grid)
    fixed = fixed_payload_bytes({"score.weight": (2, D_OUT)})
    client = strategy.stats[1].clients[1]
    assert msgs[1].content["config"]["uplink-budget-bytes"] == fixed == client.budget_bytes
    assert client.channel_budget_bytes == 3  # 8 bit/s x 3 s / 8
    assert client.budget_note == "raised to the fixed part"
    out = from_array_record(strategy.aggregate_train(1, [_reply(msgs[1], 10, 0.25)])[0])
    assert strategy.stats[1].rejected == [] and client.components_up == 0
    # the head delta arrived (float16-exact 0.25); no component moved; scores folded in
    np.testing.assert_allclose(out["score.weight"] - state["score.weight"], 0.25, atol=1e-3)
    np.testing.assert_array_equal(out["m.q.lora_A.weight"], state["m.q.lora_A.weight"])
    assert strategy.importance.seen["m.q"][:2].all()


def test_budget_bounds_known_answers():
    head = {"score.weight": (2, 5)}
    fixed = fixed_payload_bytes(head)
    largest = max_payload_bytes([11, 11, 9], head)
    assert bound_budget(0, fixed, largest) == (fixed, "raised to the fixed part")
    assert bound_budget(fixed + 10, fixed, largest) == (fixed + 10, "")
    assert bound_budget(10**18, fixed, largest) == (largest, "capped at the largest payload")
    # every component at 16 bits (its costliest width for these lengths) fits the bound
    comps = ComponentSet(
        np.array([[0, 0], [0, 1], [1, 0]]),
        [np.ones(6, np.float32), np.ones(6, np.float32), np.ones(6, np.float32)],
        [np.ones(5, np.float32), np.ones(5, np.float32), np.ones(3, np.float32)],
    )
    heads = {"score.weight": np.zeros((2, 5), np.float32)}
    for w in (16, 8, 4, 2):
        size = record_bytes(encode(comps, np.full(3, w), heads, np.random.default_rng(0)))
        assert size <= largest


# ------------------------------------------------------ values beyond float32


def _fedit_with(values: dict[str, np.ndarray], **kwargs):
    strategy = FedIT(**kwargs)
    state, msgs = _fedit_round(strategy, nodes=(1, 3))
    good = _fedit_reply(msgs[3], state, 0.5, n=20)
    content = RecordDict(
        {
            "arrays": to_array_record(values(state)),
            "metrics": MetricRecord({"num-examples": 20, "train-loss": 0.5}),
        }
    )
    bad = Message(content=content, reply_to=msgs[1])
    return strategy, state, [bad, good]


def _alone(state, shift=0.5):
    return {k: (v + np.float32(shift)).astype(np.float32) for k, v in state.items()}


@pytest.mark.parametrize("value", [1e39, -1e300, 3.5e38])
def test_float64_beyond_float32_range_is_rejected_in_fedit(value):
    """Old code: float64 1e39 passed the finiteness check and became Inf in the global."""

    def poisoned(state):
        out = OrderedDict((k, v.astype(np.float64)) for k, v in state.items())
        out["score.weight"].flat[0] = value
        return out

    strategy, state, replies = _fedit_with(poisoned)
    out = from_array_record(strategy.aggregate_train(1, replies)[0])
    assert [r["node"] for r in strategy.stats[1].rejected] == [1]
    assert "beyond" in strategy.stats[1].rejected[0]["reason"]
    for k, v in _alone(state).items():
        np.testing.assert_array_equal(out[k], v)


def test_clipping_cannot_raise_and_never_sees_out_of_range_values():
    """Old code: a float64 1e200 passed validation, its squared norm was Inf and
    clip_scales raised outside the per-reply guard: aggregate_train raised, the run died.
    Now it is rejected, and float32 values at the edge of the range clip without raising."""

    def beyond(state):
        out = OrderedDict((k, v.astype(np.float64)) for k, v in state.items())
        out["score.weight"].flat[0] = 1e200
        return out

    strategy, state, replies = _fedit_with(beyond, clip_factor=2.0)
    out = from_array_record(strategy.aggregate_train(1, replies)[0])
    assert [r["node"] for r in strategy.stats[1].rejected] == [1]
    for k, v in _alone(state).items():
        np.testing.assert_array_equal(out[k], v)

    def extreme(state):
        return OrderedDict(
            (k, np.where(v >= 0, -FLOAT32_MAX, FLOAT32_MAX).astype(np.float32))
            for k, v in state.items()
        )

    strategy, state, replies = _fedit_with(extreme, clip_factor=2.0)
    out = from_array_record(strategy.aggregate_train(1, replies)[0])
    assert all(np.isfinite(v).all() and within(v, FLOAT32_MAX) for v in out.values())
    assert "1" in strategy.stats[1].extra["clipped"]


@pytest.mark.parametrize("uplink", ["fp32", "adaptive"])
def test_haflq_rejects_values_beyond_what_the_downlink_can_carry(uplink):
    """The global is sent in float16 (default downlink): a delta that takes it beyond
    65504 would be Inf on every client next round. Old code accepted it (and a float64
    1e39 delta became Inf in the fp32 path)."""
    # the adaptive reply is all 16-bit here (node 1's budget is large): global + 65504
    # leaves float16's range wherever the global is > 0

    def huge(records):
        if uplink == "fp32":
            arrays = from_array_record(records["arrays"])
            arrays = OrderedDict((k, v.astype(np.float64)) for k, v in arrays.items())
            arrays["score.weight"].flat[0] = 1e39
            records["arrays"] = to_array_record(arrays)
        else:  # float16's largest value everywhere, and 1e30 as the 8/4/2-bit offsets
            payload = from_array_record(records["payload"])
            payload["val.16"] = np.full_like(payload["val.16"], 65504)
            for bits in (8, 4, 2):
                payload[f"lo.{bits}"] = np.full_like(payload[f"lo.{bits}"], 1e30)
            records["payload"] = to_array_record(payload)

    strategy = HAFLQStrategy(mode="truncate", uplink=uplink)
    state, msgs = _round(strategy, FakeGrid(dict(TIERS)))
    bad = _reply(msgs[1], 10, 1.0, tamper=huge)
    out = from_array_record(strategy.aggregate_train(1, [bad, _reply(msgs[3], 60, 4.0)])[0])
    assert [r["node"] for r in strategy.stats[1].rejected] == [1]
    np.testing.assert_allclose(
        out["m.q.lora_A.weight"][0] - state["m.q.lora_A.weight"][0], 4.0, rtol=1e-6
    )


# ------------------------------------------------------------- importance


@pytest.mark.parametrize("score", [1e300, 1.7e308, np.inf])
def test_scores_beyond_float32_are_rejected_and_importance_stays_finite(score):
    """Old code: 1e300 was accepted (the float64 check only refused Inf); with two
    reporters 1.7e308 summed to Inf in the global importance, which never decays."""

    def tamper(records):
        scores = from_array_record(records[SCORES_KEY])
        records[SCORES_KEY] = to_array_record(
            {m: np.full(v.shape, score, np.float64) for m, v in scores.items()}
        )

    strategy = HAFLQStrategy(mode="truncate", uplink="fp32")
    state, msgs = _round(strategy, FakeGrid(dict(TIERS)))
    replies = [_reply(msgs[1], 10, tamper=tamper), _reply(msgs[2], 10, tamper=tamper)]
    strategy.aggregate_train(1, [*replies, _reply(msgs[3], 60)])
    assert sorted(r["node"] for r in strategy.stats[1].rejected) == [1, 2]
    assert all(np.isfinite(v).all() for v in strategy.importance.scores.values())
    np.testing.assert_allclose(strategy.importance.scores["m.q"], np.arange(1, 9))


def test_score_clip_keeps_one_reply_from_fixing_the_selection():
    """A huge but float32-finite score is capped at 10x the typical maximum, and the
    smoothing lets honest reports bring it back within rounds, not never."""

    def tamper(records):
        scores = from_array_record(records[SCORES_KEY])
        records[SCORES_KEY] = to_array_record(
            {m: np.full(v.shape, 1e30) for m, v in scores.items()}
        )

    strategy = HAFLQStrategy(mode="truncate", uplink="fp32", score_clip=10.0)
    state, msgs = _round(strategy, FakeGrid(dict(TIERS)))
    replies = [_reply(msgs[1], 10, tamper=tamper), _reply(msgs[2], 10), _reply(msgs[3], 10)]
    strategy.aggregate_train(1, replies)
    # per-reply maxima 1e30, 4, 8 -> lower median 8 -> cap 80
    assert strategy.importance.scores["m.q"].max() <= 80.0


# -------------------------------------------------- replies and instructions


def test_a_node_answering_twice_has_both_replies_rejected():
    """Old code: both replies were aggregated, counting the node twice."""
    strategy = FedIT()
    state, msgs = _fedit_round(strategy, nodes=(1, 3))
    replies = [
        _fedit_reply(msgs[1], state, 9.0, n=20),
        _fedit_reply(msgs[1], state, 9.0, n=20),
        _fedit_reply(msgs[3], state, 0.5, n=20),
    ]
    out = from_array_record(strategy.aggregate_train(1, replies)[0])
    assert [r["node"] for r in strategy.stats[1].rejected] == [1, 1]
    assert "answered 2 times" in strategy.stats[1].rejected[0]["reason"]
    for k, v in _alone(state).items():
        np.testing.assert_array_equal(out[k], v)


def _forged(dst, message_type=MessageType.TRAIN, group_id="1"):
    return Message(
        content=RecordDict({"config": ConfigRecord()}),
        dst_node_id=dst,
        message_type=message_type,
        group_id=group_id,
    )


@pytest.mark.parametrize(
    "forged, reason",
    [
        ({"dst": 2}, "not sent a training instruction"),  # node 2 was not sampled
        ({"dst": 1, "message_type": MessageType.EVALUATE}, "message type"),
        ({"dst": 1, "group_id": "7"}, "round"),
    ],
)
@pytest.mark.parametrize("make", [FedIT, lambda: HAFLQStrategy(mode="truncate", uplink="fp32")])
def test_replies_must_answer_this_rounds_instruction(forged, reason, make):
    """Old code: FedIT aggregated a reply from a node it never sampled, and neither
    strategy looked at the message type or the round."""
    instruction = _forged(**forged)
    strategy = make()
    if isinstance(strategy, FedIT):
        state, msgs = _fedit_round(strategy, nodes=(1, 3))
        bad = _fedit_reply(instruction, state, 9.0, n=20)
        good = _fedit_reply(msgs[3], state, 0.5, n=20)
    else:
        state, msgs = _round(strategy, FakeGrid({1: TIERS[1], 3: TIERS[3]}))
        content = _reply(msgs[1], 20, 9.0).content
        bad = Message(content=content, reply_to=instruction)
        good = _reply(msgs[3], 20, 0.5)
    out = from_array_record(strategy.aggregate_train(1, [bad, good])[0])
    rejected = strategy.stats[1].rejected
    assert len(rejected) == 1 and reason in rejected[0]["reason"]
    ref = make()
    if isinstance(ref, FedIT):
        state2, msgs2 = _fedit_round(ref, nodes=(1, 3))
        alone = [_fedit_reply(msgs2[3], state2, 0.5, n=20)]
    else:
        _, msgs2 = _round(ref, FakeGrid({1: TIERS[1], 3: TIERS[3]}))
        alone = [_reply(msgs2[3], 20, 0.5)]
    expected = from_array_record(ref.aggregate_train(1, alone)[0])
    for k in expected:
        np.testing.assert_array_equal(out[k], expected[k])


def test_device_strings_are_escaped_in_logs(caplog):
    """Old code: an error reason with a newline forged a second log line."""
    strategy = FedIT()
    state, msgs = _fedit_round(strategy, nodes=(1, 3))
    forged = "out of memory\nWARNING haflq round 1: node 3 rejected: forged"
    replies = [Message(Error(code=0, reason=forged), reply_to=msgs[1])]
    with caplog.at_level(logging.WARNING, logger="haflq_flower"):
        strategy.aggregate_train(1, [*replies, _fedit_reply(msgs[3], state, 0.5)])
    assert caplog.records and all("\n" not in r.getMessage() for r in caplog.records)
    assert "\\n" in strategy.stats[1].rejected[0]["reason"]
    assert printable("a\x1b[31mb\u202e") == "a\\x1b[31mb\\u202e"


# ---------------------------------------------------------- example counts


def test_weight_clip_keeps_one_client_from_taking_the_average():
    """Old code: no weight cap (FedIT had no weight_clip); 10^7 claimed examples took
    99.9% of the average."""
    assert clip_weights([10, 10, 10**7], 5.0).tolist() == [10, 10, 50]
    strategy = FedIT(weight_clip=5.0)
    state, msgs = _fedit_round(strategy)
    replies = [
        _fedit_reply(msgs[1], state, 0.0, n=10),
        _fedit_reply(msgs[2], state, 0.0, n=10),
        _fedit_reply(msgs[3], state, 7.0, n=10**7),
    ]
    out = from_array_record(strategy.aggregate_train(1, replies)[0])
    np.testing.assert_allclose(out["score.weight"], state["score.weight"] + 7 * 50 / 70, rtol=1e-5)
    assert strategy.stats[1].extra["weight_clipped"] == {"3": 50}
    assert strategy.stats[1].clients[3].num_examples == 10**7  # what it claimed, recorded


# ------------------------------------------------------------ the decoder

BIG = Layout(module_dims=((256, 256),) * 4, rank=16, head_shapes={"score.weight": (2, 256)})


def _big_payload(keys: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    comps = ComponentSet(
        keys,
        [rng.normal(size=256).astype(np.float32) for _ in keys],
        [rng.normal(size=256).astype(np.float32) for _ in keys],
    )
    head = {"score.weight": np.zeros((2, 256), np.float32)}
    return dict(encode(comps, np.full(len(keys), bits), head, rng))


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    except PayloadError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_duplicate_payload_is_rejected_before_anything_is_dequantized():
    """Old code: every group was dequantized (float32: 16x the 2-bit codes) before the
    duplicate check. Now the check comes first: rejecting costs a fraction of the
    payload's own bytes, and an honest payload's decode stays a small multiple of the
    float32 vectors it decodes into."""
    honest_keys = np.array([(m, i) for m in range(4) for i in range(16)])
    honest = _big_payload(honest_keys, 2)
    honest_bytes = record_bytes(honest)
    dup = _big_payload(np.repeat(honest_keys, 8, axis=0), 2)  # every component 8 times
    dup_bytes = record_bytes(dup)
    with pytest.raises(PayloadError, match="more than once"):
        decode(dup, BIG)
    assert _peak(lambda: decode(dup, BIG)) < 0.5 * dup_bytes
    decoded_bytes = 4 * 64 * 512  # float32 a and b of 64 components
    assert _peak(lambda: decode(honest, BIG)) < 4 * decoded_bytes
    assert honest_bytes < decoded_bytes  # the honest payload is 2-bit: ~1/16 of float32


def test_widths_outside_the_allowed_ones_are_rejected():
    """Old code: the decoder accepted any of 16/8/4/2 whatever payload.widths said."""
    payload = _big_payload(np.array([[0, 0], [1, 3]]), 16)
    with pytest.raises(PayloadError, match="allowed widths"):
        decode(payload, BIG, allowed_widths=(8, 4, 2))
    decode(payload, BIG, allowed_widths=(16, 8))


def test_haflq_budget_for_a_huge_claimed_uplink_is_the_largest_payload():
    """Old code: a claimed 1e12 bit/s gave a 375 GB budget; now the claim is capped at
    profile.max-uplink-bps and the budget at the largest payload of the assignment."""
    grid = RawProfileGrid({1: {"tier": "fast", "lora-rank": 2, "uplink-bps": 1e12}})
    strategy = HAFLQStrategy(mode="truncate")
    _, msgs = _round(strategy, grid)
    client = strategy.stats[1].clients[1]
    largest = max_payload_bytes([D_IN + D_OUT] * 4, {"score.weight": (2, D_OUT)})
    assert client.budget_bytes == largest and client.budget_note.startswith("capped")
    assert strategy.profiles[1].uplink_bps == 1e9
    assert client.channel_budget_bytes == int(1e9 * 3.0) // 8


# ------------------------------------------------------------------ durability


def test_results_and_checkpoint_are_fsynced_with_their_directory(tmp_path, monkeypatch):
    """Old code: results.json was renamed without any fsync, and neither rename was made
    durable by syncing the run directory."""
    import os

    from haflq_flower.checkpoint import save_checkpoint
    from haflq_flower.results import write_json_atomic

    from .test_haflq_strategy import _global

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_json_atomic(tmp_path / "results.json", {"rounds": []})
    assert synced == [str(tmp_path / "results.json.tmp"), str(tmp_path)]
    synced.clear()
    save_checkpoint(tmp_path, 1, {}, _global(), ({}, {}), {}, 0.0)
    assert synced == [str(tmp_path / "checkpoint.npz.tmp"), str(tmp_path)]


def test_federated_evaluation_counts_one_in_range_reply_per_asked_node():
    """Old code: any evaluate reply counted, from any node, as often as it came, and a
    loss of 1e308 times its examples made the round's loss Inf."""
    from .test_reliability import NodesGrid

    strategy = FedIT(fraction_evaluate=1.0)
    state, _ = _fedit_round(strategy, nodes=(1, 3))
    msgs = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_evaluate(
            1, to_array_record(state), ConfigRecord(), NodesGrid((1, 3))
        )
    }

    def reply(to, n, acc, loss):
        metrics = MetricRecord({"num-examples": n, "accuracy": acc, "loss": loss})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=to)

    stranger = Message(
        content=RecordDict({"config": ConfigRecord()}),
        dst_node_id=2,
        message_type=MessageType.EVALUATE,
    )
    replies = [
        reply(msgs[1], 10, 0.5, 1e308),  # loss out of range: counted as 0
        reply(msgs[3], 30, 1.0, 0.2),
        reply(stranger, 10**6, 0.0, 9.0),  # node 2 was not asked
    ]
    out = strategy.aggregate_evaluate(1, replies)
    assert out["num-examples"] == 40 and out["accuracy"] == pytest.approx(35 / 40)
    assert out["loss"] == pytest.approx(30 * 0.2 / 40)
    twice = strategy.aggregate_evaluate(1, [*replies, reply(msgs[3], 30, 0.0, 0.2)])
    assert twice["num-examples"] == 10  # node 3 answered twice: neither counts
