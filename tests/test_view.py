"""Freezing and truncation on a real PEFT model (tiny Llama, 4-bit and 16-bit bases)."""

import numpy as np
import pandas as pd
import pytest
import torch

from haflq_flower.lora.components import (
    component_delta,
    full_selection,
    gather,
    lora_modules,
    scatter,
)
from haflq_flower.lora.state import load_trainable_state, trainable_state
from haflq_flower.lora.view import ComponentFactor, component_view
from haflq_flower.model import load_lora_model
from haflq_flower.train import make_optimizer, train_local

CPU = torch.device("cpu")
FRAME = pd.DataFrame(
    {"text": ["a fine film", "a dull film", "great acting", "weak plot"] * 4, "label": [1, 0] * 8}
)


def _model(tiny_config, quantization="nf4", compute_dtype="bfloat16"):
    cfg = tiny_config(
        model__quantization=quantization,
        model__compute_dtype=compute_dtype,
        train__local_steps=4,
        lora__dropout=0.0,
    )
    model, tok = load_lora_model(cfg.model, cfg.lora, 2, seed=0, device=CPU)
    # Non-zero B so that every factor gets gradients from the first step.
    state = trainable_state(model)
    rng = np.random.default_rng(0)
    for k in state:
        if "lora_B" in k:
            state[k] = rng.normal(0, 0.05, size=state[k].shape).astype(np.float32)
    load_trainable_state(model, state)
    return cfg, model, tok


def _train(cfg, model, tok, view=None):
    return train_local(
        model,
        tok,
        FRAME,
        cfg.train,
        max_length=16,
        compute_dtype="bfloat16",
        device=CPU,
        seed=1,
        after_backward=None if view is None else view.track_importance,
    )


def _selection(state, picks):
    return {m: np.array(picks, dtype=np.int64) for m in lora_modules(state)}


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_freezing_trains_only_selected_components(tiny_config, quantization):
    cfg, model, tok = _model(tiny_config, quantization)
    before = trainable_state(model)
    sel = _selection(before, [1, 5])
    with component_view(model, sel, "freeze") as view:
        factors = [m for m in model.modules() if isinstance(m, ComponentFactor)]
        assert factors and all(f.frozen.shape[f.dim] == cfg.lora.rank - 2 for f in factors)
        # the optimizer sees the selected components and the head, nothing frozen
        opt = make_optimizer(model, cfg.train)
        lora_params = opt.param_groups[0]["params"]
        assert {id(p) for p in lora_params} == {id(f.trainable) for f in factors}
        assert not any(f.frozen.requires_grad for f in factors)
        result = _train(cfg, model, tok, view)
        scores = view.scores()
    after = trainable_state(model)
    for m in lora_modules(before):
        a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        frozen = [i for i in range(cfg.lora.rank) if i not in (1, 5)]
        assert np.array_equal(after[a][frozen], before[a][frozen])  # bit-identical
        assert np.array_equal(after[b][:, frozen], before[b][:, frozen])
        assert not np.allclose(after[a][[1, 5]], before[a][[1, 5]])  # trained
        assert not np.allclose(after[b][:, [1, 5]], before[b][:, [1, 5]])
        assert scores[m].shape == (2,) and (scores[m] > 0).all()
    # optimizer state holds only the trained components and the head (AdamW: 2 moments)
    head = sum(v.size for k, v in before.items() if "lora_" not in k)
    lora_trained = sum(
        2 * v.shape[1] if "lora_A" in k else 2 * v.shape[0]
        for k, v in before.items()
        if "lora_" in k
    )
    assert result.trainable_params == head + lora_trained
    # two fp32 moments per element, plus AdamW's fp32 step counter per tensor
    n_tensors = len(before)
    assert result.optimizer_state_bytes == 2 * 4 * (head + lora_trained) + 4 * n_tensors
    # PEFT's own modules are back
    assert not any(isinstance(m, ComponentFactor) for m in model.modules())


def test_freeze_forward_equals_peft_forward(tiny_config):
    """Swapping in the split factors does not change the model's output."""
    from haflq_flower.data import tokenize

    cfg, model, tok = _model(tiny_config, "none", "float32")
    model.eval()
    batch = tokenize(tok, ["a fine film", "weak"], 16)
    with torch.no_grad():
        ref = model(**batch).logits
        with component_view(model, _selection(trainable_state(model), [0, 3, 6]), "freeze"):
            got = model(**batch).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_truncation_uses_only_the_selected_components(tiny_config):
    from haflq_flower.data import tokenize

    cfg, model, tok = _model(tiny_config, "none", "float32")
    state = trainable_state(model)
    sel = _selection(state, [2, 4])
    # Reference: a model whose other components are zero computes the same function.
    zeroed = {k: v.copy() for k, v in state.items()}
    for m in lora_modules(state):
        keep = np.zeros(cfg.lora.rank, dtype=bool)
        keep[[2, 4]] = True
        zeroed[f"{m}.lora_A.weight"][~keep] = 0
    batch = tokenize(tok, ["a fine film", "weak"], 16)
    model.eval()
    with torch.no_grad():
        load_trainable_state(model, zeroed)
        ref = model(**batch).logits
        load_trainable_state(model, state)
        with component_view(model, sel, "truncate"):
            factors = [m for m in model.modules() if isinstance(m, ComponentFactor)]
            assert all(f.frozen is None and f.weight.shape[f.dim] == 2 for f in factors)
            got = model(**batch).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_truncation_round_trip_through_sub_states(tiny_config):
    """Server gathers r_k components, client scatters, trains, gathers the delta back."""
    cfg, model, tok = _model(tiny_config, "nf4")
    global_state = trainable_state(model)
    sel = _selection(global_state, [0, 7, 3])
    sent = gather(global_state, sel)
    # the client's model holds other values in the unselected slots: they must not matter
    junk = {k: np.full_like(v, 0.5) for k, v in global_state.items()}
    load_trainable_state(model, scatter(junk, sent, sel))
    before = gather(trainable_state(model), sel)
    for k in sent:
        np.testing.assert_array_equal(before[k], sent[k])
    with component_view(model, sel, "truncate") as view:
        _train(cfg, model, tok, view)
    delta = component_delta(before, gather(trainable_state(model), sel))
    assert all(np.abs(delta[k]).sum() > 0 for k in delta)
    rebuilt = scatter(global_state, {k: sent[k] + delta[k] for k in sent}, sel)
    untouched = [1, 2, 4, 5, 6]
    for m in lora_modules(global_state):
        a = f"{m}.lora_A.weight"
        assert np.array_equal(rebuilt[a][untouched], global_state[a][untouched])


def test_full_selection_in_freeze_mode_trains_everything(tiny_config):
    cfg, model, tok = _model(tiny_config, "none")
    before = trainable_state(model)
    with component_view(model, full_selection(before), "freeze") as view:
        factors = [m for m in model.modules() if isinstance(m, ComponentFactor)]
        assert all(f.frozen.numel() == 0 for f in factors)
        _train(cfg, model, tok, view)
    after = trainable_state(model)
    assert all(not np.allclose(after[k], before[k]) for k in before if "lora_A" in k)
