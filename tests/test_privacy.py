"""Client-level DP: the clip bound, the noise scale, the accountant, the config errors."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest

from haflq_flower.config import ConfigError
from haflq_flower.lora.aggregate import aggregate_components
from haflq_flower.lora.components import ClientUpdate
from haflq_flower.lora.robust import state_norm
from haflq_flower.privacy import (
    DPConfig,
    PrivacyAccountant,
    add_average_noise,
    add_noise,
    clip_update,
)
from haflq_flower.quant.payload import (
    components_from_delta,
    decode,
    delta_from_components,
    encode_within_budget,
    layout_of,
    quantization_error_bound,
)
from haflq_flower.strategy import HAFLQStrategy

R, D_IN, D_OUT = 4, 6, 5
MODS = ["m0", "m1"]


def _global() -> OrderedDict:
    rng = np.random.default_rng(1)
    out = OrderedDict()
    for m in MODS:
        out[f"{m}.lora_A.weight"] = rng.normal(size=(R, D_IN)).astype(np.float32)
        out[f"{m}.lora_B.weight"] = rng.normal(size=(D_OUT, R)).astype(np.float32)
    out["score.weight"] = rng.normal(size=(2, 3)).astype(np.float32)
    return out


def _delta(selection: dict[str, np.ndarray], seed: int, scale: float = 1.0) -> OrderedDict:
    rng = np.random.default_rng(seed)
    out = OrderedDict()
    for m in MODS:
        k = len(selection[m])
        out[f"{m}.lora_A.weight"] = (scale * rng.normal(size=(k, D_IN))).astype(np.float32)
        out[f"{m}.lora_B.weight"] = (scale * rng.normal(size=(D_OUT, k))).astype(np.float32)
    out["score.weight"] = (scale * rng.normal(size=(2, 3))).astype(np.float32)
    return out


def test_clip_update_known_answers():
    update = OrderedDict(a=np.array([3.0, 0.0], np.float32), b=np.array([[0.0], [4.0]], np.float32))
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(5.0)
    assert state_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    same, _ = clip_update(update, 10.0)  # within the clip: untouched
    np.testing.assert_array_equal(same["b"], update["b"])


def test_local_noise_has_the_stated_scale():
    rng = np.random.default_rng(0)
    noisy = add_noise(OrderedDict(x=np.zeros(200_000, np.float32)), 0.3, rng)
    assert np.std(noisy["x"]) == pytest.approx(0.3, rel=0.01)
    assert abs(np.mean(noisy["x"])) < 0.003


def test_average_noise_is_the_sum_noise_over_each_coordinates_contributors():
    rng = np.random.default_rng(0)
    state = OrderedDict(a=np.zeros((3, 50_000), np.float32), h=np.ones(40_000, np.float32))
    counts = {"a": np.array([[1.0], [4.0], [0.0]]), "h": np.asarray(2.0)}
    out = add_average_noise(state, counts, std_sum=2.0, rng=rng)
    assert np.std(out["a"][0]) == pytest.approx(2.0, rel=0.02)
    assert np.std(out["a"][1]) == pytest.approx(0.5, rel=0.02)
    np.testing.assert_array_equal(out["a"][2], 0.0)  # nobody trained it: not released
    assert np.std(out["h"]) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("aggregation", ["adaptive", "zero-pad"])
def test_one_clients_contribution_to_the_sums_is_within_the_clip(aggregation):
    """Adaptive rank-1 aggregation under DP: the aggregate equals the per-coordinate sums
    of the clipped deltas divided by ``dp_counts``, and one client's share of those sums
    has norm <= C however many components it trained (so the noise on the sums bounds
    it). Zero-padding divides every component by all clients."""
    clip = 0.5
    glob = _global()
    strategy = HAFLQStrategy(aggregation=aggregation, dp=DPConfig("central", clip, 1.0))
    strategy._global = glob
    selections = [
        {m: np.array([0]) for m in MODS},
        {m: np.array([0, 1]) for m in MODS},
        {m: np.array([0, 1, 2, 3]) for m in MODS},
    ]
    updates = []
    for i, sel in enumerate(selections):
        delta, norm = clip_update(_delta(sel, seed=i, scale=3.0), clip)
        assert norm > clip
        updates.append(ClientUpdate(delta, 1, sel, node_id=i))
    new = aggregate_components(glob, updates, aggregation)
    counts = strategy.dp_counts(updates)
    for i, up in enumerate(updates):
        share = OrderedDict()
        for key, value in glob.items():
            full = np.zeros_like(value, dtype=np.float64)
            if key.endswith("lora_A.weight"):
                full[up.selection[key.split(".")[0]], :] = up.arrays[key]
            elif key.endswith("lora_B.weight"):
                full[:, up.selection[key.split(".")[0]]] = up.arrays[key]
            else:
                full[...] = up.arrays[key]
            share[key] = full
        assert state_norm(share) <= clip * (1 + 1e-6)
        if i == 0:
            sums = share
        else:
            sums = OrderedDict((k, sums[k] + share[k]) for k in sums)
    for key in glob:
        c = np.broadcast_to(counts[key], glob[key].shape)
        expected = glob[key] + np.where(c > 0, sums[key] / np.maximum(c, 1), 0.0)
        np.testing.assert_allclose(new[key], expected, rtol=1e-5, atol=1e-6)
    a_counts = counts["m0.lora_A.weight"].ravel()
    assert a_counts.tolist() == ([3, 2, 1, 1] if aggregation == "adaptive" else [3, 3, 3, 3])


@pytest.mark.parametrize("widths", [(8,), (4,), (2,), (16, 8, 4, 2)])
def test_the_quantizer_cannot_undo_the_clip_beyond_its_stated_bound(widths):
    clip = 1.0
    glob = _global()
    selection = {m: np.arange(R) for m in MODS}
    delta, _ = clip_update(_delta(selection, seed=5, scale=2.0), clip)
    components, head_keys = components_from_delta(delta, selection, MODS)
    rng = np.random.default_rng(0)
    importance = np.linspace(1.0, 2.0, len(components.a))
    head = {k: delta[k] for k in head_keys}
    arrays, chosen = encode_within_budget(components, importance, head, 10**6, rng, widths)
    layout = layout_of(glob, MODS)
    keys, _, a, b, head_out = decode(arrays, layout, widths)
    dims = [(D_IN, D_OUT)] * len(MODS)
    _, decoded = delta_from_components(keys, a, b, head_out, MODS, dims)
    bound = quantization_error_bound(components, chosen, head)
    assert state_norm(decoded) <= clip + bound * (1 + 1e-4)
    assert bound > 0


def _gaussian_exact_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism of sensitivity 1 and noise sigma at
    ``delta`` (Balle and Wang 2018, Theorem 8), by bisection."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * phi(
            -eps * sigma - 1 / (2 * sigma)
        )

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (2.0, 10), (0.8, 4)])
def test_accountant_lies_between_the_exact_gaussian_and_the_classic_rdp_bound(z, rounds):
    """Without sampling, T Gaussian rounds of noise z compose exactly into one Gaussian of
    noise z / sqrt(T): its exact epsilon is a lower bound; the classic RDP conversion
    ``min_a T a / (2 z^2) + log(1/delta) / (a - 1)`` an upper one."""
    delta = 1e-5
    accountant = PrivacyAccountant(z, delta)
    for _ in range(rounds):
        accountant.add_round(1.0)
    eps = accountant.epsilon()
    exact = _gaussian_exact_epsilon(z / math.sqrt(rounds), delta)
    classic = min(
        rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1)
        for a in np.linspace(1.01, 200, 20_000)
    )
    assert exact <= eps <= classic * (1 + 1e-6)
    assert eps < 1.3 * exact  # and not loose


def test_accountant_sampling_and_noise_move_epsilon_the_right_way():
    def eps(z, rates):
        acc = PrivacyAccountant(z, 1e-5)
        for r in rates:
            acc.add_round(r)
        return acc.epsilon()

    assert eps(1.0, []) == 0.0
    assert eps(0.0, [1.0]) == math.inf
    assert eps(1.0, [0.5] * 4) < eps(1.0, [1.0] * 4)
    assert eps(2.0, [1.0] * 4) < eps(1.0, [1.0] * 4)
    assert eps(1.0, [1.0] * 8) > eps(1.0, [1.0] * 4)
    with pytest.raises(ValueError, match="sampling rate"):
        PrivacyAccountant(1.0, 1e-5).add_round(0.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dp.mode": "secret"}, "dp.mode"),
        ({"dp.mode": "central", "dp.clip": 0.0}, "dp.clip must be a finite number > 0"),
        ({"dp.mode": "central", "dp.noise-multiplier": -1.0}, "dp.noise-multiplier"),
        ({"dp.mode": "local", "dp.delta": 0.0}, "dp.delta"),
        ({"dp.mode": "central", "strategy.name": "flexlora"}, "average of the clients"),
        ({"dp.mode": "central", "strategy.name": "hetlora"}, "average of the clients"),
    ],
)
def test_bad_dp_settings_are_refused_at_start_up(overrides, message):
    from haflq_flower.strategy import load_run_config

    with pytest.raises(ConfigError, match=message):
        load_run_config({"model.name": "tiny", **overrides})


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, mode", [("fedit", "central"), ("haflq", "central"), ("haflq", "local")]
)
def test_dp_runs_report_epsilon_per_round(tmp_path, strategy, mode):
    """A DP run in Flower's simulation engine: epsilon after every round (growing), the
    final summary, no training loss or dataset size from the devices."""
    from .conftest import TINY
    from .test_simulation import _simulate

    overrides = {
        **TINY,
        "strategy.name": strategy,
        "dp.mode": mode,
        "dp.clip": 0.5,
        "dp.noise-multiplier": 0.8,
        "output.dir": str(tmp_path),
    }
    results = _simulate(overrides, 3)
    eps = [r["dp_epsilon"] for r in results["rounds"][1:]]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    expected = PrivacyAccountant(0.8, 1e-5, [1.0, 1.0]).epsilon()
    assert eps[1] == pytest.approx(expected)
    assert results["final"]["dp"]["epsilon"] == pytest.approx(expected)
    for r in results["rounds"][1:]:
        assert all(c["num_examples"] == 1 for c in r["clients"])
        # no loss reported (NaN, written as null in results.json)
        assert all(c["train_loss"] is None for c in r["clients"])


def test_fedit_central_dp_runs_through_flowers_wrapper_with_its_noise_scale():
    """FedIT under central DP: Flower's wrapper puts its clipping norm in every training
    config and adds noise of std z C / K to the average of the K replies; our own noise
    is not added on top."""
    from flwr.app import ConfigRecord
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from haflq_flower.lora.state import from_array_record, to_array_record
    from haflq_flower.strategy import FedIT

    from .test_reliability import NodesGrid, _fedit_reply

    state = OrderedDict(w=np.zeros(200_000, np.float32))
    strategy = FedIT(dp=DPConfig("central", clip=0.5, noise_multiplier=2.0))
    assert not strategy.adds_own_noise
    msgs = list(
        strategy.configure_train(1, to_array_record(state), ConfigRecord(), NodesGrid([1, 2, 3, 4]))
    )
    assert all(m.content["config"][KEY_CLIPPING_NORM] == 0.5 for m in msgs)
    replies = [_fedit_reply(m, state, 0.0, n=1) for m in msgs]  # no change: only noise
    out = from_array_record(strategy.aggregate_train(1, replies)[0])["w"]
    assert np.std(out) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert strategy.stats[1].extra["dp_epsilon"] > 0


def test_flower_clipping_mod_clips_fedit_replies_and_leaves_other_messages_alone():
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from haflq_flower.client_app import flower_clipping_mod
    from haflq_flower.lora.state import from_array_record, to_array_record

    sent = OrderedDict(w=np.ones(100, np.float32))
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def answer(msg, context):
        back = OrderedDict(w=np.full(100, 3.0, np.float32))  # change of norm 20
        content = RecordDict({"arrays": to_array_record(back)})
        return Message(content=content, reply_to=msg)

    def train_message(config):
        content = RecordDict({"arrays": to_array_record(sent), "config": ConfigRecord(config)})
        return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)

    clipped = flower_clipping_mod(train_message({KEY_CLIPPING_NORM: 2.0}), ctx, answer)
    change = from_array_record(clipped.content["arrays"])["w"] - sent["w"]
    assert np.linalg.norm(change) == pytest.approx(2.0, rel=1e-5)
    untouched = flower_clipping_mod(train_message({"server-round": 1}), ctx, answer)
    np.testing.assert_array_equal(from_array_record(untouched.content["arrays"])["w"], 3.0)
