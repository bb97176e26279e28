"""Known-answer tests of the aggregation rules (no Flower, no model)."""

from collections import OrderedDict

import numpy as np
import pytest

from haflq_flower.lora.aggregate import (
    aggregate_components,
    aggregate_hetlora,
    hetlora_weights,
    weighted_average,
)
from haflq_flower.lora.components import (
    ClientUpdate,
    check_selection,
    first_selection,
    full_selection,
    gather,
    lora_modules,
    scatter,
)

R, D_IN, D_OUT = 4, 3, 5
M = "layer.q"


def _state(seed: int = 0) -> OrderedDict:
    rng = np.random.default_rng(seed)
    return OrderedDict(
        [
            (f"{M}.lora_A.weight", rng.normal(size=(R, D_IN)).astype(np.float32)),
            (f"{M}.lora_B.weight", rng.normal(size=(D_OUT, R)).astype(np.float32)),
            ("score.weight", rng.normal(size=(2, D_OUT)).astype(np.float32)),
        ]
    )


def _upload(weight, idx, seed, head=None):
    rng = np.random.default_rng(100 + seed)
    idx = np.asarray(idx, dtype=np.int64)
    delta = OrderedDict(
        [
            (f"{M}.lora_A.weight", rng.normal(size=(len(idx), D_IN)).astype(np.float32)),
            (f"{M}.lora_B.weight", rng.normal(size=(D_OUT, len(idx))).astype(np.float32)),
            (
                "score.weight",
                rng.normal(size=(2, D_OUT)).astype(np.float32) if head is None else head,
            ),
        ]
    )
    return ClientUpdate(delta, weight, {M: idx})


A, B = f"{M}.lora_A.weight", f"{M}.lora_B.weight"


def test_gather_scatter_round_trip_and_layout():
    state = _state()
    sel = {M: np.array([3, 1])}
    sub = gather(state, sel)
    np.testing.assert_array_equal(sub[A], state[A][[3, 1], :])
    np.testing.assert_array_equal(sub[B], state[B][:, [3, 1]])
    assert lora_modules(state) == [M]
    # scatter of a gathered sub-state into a zero state puts the components back in place
    zero = OrderedDict((k, np.zeros_like(v)) for k, v in state.items())
    back = scatter(zero, sub, sel)
    np.testing.assert_array_equal(back[A][[1, 3]], state[A][[1, 3]])
    assert not back[A][[0, 2]].any()
    # full and first selections
    np.testing.assert_array_equal(full_selection(state)[M], np.arange(R))
    np.testing.assert_array_equal(first_selection(state, 2)[M], [0, 1])
    # the product of a gathered full selection equals the original product
    full = gather(state, full_selection(state))
    np.testing.assert_allclose(full[B] @ full[A], state[B] @ state[A], rtol=1e-6)


def test_component_updated_by_a_subset_adaptive_known_answer():
    state = _state()
    u1 = _upload(10, [0, 1], seed=1)
    u2 = _upload(30, [1, 2], seed=2)
    out = aggregate_components(state, [u1, u2], "adaptive")
    # component 0: only client 1 -> its delta, undiluted
    np.testing.assert_allclose(out[A][0], state[A][0] + u1.arrays[A][0], rtol=1e-6)
    # component 1: both, weighted 10:30
    exp = state[A][1] + (10 * u1.arrays[A][1] + 30 * u2.arrays[A][0]) / 40
    np.testing.assert_allclose(out[A][1], exp, rtol=1e-6)
    exp_b = state[B][:, 1] + (10 * u1.arrays[B][:, 1] + 30 * u2.arrays[B][:, 0]) / 40
    np.testing.assert_allclose(out[B][:, 1], exp_b, rtol=1e-6)
    # component 2: only client 2
    np.testing.assert_allclose(out[A][2], state[A][2] + u2.arrays[A][1], rtol=1e-6)
    # component 3: nobody -> bit-identical
    assert np.array_equal(out[A][3], state[A][3]) and np.array_equal(out[B][:, 3], state[B][:, 3])
    # the head is FedAvg'd over all participants
    exp_head = (
        state["score.weight"]
        + (10 * u1.arrays["score.weight"] + 30 * u2.arrays["score.weight"]) / 40
    )
    np.testing.assert_allclose(out["score.weight"], exp_head, rtol=1e-6)


def test_zero_padding_dilutes_by_the_uploaders_share():
    state = _state()
    u1 = _upload(10, [0, 1, 2, 3], seed=1)
    u2 = _upload(30, [0], seed=2)
    adaptive = aggregate_components(state, [u1, u2], "adaptive")
    zero_pad = aggregate_components(state, [u1, u2], "zero-pad")
    # component 3 was uploaded only by client 1 (weight 10 of 40): zero-padding moves it by
    # a quarter of what adaptive aggregation does - the dilution factor n_1 / sum n.
    step_adaptive = adaptive[A][3] - state[A][3]
    step_zero = zero_pad[A][3] - state[A][3]
    np.testing.assert_allclose(step_zero, 0.25 * step_adaptive, rtol=1e-5)
    # a component uploaded by everyone is identical under both rules
    np.testing.assert_allclose(adaptive[A][0], zero_pad[A][0], rtol=1e-6)


def test_deltas_equal_values_when_all_start_from_the_global():
    state = _state()
    uploads = [_upload(w, [0, 1, 2, 3], seed=s) for w, s in ((5, 1), (15, 2), (20, 3))]
    out = aggregate_components(state, uploads, "adaptive")
    values = [OrderedDict((k, state[k] + u.arrays[k]) for k in state) for u in uploads]
    np.testing.assert_allclose(
        out[A], weighted_average(values, [5, 15, 20])[A], rtol=1e-5, atol=1e-6
    )


def test_factor_averaging_cross_term_is_exactly_as_stated():
    """(sum p_k B_k)(sum p_k A_k) - sum p_k B_k A_k = -sum_{k<l} p_k p_l (B_k-B_l)(A_k-A_l)."""
    states = [_state(s) for s in (1, 2, 3)]
    p = np.array([0.2, 0.3, 0.5])
    avg = weighted_average(states, p)
    lhs = avg[B].astype(np.float64) @ avg[A] - sum(
        pk * s[B].astype(np.float64) @ s[A] for pk, s in zip(p, states, strict=True)
    )
    rhs = np.zeros_like(lhs)
    for k in range(3):
        for q in range(k + 1, 3):
            rhs -= (
                p[k]
                * p[q]
                * (states[k][B] - states[q][B]).astype(np.float64)
                @ (states[k][A] - states[q][A])
            )
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-5)
    assert np.abs(rhs).max() > 0.1  # not vacuous


def test_hetlora_zero_pads_values_with_norm_weights():
    state = _state()
    u1 = _upload(10, [0, 1], seed=1)
    u2 = _upload(30, [0, 1, 2, 3], seed=2)
    out = aggregate_hetlora(state, [u1, u2])
    v1a = state[A][[0, 1], :] + u1.arrays[A]
    v1b = state[B][:, [0, 1]] + u1.arrays[B]
    v2a = state[A] + u2.arrays[A]
    v2b = state[B] + u2.arrays[B]
    n1 = np.linalg.norm(v1b.astype(np.float64) @ v1a)
    n2 = np.linalg.norm(v2b.astype(np.float64) @ v2a)
    w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)
    np.testing.assert_allclose(
        hetlora_weights([{A: v1a, B: v1b}, {A: v2a, B: v2b}], M), [w1, w2], rtol=1e-6
    )
    np.testing.assert_allclose(out[A][:2], w1 * v1a + w2 * v2a[:2], rtol=1e-5)
    # components 2, 3 held only by client 2: zero-padded, so scaled by w2 (< 1)
    np.testing.assert_allclose(out[A][2:], w2 * v2a[2:], rtol=1e-5)
    # the head: FedAvg by examples
    exp_head = (
        state["score.weight"] + 0.25 * u1.arrays["score.weight"] + 0.75 * u2.arrays["score.weight"]
    )
    np.testing.assert_allclose(out["score.weight"], exp_head, rtol=1e-5)


@pytest.mark.parametrize(
    "sel, msg",
    [
        ({M: np.array([0, 4])}, "out of range"),
        ({M: np.array([1, 1])}, "duplicated"),
        ({M: np.array([0.5])}, "integer"),
        ({"other": np.array([0])}, "modules differ"),
    ],
)
def test_check_selection_rejects_bad_indices(sel, msg):
    with pytest.raises(ValueError, match=msg):
        check_selection(sel, [M], R)


def test_bad_weights_and_rules_are_rejected():
    state = _state()
    with pytest.raises(ValueError, match="rule"):
        aggregate_components(state, [_upload(1, [0], 1)], "median")
    with pytest.raises(ValueError, match="weights"):
        aggregate_components(state, [_upload(0, [0], 1)], "adaptive")


def _clients_full(seeds=(1, 2, 3), weights=(3.0, 1.0, 2.0)):
    """Three clients at full rank R: uploads and the factors each ended with."""
    from haflq_flower.lora.aggregate import client_values

    glob = _state()
    ups = [_upload(w, range(R), s) for w, s in zip(weights, seeds, strict=True)]
    return glob, ups, [client_values(glob, up) for up in ups]


def _average_product(values, weights):
    p = np.asarray(weights, float) / np.sum(weights)
    return sum(pk * v[B] @ v[A] for pk, v in zip(p, values, strict=True))


def test_fedex_residual_makes_the_global_product_the_average_product():
    from haflq_flower.lora.aggregate import client_values, fedex_residual

    glob, ups, values = _clients_full()
    averaged, residual = fedex_residual(glob, ups)
    # the factors are FedIT's average of the clients' values
    fedit = weighted_average(values, [u.num_examples for u in ups])
    np.testing.assert_allclose(averaged[A], fedit[A], rtol=1e-6)
    np.testing.assert_allclose(averaged[B], fedit[B], rtol=1e-6)
    b_res, a_res = residual[M]
    assert b_res.shape == (D_OUT, 4 * R) and a_res.shape == (4 * R, D_IN)
    product = averaged[B].astype(np.float64) @ averaged[A] + b_res @ a_res
    np.testing.assert_allclose(product, _average_product(values, [3, 1, 2]), atol=1e-5)
    # heterogeneous ranks (the first r_k components): zero-padded averages, still exact
    hetero = [_upload(3.0, [0, 1], 1), _upload(1.0, range(R), 2), _upload(2.0, [0], 3)]
    averaged, residual = fedex_residual(glob, hetero)
    values = [client_values(glob, up) for up in hetero]
    product = averaged[B].astype(np.float64) @ averaged[A] + residual[M][0] @ residual[M][1]
    np.testing.assert_allclose(product, _average_product(values, [3, 1, 2]), atol=1e-5)


def test_fair_correction_without_regularizer_projects_onto_the_row_space_of_a_bar():
    from haflq_flower.lora.aggregate import fair_correction

    glob, ups, values = _clients_full()
    target = _average_product(values, [3, 1, 2])
    out = fair_correction(glob, ups, regularizer=0.0)
    a_bar = out[A].astype(np.float64)  # A stays the average
    np.testing.assert_allclose(a_bar, weighted_average(values, [3, 1, 2])[A], rtol=1e-6)
    # R = 4 rows in d_in = 3: not of full row rank, so the projection uses the
    # pseudo-inverse (with full row rank it is A^T (A A^T)^-1 A)
    projection = target @ np.linalg.pinv(a_bar) @ a_bar
    np.testing.assert_allclose(out[B].astype(np.float64) @ a_bar, projection, atol=1e-4)
    # the correction only helps: closer to the average product than FedIT's B_bar A_bar
    b_bar = weighted_average(values, [3, 1, 2])[B].astype(np.float64)
    fedit_err = np.linalg.norm(b_bar @ a_bar - target)
    assert np.linalg.norm(out[B] @ a_bar - target) < fedit_err
    # a huge regularizer keeps B at the average; a negative one is refused
    np.testing.assert_allclose(fair_correction(glob, ups, 1e9)[B], b_bar, atol=1e-5)
    with pytest.raises(ValueError, match="regularizer"):
        fair_correction(glob, ups, -1.0)


def test_aggregation_residual_known_answers():
    from haflq_flower.lora.aggregate import fedex_residual
    from haflq_flower.lora.residual import aggregation_residual, global_pairs

    glob, ups, values = _clients_full()
    weights = [u.num_examples for u in ups]
    target = _average_product(values, weights)
    fedit = weighted_average(values, weights)
    expected = np.linalg.norm(target - fedit[B].astype(np.float64) @ fedit[A]) / np.linalg.norm(
        target
    )
    got = aggregation_residual(values, weights, global_pairs(fedit))
    assert got == pytest.approx(expected, rel=1e-6) and got > 0.05
    # FedEx-LoRA: the factors plus the merged residual are exact
    averaged, residual = fedex_residual(glob, ups)
    exact = {M: [(averaged[B], averaged[A]), residual[M]]}
    assert aggregation_residual(values, weights, exact) < 1e-6
    # one client: FedIT is exact too; all-zero products: undefined
    assert aggregation_residual(values[:1], [1.0], global_pairs(values[0])) < 1e-6
    zero = OrderedDict((k, np.zeros_like(v)) for k, v in values[0].items())
    assert np.isnan(aggregation_residual([zero], [1.0], global_pairs(zero)))
