"""The peer methods' aggregations against their exact formulas on hand-built factors
(no Flower, no model), and their config checks."""

from collections import OrderedDict

import numpy as np
import pytest

from haflq_flower.config import ConfigError
from haflq_flower.lora.aggregate import (
    aggregate_ffa,
    aggregate_flexlora,
    aggregate_padded_values,
    client_values,
    stack_flora,
)
from haflq_flower.lora.components import ClientUpdate

R, D_IN, D_OUT = 4, 7, 5  # d_out != d_in: a transposed SVD cannot even fit the shapes
M = "layer.q"
A, B, HEAD = f"{M}.lora_A.weight", f"{M}.lora_B.weight", "score.weight"


def _state(seed: int = 0, b_zero: bool = False) -> OrderedDict:
    rng = np.random.default_rng(seed)
    b = np.zeros((D_OUT, R)) if b_zero else rng.normal(size=(D_OUT, R))
    return OrderedDict(
        [
            (A, rng.normal(size=(R, D_IN)).astype(np.float32)),
            (B, b.astype(np.float32)),
            (HEAD, rng.normal(size=(2, D_OUT)).astype(np.float32)),
        ]
    )


def _upload(weight: float, rank: int, seed: int) -> ClientUpdate:
    """A client of rank ``rank`` that trained the first ``rank`` components."""
    rng = np.random.default_rng(50 + seed)
    delta = OrderedDict(
        [
            (A, rng.normal(size=(rank, D_IN)).astype(np.float32)),
            (B, rng.normal(size=(D_OUT, rank)).astype(np.float32)),
            (HEAD, rng.normal(size=(2, D_OUT)).astype(np.float32)),
        ]
    )
    return ClientUpdate(delta, weight, {M: np.arange(rank)})


def _products(glob, uploads):
    """sum_k p_k B_k A_k, from the clients' values, in float64."""
    p = np.array([u.num_examples for u in uploads]) / sum(u.num_examples for u in uploads)
    out = np.zeros((D_OUT, D_IN))
    for pk, up in zip(p, uploads, strict=True):
        v = client_values(glob, up)
        out += pk * v[B] @ v[A]
    return out


def _fedavg_head(glob, uploads):
    p = np.array([u.num_examples for u in uploads]) / sum(u.num_examples for u in uploads)
    return glob[HEAD] + sum(
        pk * u.arrays[HEAD].astype(np.float64) for pk, u in zip(p, uploads, strict=True)
    )


def test_client_values_are_received_components_plus_deltas():
    glob = _state()
    up = ClientUpdate(_upload(1, 2, 0).arrays, 1, {M: np.array([2, 0])})
    v = client_values(glob, up)
    np.testing.assert_allclose(v[A], glob[A][[2, 0]] + up.arrays[A], rtol=1e-6)
    np.testing.assert_allclose(v[B], glob[B][:, [2, 0]] + up.arrays[B], rtol=1e-6)


def test_flexlora_refactors_the_weighted_sum_of_products_by_svd():
    glob = _state()
    uploads = [_upload(30, 2, 0), _upload(10, 4, 1), _upload(60, 1, 2)]
    out = aggregate_flexlora(glob, uploads)
    target = _products(glob, uploads)  # rank <= 2 + 4 + 1 > R: truncation applies
    assert out[A].shape == (R, D_IN) and out[B].shape == (D_OUT, R)
    sv = np.linalg.svd(target, compute_uv=False)
    # Eckart-Young: the rank-R result is the best approximation, error = the dropped sv.
    err = np.linalg.norm(out[B].astype(np.float64) @ out[A] - target)
    assert err == pytest.approx(np.sqrt(np.sum(sv[R:] ** 2)), rel=1e-4)
    # A's rows are the right singular vectors (orthonormal); B's columns carry S, in
    # descending order, so the first r_k components are a client's best rank-r_k share.
    np.testing.assert_allclose(out[A] @ out[A].T, np.eye(R), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out[B], axis=0), sv[:R], rtol=1e-5)
    for r in (1, 2, 3):
        err_r = np.linalg.norm(out[B][:, :r].astype(np.float64) @ out[A][:r] - target)
        assert err_r == pytest.approx(np.sqrt(np.sum(sv[r:] ** 2)), rel=1e-4)
    np.testing.assert_allclose(out[HEAD], _fedavg_head(glob, uploads), rtol=1e-5)


def test_flexlora_is_exact_when_the_sum_fits_in_rank_r():
    glob = _state(b_zero=True)  # round 1: B = 0, so each client's B_k is its delta
    uploads = [_upload(1, 1, 0), _upload(3, 2, 1)]  # total rank 3 <= R
    out = aggregate_flexlora(glob, uploads)
    np.testing.assert_allclose(
        out[B].astype(np.float64) @ out[A], _products(glob, uploads), atol=1e-5
    )


def test_flexlora_decomposes_the_update_not_its_transpose():
    """A known answer: M = e_1 a^T with a hand-picked a; the right singular vector must be
    a / |a| (length d_in) and the left one e_1 (length d_out)."""
    glob = OrderedDict(
        [(A, np.zeros((R, D_IN), np.float32)), (B, np.zeros((D_OUT, R), np.float32))]
    )
    a = np.arange(1, D_IN + 1, dtype=np.float32)
    delta = OrderedDict([(A, a[None, :]), (B, np.eye(D_OUT, 1, dtype=np.float32) * 2.0)])
    out = aggregate_flexlora(glob, [ClientUpdate(delta, 1, {M: np.array([0])})])
    sign = np.sign(out[A][0, 0])
    np.testing.assert_allclose(out[A][0] * sign, a / np.linalg.norm(a), rtol=1e-6)
    np.testing.assert_allclose(
        out[B][:, 0] * sign, np.eye(D_OUT)[0] * 2.0 * np.linalg.norm(a), rtol=1e-6
    )
    np.testing.assert_allclose(out[B][:, 1:], 0.0, atol=1e-6)


def test_flora_stack_product_equals_the_weighted_sum_of_products():
    glob = _state()
    uploads = [_upload(30, 2, 0), _upload(10, 4, 1), _upload(60, 1, 2)]
    (b_stack, a_stack) = stack_flora(glob, uploads)[M]
    assert a_stack.shape == (2 + 4 + 1, D_IN) and b_stack.shape == (D_OUT, 2 + 4 + 1)
    np.testing.assert_allclose(b_stack @ a_stack, _products(glob, uploads), rtol=1e-12)
    # the weights sit in A: client 0's rows are p_0 A_0
    np.testing.assert_allclose(a_stack[:2], 0.3 * client_values(glob, uploads[0])[A])


def test_ffa_averages_b_and_keeps_the_shared_a_exactly():
    glob = _state()
    rng = np.random.default_rng(3)
    states = [
        OrderedDict([(B, rng.normal(size=(D_OUT, R))), (HEAD, rng.normal(size=(2, D_OUT)))])
        for _ in range(3)
    ]
    weights = [1.0, 2.0, 5.0]
    out = aggregate_ffa(glob, states, weights)
    p = np.array(weights) / 8.0
    np.testing.assert_array_equal(out[A], glob[A])
    b_avg = sum(pk * s[B] for pk, s in zip(p, states, strict=True))
    np.testing.assert_allclose(out[B], b_avg, rtol=1e-6)
    # exact: the product of the averages is the average of the products (A shared)
    products = sum(pk * s[B] @ glob[A].astype(np.float64) for pk, s in zip(p, states, strict=True))
    np.testing.assert_allclose(out[B].astype(np.float64) @ glob[A], products, rtol=1e-5)
    assert list(out) == list(glob)


def test_fedit_truncated_zero_pads_values_with_example_weights():
    glob = _state()
    uploads = [_upload(1, 1, 0), _upload(3, 3, 1)]
    out = aggregate_padded_values(glob, uploads, "examples")
    v0, v1 = (client_values(glob, u) for u in uploads)
    # component 0: both clients; components 1-2: client 1 only (diluted by p_1 = 0.75);
    # component 3: nobody -> zero
    np.testing.assert_allclose(out[A][0], 0.25 * v0[A][0] + 0.75 * v1[A][0], rtol=1e-6)
    np.testing.assert_allclose(out[A][1:3], 0.75 * v1[A][1:3], rtol=1e-6)
    np.testing.assert_allclose(out[B][:, 1:3], 0.75 * v1[B][:, 1:3], rtol=1e-6)
    np.testing.assert_array_equal(out[A][3], 0.0)
    np.testing.assert_allclose(out[HEAD], _fedavg_head(glob, uploads), rtol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        aggregate_padded_values(glob, uploads, "median")


def test_flora_refuses_a_quantized_base_with_a_clear_message(tiny_config):
    with pytest.raises(ConfigError, match='16-bit base.*model.quantization="none"'):
        tiny_config(strategy__name="flora")  # the default base is NF4
    with pytest.raises(ConfigError, match="16-bit base"):
        tiny_config(
            strategy__name="flora", model__quantization="none", blocks__precision="uniform-16"
        )
    cfg = tiny_config(strategy__name="flora", model__quantization="none")
    assert cfg.strategy.name == "flora"


@pytest.mark.parametrize("name", ["fedit", "ffa-lora"])
def test_strategies_without_block_assignment_refuse_block_precision(tiny_config, name):
    with pytest.raises(ConfigError, match="per-client block precision"):
        tiny_config(strategy__name=name, blocks__precision="uniform-4")


# ----------------------------------------------------------------- on a real model
def _tiny(tiny_config, **overrides):
    import torch

    from haflq_flower.data import load_task
    from haflq_flower.model import load_lora_model

    cfg = tiny_config(**overrides)
    task = load_task(cfg.data)
    model, tokenizer = load_lora_model(
        cfg.model, cfg.lora, task.num_labels, cfg.seed, torch.device("cpu")
    )
    return cfg, task, model, tokenizer


def _random_stacks(model, rank: int, seed: int = 0):
    from haflq_flower.lora.components import a_key, b_key
    from haflq_flower.lora.view import lora_layers

    rng = np.random.default_rng(seed)
    stacks = {}
    for name, layer in lora_layers(model):
        w = layer.get_base_layer().weight
        stacks[b_key(name)] = rng.normal(size=(w.shape[0], rank)).astype(np.float32)
        stacks[a_key(name)] = rng.normal(size=(rank, w.shape[1])).astype(np.float32)
    return stacks


def test_merge_sets_w0_plus_scaled_stack_and_restores_the_pristine_base(tiny_config):
    import torch

    from haflq_flower.lora.components import a_key, b_key
    from haflq_flower.lora.merge import merge_stacks
    from haflq_flower.lora.view import lora_layers

    _, _, model, _ = _tiny(tiny_config, model__quantization="none")
    layers = dict(lora_layers(model))
    w0 = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    for seed in (0, 1):  # merging twice never stacks on top of the first merge
        stacks = _random_stacks(model, 3, seed)
        assert merge_stacks(model, stacks) == 3
    for name, layer in layers.items():
        scale = layer.scaling[layer.active_adapters[0]]
        expected = w0[name].double() + scale * (
            torch.from_numpy(stacks[b_key(name)]).double()
            @ torch.from_numpy(stacks[a_key(name)]).double()
        )
        got = layer.get_base_layer().weight
        assert got.dtype == w0[name].dtype  # stored in the base's own (16-bit) dtype
        # one rounding to that dtype: relative error <= its unit roundoff (bf16: 2^-8)
        eps = torch.finfo(got.dtype).eps
        torch.testing.assert_close(got.double(), expected, rtol=eps, atol=1e-6)
    assert merge_stacks(model, None) == 0
    for name, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight, w0[name])


def test_merge_refuses_a_quantized_base_and_bad_shapes(tiny_config):
    import torch

    from haflq_flower.lora.components import a_key
    from haflq_flower.lora.merge import MergeError, merge_stacks

    _, _, model, _ = _tiny(tiny_config, model__quantization="none")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stacks = _random_stacks(model, 2)
    key = [k for k in stacks if k.endswith(".lora_A.weight")][-1]  # the last module
    bad = {**stacks, key: stacks[key][:, :-1]}
    with pytest.raises(MergeError, match="shape"):
        merge_stacks(model, bad)
    # nothing was half-applied: every weight is as before
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(MergeError, match="lacks"):
        merge_stacks(
            model, {k: v for k, v in stacks.items() if k != a_key(key[: -len(".lora_A.weight")])}
        )
    _, _, quantized, _ = _tiny(tiny_config)  # NF4 base
    with pytest.raises(MergeError, match='model.quantization="none"'):
        merge_stacks(quantized, _random_stacks(quantized, 2))


def test_frozen_a_trains_b_only(tiny_config):
    from haflq_flower.lora.view import frozen_a

    _, _, model, _ = _tiny(tiny_config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with frozen_a(model) as count:
        inside = [n for n, p in model.named_parameters() if p.requires_grad]
    assert count > 0 and not any(".lora_A." in n for n in inside)
    assert any(".lora_B." in n for n in inside)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names


# ------------------------------------------------------- end to end (in-process Flower)
@pytest.mark.parametrize("name", ["flexlora", "fedit-trunc"])
@pytest.mark.slow
def test_truncating_peers_train_first_r_k_and_upload_fp32(tmp_path, name):
    from .conftest import TINY
    from .test_simulation import _simulate

    results = _simulate({**TINY, "strategy.name": name, "output.dir": str(tmp_path)}, 3)
    for r in results["rounds"][1:]:
        by_tier = {c["tier"]: c for c in r["clients"]}
        assert {t: c["rank"] for t, c in by_tier.items()} == {"low": 2, "mid": 4, "high": 8}
        up = [by_tier[t]["bytes_up"] for t in ("low", "mid", "high")]
        assert up[0] < up[1] < up[2]
        assert all(c["payload_bytes"] == 0 for c in r["clients"])  # fp32 arrays, no codec
        # truncation and zero-padding: the global model is not the clients' average
        assert r["aggregation_residual"] > 1e-3


@pytest.mark.slow
def test_flora_merges_every_round_and_the_server_evaluates_the_merged_model(tmp_path):
    import torch

    from haflq_flower.checkpoint import load_checkpoint
    from haflq_flower.lora.merge import merge_stacks
    from haflq_flower.lora.state import load_trainable_state
    from haflq_flower.train import evaluate_run_rows

    from .conftest import TINY
    from .test_simulation import _simulate

    overrides = {
        **TINY,
        "strategy.name": "flora",
        "model.quantization": "none",
        "output.dir": str(tmp_path),
    }
    results = _simulate(overrides, 3)
    rounds = results["rounds"]
    # stacking is exact: the merged model is the average of the clients' models
    assert all(r["aggregation_residual"] < 1e-5 for r in rounds[1:])
    # every training message carries all past stacks: round 2 sends round 1's (rank
    # 2 + 4 + 8 = 14 per module) on top of the adapter
    assert rounds[2]["bytes_down"] > rounds[1]["bytes_down"]
    ckpt = load_checkpoint(tmp_path)
    merge = {
        k[len("flora/merge/") :]: v
        for k, v in ckpt.strategy_arrays.items()
        if k.startswith("flora/merge/")
    }
    assert merge and all(14 * 2 in v.shape for v in merge.values())
    # the global adapter is the fresh one again (B = 0): the model lives in the merge
    b_keys = [k for k in ckpt.global_state if k.endswith(".lora_B.weight")]
    assert all(not ckpt.global_state[k].any() for k in b_keys)
    # the reported loss is that of the base with the merge, not of the bare base
    from haflq_flower.config import parse_run_config
    from haflq_flower.data import load_task
    from haflq_flower.model import load_lora_model

    cfg = parse_run_config(overrides)
    task = load_task(cfg.data)
    model, tok = load_lora_model(cfg.model, cfg.lora, 2, cfg.seed, torch.device("cpu"))
    load_trainable_state(model, ckpt.global_state)
    bare_loss = evaluate_run_rows(cfg, model, tok, task.test, torch.device("cpu"), "bare").loss
    merge_stacks(model, merge)
    merged = evaluate_run_rows(cfg, model, tok, task.test, torch.device("cpu"), "merged")
    loss, accuracy = merged.loss, merged.accuracy
    assert loss == pytest.approx(rounds[-1]["loss"], rel=1e-5)
    assert accuracy == rounds[-1]["accuracy"] and bare_loss != pytest.approx(loss, rel=1e-5)

    # The saved adapter is one rank-expanded PEFT adapter (rank 28 + 8) on the unmerged
    # base: PEFT alone reproduces the merged model.
    from peft import PeftModel

    from haflq_flower.model import load_base_model

    base, _ = load_base_model(cfg.model, 2, torch.device("cpu"))
    loaded = PeftModel.from_pretrained(base, results["final"]["adapter_dir"])
    assert loaded.peft_config["default"].r == 28 + 8
    peft = evaluate_run_rows(cfg, loaded, tok, task.test, torch.device("cpu"), "peft")
    peft_loss, peft_acc = peft.loss, peft.accuracy
    assert peft_loss == pytest.approx(loss, rel=1e-3) and peft_acc == pytest.approx(
        accuracy, abs=0.03
    )


@pytest.mark.slow
def test_ffa_lora_keeps_a_at_the_shared_init_and_uploads_b_and_head(tmp_path, tiny_config):
    from haflq_flower.checkpoint import load_checkpoint
    from haflq_flower.lora.state import trainable_state

    from .conftest import TINY
    from .test_simulation import _simulate

    results = _simulate({**TINY, "strategy.name": "ffa-lora", "output.dir": str(tmp_path)}, 2)
    _, _, model, _ = _tiny(tiny_config)
    init = trainable_state(model)
    final = load_checkpoint(tmp_path).global_state
    a_keys = [k for k in init if k.endswith(".lora_A.weight")]
    b_keys = [k for k in init if k.endswith(".lora_B.weight")]
    assert all(np.array_equal(final[k], init[k]) for k in a_keys)
    assert all(final[k].any() for k in b_keys)  # B trained (it starts at zero)
    sent_floats = sum(v.size for k, v in init.items() if k not in a_keys)
    for r in results["rounds"][1:]:
        for c in r["clients"]:
            # fp32 B + head, plus the metrics record and npy headers (a few KB)
            assert 4 * sent_floats < c["bytes_up"] < 4 * sent_floats + 8192


def test_flora_state_survives_a_checkpoint_round_trip():
    """Stacks of different ranks per round, the fresh adapter and the profiles come back
    exactly from state_dict() (what checkpoint.npz stores)."""
    from haflq_flower.strategy import FLoRA

    glob = _state(b_zero=True)
    flora = FLoRA()
    flora.fresh = OrderedDict((k, glob[k]) for k in (A, B))
    flora._global = glob
    for ranks in ((1, 2), (4, 1, 3)):
        uploads = [_upload(10 * (i + 1), r, i) for i, r in enumerate(ranks)]
        new = flora.aggregate_lora(1, glob, uploads)
        np.testing.assert_array_equal(new[A], glob[A])  # the next round starts fresh
        np.testing.assert_array_equal(new[B], 0.0)
    merge = flora.base_merge()
    assert merge[A].shape == (1 + 2 + 4 + 1 + 3, D_IN)
    meta, arrays = flora.state_dict()
    restored = FLoRA()
    restored.load_state_dict(meta, arrays)
    assert [a.shape[0] for _, a in restored.stacks[M]] == [3, 8]
    for key, value in restored.base_merge().items():
        np.testing.assert_array_equal(value, merge[key])
    for key in (A, B):
        np.testing.assert_array_equal(restored.fresh[key], flora.fresh[key])


@pytest.mark.parametrize("shape", [(5, 3, 7), (6, 9, 4), (4, 2, 4)])
def test_svd_of_product_matches_the_svd_of_the_formed_matrix(shape, monkeypatch):
    from haflq_flower.lora import aggregate

    d_out, q, d_in = shape
    rng = np.random.default_rng(q)
    left, right = rng.normal(size=(d_out, q)), rng.normal(size=(q, d_in))
    full = np.linalg.svd(left @ right, compute_uv=False)
    k = min(q, d_out, d_in)
    real_svd = np.linalg.svd

    def failing(a, *args, **kwargs):
        if a.shape[0] <= q:  # only the small core fails
            raise np.linalg.LinAlgError("SVD did not converge")
        return real_svd(a, *args, **kwargs)

    for fallback in (False, True):
        if fallback:  # LAPACK's SVD fails to converge: the eigh path
            monkeypatch.setattr(aggregate.np.linalg, "svd", failing)
        u, sv, vt = aggregate.svd_of_product(left, right)
        np.testing.assert_allclose(sv[:k], full[:k], rtol=1e-8)
        np.testing.assert_allclose((u[:, :k] * sv[:k]) @ vt[:k], left @ right, atol=1e-8)
        np.testing.assert_allclose(vt[:k] @ vt[:k].T, np.eye(k), atol=1e-8)


@pytest.mark.parametrize("bits", [32, 16])
def test_value_peers_rebuild_client_values_from_the_global_as_sent(bits):
    """A client's values are what it received plus its deltas: with the 16-bit downlink,
    the float16-rounded global (else FlexLoRA/FLoRA would not be exact)."""
    from haflq_flower.strategy import FedITTruncated
    from haflq_flower.strategy.base import RoundStats

    glob = _state()
    up = _upload(1, R, 0)  # one client holding every component: output = its values
    strategy = FedITTruncated(downlink_bits=bits)
    strategy._global = glob
    strategy.stats[1] = RoundStats(round=1)
    up.trained, up.scores = up.selection, {M: np.zeros(R)}
    new = strategy.aggregate(1, glob, [up])
    sent = glob[A].astype(np.float16) if bits == 16 else glob[A]
    expected = sent.astype(np.float32) + up.arrays[A]
    np.testing.assert_array_equal(new[A], expected)
    if bits == 16:  # the rounding is visible at float32 precision
        assert not np.array_equal(new[A], glob[A] + up.arrays[A])


@pytest.mark.slow
def test_fedex_lora_merges_the_exact_residual_and_peft_reproduces_the_model(tmp_path):
    """FedEx-LoRA on three tiers (ranks 2, 4, 8): the global model is exactly the average
    of the clients' models every round (residual 0), the residual rides in the merge
    record (growing downlink), the next round starts from the averaged adapter (B != 0),
    and the saved rank-expanded adapter reproduces the server's evaluation with PEFT."""
    import torch
    from peft import PeftModel

    from haflq_flower.checkpoint import load_checkpoint
    from haflq_flower.config import parse_run_config
    from haflq_flower.data import load_task
    from haflq_flower.model import load_base_model
    from haflq_flower.train import evaluate_run_rows

    from .conftest import TINY
    from .test_simulation import _simulate

    overrides = {
        **TINY,
        "strategy.name": "fedex-lora",
        "model.quantization": "none",
        "output.dir": str(tmp_path),
    }
    results = _simulate(overrides, 3)
    rounds = results["rounds"]
    assert all(r["aggregation_residual"] < 1e-5 for r in rounds[1:])
    assert rounds[2]["bytes_down"] > rounds[1]["bytes_down"]
    ckpt = load_checkpoint(tmp_path)
    b_keys = [k for k in ckpt.global_state if k.endswith(".lora_B.weight")]
    assert all(ckpt.global_state[k].any() for k in b_keys)
    # two rounds of residuals of rank (2 + 4 + 8) + 8, and the final adapter's 8
    cfg = parse_run_config(overrides)
    task = load_task(cfg.data)
    base, tok = load_base_model(cfg.model, 2, torch.device("cpu"))
    loaded = PeftModel.from_pretrained(base, results["final"]["adapter_dir"])
    assert loaded.peft_config["default"].r == 2 * 22 + 8
    peft = evaluate_run_rows(cfg, loaded, tok, task.test, torch.device("cpu"), "peft")
    assert peft.loss == pytest.approx(rounds[-1]["loss"], rel=1e-3)


@pytest.mark.slow
def test_lora_fair_corrects_b_and_ends_closer_to_the_average_than_fedit_trunc(tmp_path):
    """Same clients, same seed: LoRA-FAIR's only difference from FedIT-trunc is the
    server's correction of B, which lowers the aggregation residual of round 1 (the
    rounds after differ in their starting point)."""
    from .conftest import TINY
    from .test_simulation import _simulate

    runs = {
        name: _simulate({**TINY, "strategy.name": name, "output.dir": str(tmp_path / name)}, 3)
        for name in ("lora-fair", "fedit-trunc")
    }
    fair, trunc = (
        runs[n]["rounds"][1]["aggregation_residual"] for n in ("lora-fair", "fedit-trunc")
    )
    assert 0.0 <= fair < trunc
    # no extra communication: the same bytes each way
    assert (
        runs["lora-fair"]["rounds"][1]["bytes_up"] == runs["fedit-trunc"]["rounds"][1]["bytes_up"]
    )
    assert (
        runs["lora-fair"]["rounds"][1]["bytes_down"]
        == runs["fedit-trunc"]["rounds"][1]["bytes_down"]
    )
