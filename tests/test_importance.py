"""Importance: the EMA on a known gradient sequence, component scores, selection, server."""

import numpy as np
import pytest
import torch

from haflq_flower.lora.components import ClientUpdate
from haflq_flower.lora.importance import GlobalImportance, top_components
from haflq_flower.lora.sensitivity import Sensitivity, component_scores


def test_sensitivity_ema_on_a_known_sequence():
    w = torch.tensor([2.0, -1.0])
    grads = [torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 2.0]), None, torch.tensor([0.5, 1.0])]
    s = Sensitivity(beta1=0.5, beta2=0.25)
    i_bar = np.zeros(2)
    u_bar = np.zeros(2)
    for g in grads:
        s.update(w, g)
        if g is None:  # no gradient: no update
            continue
        sens = np.abs(w.numpy() * g.numpy())
        i_bar = 0.5 * i_bar + 0.5 * sens
        u_bar = 0.25 * u_bar + 0.75 * np.abs(sens - i_bar)
    np.testing.assert_allclose(s.i_bar.numpy(), i_bar, rtol=1e-6)
    np.testing.assert_allclose(s.u_bar.numpy(), u_bar, rtol=1e-6)
    np.testing.assert_allclose(s.score(w.shape).numpy(), i_bar * u_bar, rtol=1e-6)
    # hand-computed for the first element: sens 2, 6, 1
    # i: 1, 3.5, 2.25; u: .75*1=.75, .1875+.75*2.5=2.0625, .515625+.75*1.25=1.453125
    assert s.i_bar[0].item() == pytest.approx(2.25)
    assert s.u_bar[0].item() == pytest.approx(1.453125)


def test_component_scores_are_row_mean_of_a_plus_column_mean_of_b():
    sa = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])  # 3 components x d_in 2
    sb = torch.tensor([[4.0, 0.0, 1.0]])  # d_out 1 x 3 components
    np.testing.assert_allclose(component_scores(sa, sb), [2 + 4, 0 + 0, 2 + 1])
    with pytest.raises(ValueError):
        component_scores(sa, torch.zeros(1, 2))


def test_selection_top_r_with_ties():
    assert top_components(np.array([0.1, 0.5, 0.5, 0.2]), 2).tolist() == [1, 2]
    # ties broken by index: all equal -> the first r
    assert top_components(np.zeros(5), 3).tolist() == [0, 1, 2]
    # ties broken by a given order (rank of each index): index 4 first, then 2
    order = np.array([4, 3, 1, 2, 0])
    assert top_components(np.zeros(5), 2, order).tolist() == [2, 4]
    # a higher score beats the tie order
    assert top_components(np.array([0, 0, 0, 0, 1.0]), 1, order).tolist() == [4]
    assert top_components(np.ones(3), 10).tolist() == [0, 1, 2]


def test_global_importance_weighting_smoothing_and_untouched():
    imp = GlobalImportance(["m"], rank=4, smoothing=0.5)
    imp.update(
        [
            ClientUpdate(
                {}, 10, trained={"m": np.array([0, 1])}, scores={"m": np.array([1.0, 2.0])}
            ),
            ClientUpdate(
                {}, 30, trained={"m": np.array([1, 2])}, scores={"m": np.array([4.0, 8.0])}
            ),
        ]
    )
    # first report: no smoothing; component 1 is the n-weighted mean (10*2 + 30*4)/40 = 3.5
    np.testing.assert_allclose(imp.scores["m"], [1.0, 3.5, 8.0, 0.0])
    imp.update(
        [ClientUpdate({}, 5, trained={"m": np.array([0, 3])}, scores={"m": np.array([3.0, 1.0])})]
    )
    # component 0 smoothed: .5*1 + .5*3 = 2; 1, 2 untouched; 3 first seen -> 1
    np.testing.assert_allclose(imp.scores["m"], [2.0, 3.5, 8.0, 1.0])
    assert imp.select(2)["m"].tolist() == [1, 2]
    with pytest.raises(ValueError):
        GlobalImportance(["m"], rank=4, smoothing=1.0)
