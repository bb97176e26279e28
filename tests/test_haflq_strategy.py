"""HAFLQ and HetLoRA strategies with a fake grid: profiles, per-node messages, mixed ranks."""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from haflq_flower.config import ChannelConfig
from haflq_flower.lora.components import gather
from haflq_flower.lora.state import from_array_record, to_array_record
from haflq_flower.profiles import ClientProfile, TierTable, resolve_profile
from haflq_flower.strategy import HAFLQStrategy, HetLoRA
from haflq_flower.wire import (
    PROFILE_KEY,
    PROFILE_QUERY,
    SCORES_KEY,
    SELECTION_KEY,
    encode_upload,
    record_to_arrays,
    selection_to_record,
)

from .round_robin import RoundRobinSelection

R, D_IN, D_OUT = 8, 3, 4
MODS = ["m.q", "m.v"]


def _global() -> OrderedDict:
    rng = np.random.default_rng(0)
    state = OrderedDict()
    for m in MODS:
        state[f"{m}.lora_A.weight"] = rng.normal(size=(R, D_IN)).astype(np.float32)
        state[f"{m}.lora_B.weight"] = rng.normal(size=(D_OUT, R)).astype(np.float32)
    state["score.weight"] = rng.normal(size=(2, D_OUT)).astype(np.float32)
    return state


class FakeGrid:
    """Answers profile queries from a table; counts the queries it saw."""

    def __init__(self, profiles: dict[int, ClientProfile | None]):
        self.profiles = profiles
        self.queries: list[int] = []

    def get_node_ids(self):
        return list(self.profiles)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == PROFILE_QUERY
            node = msg.metadata.dst_node_id
            self.queries.append(node)
            profile = self.profiles[node]
            if profile is None:  # a node that answers nothing usable
                content = RecordDict({PROFILE_KEY: ConfigRecord({"lora-rank": -3})})
            else:
                content = RecordDict({PROFILE_KEY: ConfigRecord(profile.to_record())})
            reply = Message(content=content, reply_to=msg)
            replies.append(reply)
        return replies


def _reply(msg: Message, n: int, scale: float = 1.0, tamper=None) -> Message:
    """A client reply encoded by the real client code: constant deltas (exact at every bit
    width) for the assigned components, scores = index + 1."""
    sel = record_to_arrays(msg.content.array_records[SELECTION_KEY])
    sent = from_array_record(msg.content.array_records["arrays"])
    cfg = msg.content["config"]
    shapes = gather(sent, sel) if cfg["mode"] == "freeze" else sent
    delta = OrderedDict((k, np.full(v.shape, scale, np.float32)) for k, v in shapes.items())
    scores = {m: (idx + 1).astype(np.float32) for m, idx in sel.items()}
    records, _ = encode_upload(delta, sel, scores, MODS, cfg, np.random.default_rng(0))
    records = {
        **records,
        "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
    }
    if tamper:
        tamper(records)
    reply = Message(content=RecordDict(records), reply_to=msg)
    return reply


TIERS = {1: ClientProfile("low", 2), 2: ClientProfile("mid", 4), 3: ClientProfile("high", 8)}


def _round(strategy, grid, server_round=1, state=None):
    state = state or _global()
    msgs = list(
        strategy.configure_train(server_round, to_array_record(state), ConfigRecord(), grid)
    )
    return state, {m.metadata.dst_node_id: m for m in msgs}


def test_each_node_gets_its_rank_and_mode_and_profiles_are_queried_once():
    grid = FakeGrid(dict(TIERS))
    strategy = HAFLQStrategy(mode="truncate")
    state, msgs = _round(strategy, grid)
    assert sorted(grid.queries) == [1, 2, 3]
    for node, profile in TIERS.items():
        cfg = msgs[node].content["config"]
        assert cfg["rank"] == profile.lora_rank and cfg["mode"] == "truncate"
        sel = record_to_arrays(msgs[node].content.array_records[SELECTION_KEY])
        # round 1: all scores zero -> ties by index -> the first r_k
        assert all(idx.tolist() == list(range(profile.lora_rank)) for idx in sel.values())
        arrays = from_array_record(msgs[node].content.array_records["arrays"])
        assert arrays["m.q.lora_A.weight"].shape == (profile.lora_rank, D_IN)
    # downlink bytes grow with the rank in truncation mode
    down = {n: strategy.stats[1].clients[n].bytes_down for n in TIERS}
    assert down[1] < down[2] < down[3]
    _round(strategy, grid, server_round=2)
    assert sorted(grid.queries) == [1, 2, 3]  # no second query for known nodes


def test_freeze_mode_sends_the_whole_adapter_at_the_downlink_precision():
    strategy = HAFLQStrategy(mode="freeze")
    state, msgs = _round(strategy, FakeGrid(dict(TIERS)))
    for node in TIERS:
        arrays = from_array_record(msgs[node].content.array_records["arrays"])
        assert all(arrays[k].dtype == np.float16 for k in state)  # 16-bit downlink (default)
        assert all(np.array_equal(arrays[k], state[k].astype(np.float16)) for k in state)
    full = HAFLQStrategy(mode="freeze", downlink_bits=32)
    _, msgs32 = _round(full, FakeGrid(dict(TIERS)))
    arrays = from_array_record(msgs32[1].content.array_records["arrays"])
    assert all(np.array_equal(arrays[k], state[k]) for k in state)
    # half the array bytes down (the counted totals also carry npy headers and keys)
    half = from_array_record(msgs[1].content.array_records["arrays"])
    assert 2 * sum(v.nbytes for v in half.values()) == sum(v.nbytes for v in arrays.values())
    assert strategy.stats[1].bytes_down < full.stats[1].bytes_down


def test_mixed_rank_replies_aggregate_adaptively_and_update_importance():
    strategy = HAFLQStrategy(mode="truncate", aggregation="adaptive")
    state, msgs = _round(strategy, FakeGrid(dict(TIERS)))
    replies = [_reply(msgs[1], 10, 1.0), _reply(msgs[2], 30, 2.0), _reply(msgs[3], 60, 4.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_array_record(arrays)
    a = out["m.q.lora_A.weight"] - state["m.q.lora_A.weight"]
    # components 0-1: all three clients; 2-3: mid and high; 4-7: high only
    np.testing.assert_allclose(a[0], (10 * 1 + 30 * 2 + 60 * 4) / 100, rtol=1e-6)
    np.testing.assert_allclose(a[2], (30 * 2 + 60 * 4) / 90, rtol=1e-6)
    np.testing.assert_allclose(a[5], 4.0, rtol=1e-6)
    assert metrics["num-examples"] == 100
    # global importance: n-weighted mean of reported scores (index + 1 from everyone)
    np.testing.assert_allclose(strategy.importance.scores["m.q"], np.arange(1, R + 1))
    assert strategy.stats[1].extra["clients_per_component"] == [3, 3, 2, 2, 1, 1, 1, 1]
    # round 2: the low tier now gets the two most important components (6, 7)
    _, msgs2 = _round(strategy, FakeGrid(dict(TIERS)), server_round=2, state=out)
    sel = record_to_arrays(msgs2[1].content.array_records[SELECTION_KEY])
    assert sel["m.q"].tolist() == [6, 7]


def test_zero_pad_rule_divides_by_all_participants():
    strategy = HAFLQStrategy(mode="truncate", aggregation="zero-pad")
    state, msgs = _round(strategy, FakeGrid(dict(TIERS)))
    replies = [_reply(msgs[1], 10, 1.0), _reply(msgs[2], 30, 2.0), _reply(msgs[3], 60, 4.0)]
    out = from_array_record(strategy.aggregate_train(1, replies)[0])
    a = out["m.q.lora_A.weight"] - state["m.q.lora_A.weight"]
    np.testing.assert_allclose(a[5], 60 * 4 / 100, rtol=1e-6)


def test_hetlora_truncates_to_the_first_components_and_zero_pads_values():
    strategy = HetLoRA()
    state, msgs = _round(strategy, FakeGrid(dict(TIERS)))
    assert all(m.content["config"]["mode"] == "truncate" for m in msgs.values())
    replies = [_reply(msgs[n], 10 * n, float(n)) for n in TIERS]
    out = from_array_record(strategy.aggregate_train(1, replies)[0])
    # component 7 is held by the high tier only: its value is w_high * (global + delta)
    assert not np.allclose(out["m.q.lora_A.weight"][7], state["m.q.lora_A.weight"][7] + 3.0)


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda r: r.pop(SCORES_KEY), "lacks the 'scores'"),
        (
            lambda r: r.__setitem__(
                SELECTION_KEY, selection_to_record({m: np.array([0, 9]) for m in MODS})
            ),
            "out of range",
        ),
        (
            lambda r: r.__setitem__(
                SELECTION_KEY, selection_to_record({m: np.array([0, 5]) for m in MODS})
            ),
            "not assigned",
        ),
        (
            lambda r: r.__setitem__(
                "arrays",
                to_array_record(
                    {k: np.full_like(v, np.nan) for k, v in from_array_record(r["arrays"]).items()}
                ),
            ),
            "NaN",
        ),
        (
            lambda r: r.__setitem__(
                SCORES_KEY, to_array_record({m: np.array([-1.0, 1.0]) for m in MODS})
            ),
            "scores",
        ),
    ],
)
def test_malformed_replies_are_rejected_and_change_nothing(tamper, reason):
    strategy = HAFLQStrategy(mode="truncate", uplink="fp32")
    state, msgs = _round(strategy, FakeGrid(dict(TIERS)))
    replies = [_reply(msgs[1], 10, 1.0, tamper=tamper), _reply(msgs[3], 60, 4.0)]
    out = from_array_record(strategy.aggregate_train(1, replies)[0])
    rejected = strategy.stats[1].rejected
    assert [r["node"] for r in rejected] == [1] and reason in rejected[0]["reason"]
    # only node 3's update counts: component 0 moved by exactly its delta
    np.testing.assert_allclose(
        out["m.q.lora_A.weight"][0] - state["m.q.lora_A.weight"][0], 4.0, rtol=1e-6
    )


def test_node_without_usable_profile_gets_the_default():
    strategy = HAFLQStrategy(default_profile=ClientProfile("fallback", 3))
    _, msgs = _round(strategy, FakeGrid({1: TIERS[1], 2: None}))
    assert msgs[2].content["config"]["rank"] == 3
    assert strategy.profiles[2].tier == "fallback"


def test_a_subclass_changes_selection():
    strategy = RoundRobinSelection(mode="truncate")
    _, msgs = _round(strategy, FakeGrid({1: TIERS[1]}), server_round=3)
    sel = record_to_arrays(msgs[1].content.array_records[SELECTION_KEY])
    assert sel["m.q"].tolist() == [4, 5]


def test_profiles_from_tiers_and_node_config():
    tiers = TierTable.from_lists(["low", "mid", "high"], [2, 4, 8])
    got = [tiers.for_partition(p, 10).tier for p in range(10)]
    assert got == ["low"] * 3 + ["mid"] * 4 + ["high"] * 3
    assert resolve_profile({"partition-id": 9, "num-partitions": 10}, tiers).lora_rank == 8
    assert resolve_profile({"tier": "mid"}, tiers) == ClientProfile("mid", 4, 1.55)
    assert resolve_profile({"tier": "edge", "lora-rank": 6}, tiers) == ClientProfile("edge", 6)
    assert resolve_profile({}, tiers) == ClientProfile()
    assert ClientProfile("x", 0).budget(8) == 8 and ClientProfile("x", 20).budget(8) == 8
    with pytest.raises(ValueError, match="lora-rank"):
        ClientProfile.from_mapping({"lora-rank": -1})
    with pytest.raises(ValueError, match="tiers.lora-ranks"):
        TierTable.from_lists(["a", "b"], [2])


def test_a_registered_subclass_is_built_from_the_run_config(monkeypatch):
    from haflq_flower import strategy as registry
    from haflq_flower.config import ConfigError
    from haflq_flower.strategy import load_run_config

    with pytest.raises(
        ConfigError,
        match="known: fedex-lora, fedit, fedit-trunc, fedsa-lora, ffa-lora, flexlora, flora, "
        "haflq, hetlora, lora-fair",
    ):
        load_run_config({"strategy.name": "round-robin"})
    monkeypatch.setitem(registry.STRATEGIES, "round-robin", RoundRobinSelection)
    cfg = load_run_config({"strategy.name": "round-robin", "strategy.mode": "truncate"})
    built = registry.build_strategy(cfg)
    assert isinstance(built, RoundRobinSelection) and built.mode == "truncate"


def test_a_subclass_is_named_by_its_import_path():
    """What every process of a `flwr run` can resolve on its own (no registration)."""
    from haflq_flower import strategy as registry
    from haflq_flower.strategy import load_run_config

    path = "tests.round_robin:RoundRobinSelection"
    cfg = load_run_config({"strategy.name": path, "strategy.mode": "truncate"})
    built = registry.build_strategy(cfg)
    assert type(built) is RoundRobinSelection and built.mode == "truncate"
    assert built.offset == 0


def test_a_strategy_declares_its_own_run_config_keys():
    """``RoundRobinSelection.options``: its key is accepted (and checked) only with that
    strategy, reaches the strategy and the run config written to results.json, and a
    ClientApp accepts it too; a key the app already has cannot be redeclared."""
    from dataclasses import dataclass

    from haflq_flower import strategy as registry
    from haflq_flower.config import ConfigError, parse_run_config
    from haflq_flower.settings import setting
    from haflq_flower.strategy import load_run_config, parse_client_config

    path = "tests.round_robin:RoundRobinSelection"
    values = {"strategy.name": path, "strategy.mode": "truncate", "round-robin.offset": 3}
    cfg = load_run_config(values)
    assert cfg.options.offset == 3 and cfg.raw["round-robin.offset"] == 3
    assert parse_client_config(values).options.offset == 3
    built = registry.build_strategy(cfg)
    assert built.offset == 3
    _, msgs = _round(built, FakeGrid({1: TIERS[1]}), server_round=1)
    assert record_to_arrays(msgs[1].content.array_records[SELECTION_KEY])["m.q"].tolist() == [
        3,
        4,
    ]
    with pytest.raises(ConfigError, match="'round-robin.offset' must be >= 0"):
        load_run_config({**values, "round-robin.offset": -1})
    with pytest.raises(ConfigError, match="must be of type int"):
        load_run_config({**values, "round-robin.offset": "three"})
    with pytest.raises(ConfigError, match="unknown run config key"):
        load_run_config({**values, "round-robin.ofset": 3})  # a typo in its section
    # with another strategy the key is the app's, kept and unused (under `flwr run` the
    # app's pyproject sends it to every run)
    assert load_run_config({"round-robin.offset": 3}).raw["round-robin.offset"] == 3
    assert parse_client_config({"round-robin.offset": 3}).options is None

    @dataclass(frozen=True)
    class Clashing:
        rank: int = setting("lora.rank", 4)

    with pytest.raises(ConfigError, match="must lie in a section of its own"):
        parse_run_config({}, Clashing)


def test_bad_import_paths_say_what_failed():
    from haflq_flower.config import ConfigError
    from haflq_flower.strategy import load_run_config

    for bad, why in (
        ("tests.no_such_module:X", "cannot import"),
        ("tests.round_robin:Missing", "is not a LoRAStrategy"),
        ("numpy:ndarray", "is not a LoRAStrategy"),
    ):
        with pytest.raises(ConfigError, match=why):
            load_run_config({"strategy.name": bad})


def test_adaptive_uplink_budgets_follow_the_channel_and_drop_what_does_not_fit():
    from haflq_flower.quant.payload import ComponentSet, component_cost, encode, record_bytes

    head = {"score.weight": np.zeros((2, D_OUT), np.float32)}
    empty = ComponentSet(np.zeros((0, 2), np.int64), [], [])
    fixed = record_bytes(encode(empty, np.zeros(0), head, np.random.default_rng(0)))
    one = component_cost(D_IN + D_OUT, 2)
    # budget = rate * deadline / 8: room for the fixed part and one 2-bit component (not 4-bit)
    rate = (fixed + one + 1) * 8
    profiles = {1: ClientProfile("low", 2, uplink_bps=rate), 3: ClientProfile("high", 8, 1.1)}
    channel = ChannelConfig(bandwidth_hz=1e6, power_w=0.1, deadline_s=1.0)
    strategy = HAFLQStrategy(mode="truncate", channel=channel)  # adaptive uplink
    state, msgs = _round(strategy, FakeGrid(profiles))
    assert msgs[1].content["config"]["uplink-budget-bytes"] == fixed + one + 1
    far = HAFLQStrategy().uplink_budget_bytes(0, ClientProfile("x", 2, 2.0))
    near = HAFLQStrategy().uplink_budget_bytes(0, ClientProfile("x", 2, 1.1))
    assert near > 4 * far  # 1.1 km vs 2.0 km: ~5x the Shannon rate
    out = from_array_record(strategy.aggregate_train(1, [_reply(msgs[1], 10, 1.0)])[0])
    client = strategy.stats[1].clients[1]
    assert client.status == "ok" and client.payload_bytes <= client.budget_bytes
    assert client.bits == {"16": 0, "8": 0, "4": 0, "2": 1} and client.components_up == 1
    delta_q = out["m.q.lora_A.weight"] - state["m.q.lora_A.weight"]
    delta_v = out["m.v.lora_A.weight"] - state["m.v.lora_A.weight"]
    # the most important trained component (m.q #1, score 2; ties by module order) was sent
    np.testing.assert_allclose(delta_q[1], 1.0, rtol=1e-6)
    # the others were trained but dropped: excluded from aggregation, bit-identical
    assert not delta_q[0].any() and not delta_v.any()
    # ... but their importance was still reported
    np.testing.assert_allclose(strategy.importance.scores["m.v"][:2], [1.0, 2.0])


def test_payload_over_budget_is_rejected():
    strategy = HAFLQStrategy(mode="truncate")
    state, msgs = _round(strategy, FakeGrid({1: ClientProfile("low", 2, 1.1)}))
    strategy.assignments[1].budget_bytes = 100  # the client encoded for a larger budget
    assert strategy.aggregate_train(1, [_reply(msgs[1], 10, 1.0)]) == (None, None)
    assert "exceeds the budget" in strategy.stats[1].rejected[0]["reason"]


@pytest.mark.parametrize("mode", ["freeze", "truncate"])
def test_eight_bit_downlink_decodes_close_to_the_global(mode):
    from haflq_flower.quant.payload import decode_downlink

    s8 = HAFLQStrategy(mode=mode, downlink_bits=8)
    s16 = HAFLQStrategy(mode=mode, downlink_bits=16)
    state, msgs = _round(s8, FakeGrid({1: TIERS[2]}))
    _, msgs16 = _round(s16, FakeGrid({1: TIERS[2]}))
    record = msgs[1].content.array_records["down"]
    assert "arrays" not in msgs[1].content.array_records
    sent, sub = decode_downlink(record_to_arrays(record), state, MODS)
    expected = 4 if mode == "truncate" else R
    assert all(len(idx) == expected for idx in sent.values())
    for m in MODS:
        a_ref = state[f"{m}.lora_A.weight"][sent[m], :]
        step = np.ptp(a_ref, axis=1, keepdims=True) / 255
        assert np.all(np.abs(sub[f"{m}.lora_A.weight"] - a_ref) <= step + 1e-6)
    np.testing.assert_allclose(sub["score.weight"], state["score.weight"], atol=2e-3)
    # one byte per LoRA element instead of two (plus a float32 lo/scale per vector)
    half = from_array_record(msgs16[1].content.array_records["arrays"])
    lora16 = sum(v.nbytes for k, v in half.items() if "lora_" in k)
    assert 2 * record_to_arrays(record)["code.8"].nbytes == lora16


class RawProfileGrid:
    """Answers profile queries with raw (possibly hostile) config records."""

    def __init__(self, records: dict[int, dict]):
        self.records = records

    def get_node_ids(self):
        return list(self.records)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            assert msg.metadata.message_type == PROFILE_QUERY
            try:
                rec = ConfigRecord(self.records[msg.metadata.dst_node_id])
            except (TypeError, ValueError):  # not even a ConfigRecord: an empty profile
                rec = ConfigRecord()
            out.append(Message(content=RecordDict({PROFILE_KEY: rec}), reply_to=msg))
        return out
