from collections import OrderedDict

import numpy as np
import pytest
import torch

from haflq_flower.lora.aggregate import weighted_average
from haflq_flower.lora.state import (
    StateMismatchError,
    check_state,
    from_array_record,
    load_trainable_state,
    to_array_record,
    trainable_state,
)
from haflq_flower.model import load_lora_model

CPU = torch.device("cpu")


def test_state_array_record_round_trip_is_exact(tiny_config):
    cfg = tiny_config(model__quantization="none", model__compute_dtype="float32")
    model, _ = load_lora_model(cfg.model, cfg.lora, 2, seed=0, device=CPU)
    state = trainable_state(model)
    assert any("lora_A" in k for k in state) and any("score" in k for k in state)
    assert all(v.dtype == np.float32 for v in state.values())
    record = to_array_record(state)
    assert record.count_bytes() >= sum(v.nbytes for v in state.values())
    back = from_array_record(record)
    assert list(back) == list(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])

    changed = OrderedDict((k, v + 1.0) for k, v in state.items())
    load_trainable_state(model, changed)
    for k, v in trainable_state(model).items():
        np.testing.assert_array_equal(v, changed[k])


def test_check_state_rejects_mismatches():
    ref = {"a": np.zeros((2, 3), np.float32)}
    with pytest.raises(StateMismatchError, match="shape"):
        check_state(ref, {"a": np.zeros((3, 2), np.float32)})
    with pytest.raises(StateMismatchError, match="missing"):
        check_state(ref, {"b": np.zeros((2, 3), np.float32)})
    with pytest.raises(StateMismatchError, match="NaN"):
        check_state(ref, {"a": np.full((2, 3), np.nan, np.float32)})
    with pytest.raises(StateMismatchError, match="dtype"):
        check_state(ref, {"a": np.zeros((2, 3), np.int32)})


def test_weighted_average_known_answer():
    s1 = {"x": np.array([1.0, 2.0], np.float32)}
    s2 = {"x": np.array([4.0, 8.0], np.float32)}
    out = weighted_average([s1, s2], [1, 2])
    np.testing.assert_allclose(out["x"], [3.0, 6.0])
    with pytest.raises(ValueError):
        weighted_average([s1], [0])


def test_factor_averaging_cross_term_is_what_theory_says():
    """(sum p_k B_k)(sum p_k A_k) - sum p_k B_k A_k = -sum_{k<l} p_k p_l (B_k-B_l)(A_k-A_l)."""
    rng = np.random.default_rng(0)
    n = [10, 30, 60]
    p = np.array(n) / sum(n)
    Bs = [rng.normal(size=(5, 2)) for _ in n]
    As = [rng.normal(size=(2, 4)) for _ in n]
    avg = weighted_average(
        [
            {"A": a.astype(np.float32), "B": b.astype(np.float32)}
            for a, b in zip(As, Bs, strict=True)
        ],
        n,
    )
    exact = sum(pk * b @ a for pk, a, b in zip(p, As, Bs, strict=True))
    cross = -sum(
        p[k] * p[l] * (Bs[k] - Bs[l]) @ (As[k] - As[l])
        for k in range(3)
        for l in range(k + 1, 3)  # noqa: E741
    )
    np.testing.assert_allclose(avg["B"] @ avg["A"] - exact, cross, atol=1e-5)
    assert np.abs(cross).max() > 0.1  # factor averaging is not exact here
