"""Block-wise base precision: allocation (pure), real bnb modules, salience metrics."""

import itertools

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from flwr.app import Message
from transformers import LlamaConfig, LlamaForCausalLM

from haflq_flower.data import tokenize
from haflq_flower.model import load_lora_model
from haflq_flower.profiles import ClientProfile, TierTable
from haflq_flower.quant.blocks import (
    BlockLayout,
    BudgetError,
    LinearShape,
    allocate_block_bits,
    combine_salience,
    linear_bytes,
    pattern_from_str,
    random_salience,
    upgrade_order,
)
from haflq_flower.quant.mixed import (
    Linear8bitFrozen,
    Linear16,
    apply_block_bits,
    base_weight_bytes,
    block_bits_of,
    block_layout,
    block_linears,
    store_embeddings_16bit,
    transformer_blocks,
)
from haflq_flower.quant.salience import METRICS, block_salience
from haflq_flower.train import autocast_for

CPU = torch.device("cpu")


def _layout(num_blocks: int = 4, fixed: int = 1000) -> BlockLayout:
    block = (LinearShape(64, 32), LinearShape(32, 64, bias=True))
    return BlockLayout(blocks=(block,) * num_blocks, fixed_bytes=fixed)


# ------------------------------------------------------------ pure allocation
def test_linear_bytes_formulas():
    shape = LinearShape(out_features=10, in_features=64, bias=True)
    n = 640
    assert linear_bytes(shape, 4) == n // 2 + (n // 64) * 4 + 40
    assert linear_bytes(shape, 8) == n + 10 * 4 + 40
    assert linear_bytes(shape, 16) == 2 * n + 40
    with pytest.raises(ValueError):
        linear_bytes(shape, 3)


@pytest.mark.parametrize("seed", range(5))
def test_allocation_fits_is_greedy_and_follows_salience(seed):
    layout = _layout(num_blocks=6)
    rng = np.random.default_rng(seed)
    salience = rng.random(6)
    low, high = layout.weight_bytes((4,) * 6), layout.weight_bytes((16,) * 6)
    for budget in np.linspace(low, high + 100, 40):
        pattern = allocate_block_bits(salience, layout, budget)
        used = layout.weight_bytes(pattern)
        assert used <= budget
        # greedy: the next upgrade on the ladder would not fit
        order = upgrade_order(salience)
        ladder = [(i, 4, 8) for i in order] + [(i, 8, 16) for i in order]
        nxt = next(((i, a, b) for i, a, b in ladder if pattern[i] == a), None)
        if nxt is not None:
            i, a, b = nxt
            assert used + layout.block_bytes(i, b) - layout.block_bytes(i, a) > budget
        # salience order: a more salient block never has fewer bits
        for i, j in itertools.permutations(range(6), 2):
            if salience[i] > salience[j]:
                assert pattern[i] >= pattern[j]


def test_allocation_is_monotone_in_budget():
    layout = _layout(num_blocks=5)
    salience = [0.3, 0.9, 0.1, 0.5, 0.5]
    budgets = np.linspace(layout.weight_bytes((4,) * 5), layout.weight_bytes((16,) * 5), 60)
    patterns = [allocate_block_bits(salience, layout, b) for b in budgets]
    for smaller, larger in itertools.pairwise(patterns):
        assert all(a <= b for a, b in zip(smaller, larger, strict=True))
    assert patterns[0] == (4,) * 5 and patterns[-1] == (16,) * 5


def test_allocation_known_answer_and_infeasible_budget():
    layout = _layout(num_blocks=3)
    all4 = layout.weight_bytes((4, 4, 4))
    up8 = layout.block_bytes(0, 8) - layout.block_bytes(0, 4)
    # room for exactly two 4->8 upgrades: the two most salient blocks get them
    assert allocate_block_bits([0.1, 0.7, 0.5], layout, all4 + 2 * up8) == (4, 8, 8)
    # ties go to the shallower block
    assert allocate_block_bits([0.5, 0.5, 0.5], layout, all4 + up8) == (8, 4, 4)
    assert allocate_block_bits([0.1, 0.7, 0.5], layout, float("inf")) == (16, 16, 16)
    with pytest.raises(BudgetError, match="below the all-4-bit model"):
        allocate_block_bits([0.1, 0.7, 0.5], layout, all4 - 1)
    with pytest.raises(ValueError):
        allocate_block_bits([0.1, 0.7], layout, all4)
    with pytest.raises(ValueError):
        allocate_block_bits([0.1, float("nan"), 0.5], layout, all4)


def test_random_salience_combine_and_pattern_parsing():
    assert sorted(random_salience(7, seed=3)) == list(range(7))
    assert random_salience(7, 3).tolist() == random_salience(7, 3).tolist()
    # each client's vector is scaled to sum 1 before the weighted mean
    combined = combine_salience([np.array([1.0, 3.0]), np.array([30.0, 10.0])], [1, 1])
    np.testing.assert_allclose(combined, [0.5, 0.5])
    assert pattern_from_str("4,8,16", 3) == (4, 8, 16)
    for bad in ("4,5", "x", "4,8"):
        with pytest.raises(ValueError):
            pattern_from_str(bad, 3)


def test_memory_budget_in_profiles_and_tiers():
    tiers = TierTable.from_lists(["a", "b"], [2, 4], memory_mb=[1.5, 0])
    assert tiers.profiles[0].memory_budget_bytes == 1.5 * 2**20
    assert tiers.profiles[1].memory_budget_bytes == float("inf")
    assert ClientProfile.from_mapping({"memory-mb": "2"}).memory_mb == 2.0
    assert ClientProfile.from_mapping(tiers.profiles[0].to_record()) == tiers.profiles[0]


# --------------------------------------------------------- real bnb modules
@pytest.mark.parametrize("pattern", [(4, 4), (8, 8), (16, 16), (4, 16), (8, 4)])
def test_pattern_builds_real_modules_with_exact_bytes_and_lora_grads(tiny_config, pattern):
    cfg = tiny_config(model__compute_dtype="float32")
    model, tokenizer = load_lora_model(
        cfg.model, cfg.lora, 2, seed=0, device=CPU, block_bits=pattern
    )
    kinds = {4: bnb.nn.Linear4bit, 8: Linear8bitFrozen, 16: Linear16}
    for block, bits in zip(transformer_blocks(model), pattern, strict=True):
        base_layers = [m.base_layer for n, m in block.named_modules() if hasattr(m, "base_layer")]
        assert base_layers and all(type(b) is kinds[bits] for b in base_layers)
    assert block_bits_of(model) == pattern
    # measured bytes are what the allocation's formulas predict
    layout = block_layout(model)
    assert base_weight_bytes(model) == layout.weight_bytes(pattern)

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    batch = tokenize(tokenizer, ["a fine film", "a dull film"], 32)

    def step():
        model.zero_grad(set_to_none=True)
        model.train()
        model(**batch, labels=torch.tensor([1, 0])).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    step()
    model.eval()  # an evaluation pass must not break later training (bnb CPU repack bug)
    with torch.no_grad(), autocast_for(CPU, "float32"):
        model(**batch)
    grads = step()
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_linear16_matches_an_upcast_linear_in_value_and_input_gradient():
    torch.manual_seed(0)
    layer = Linear16(6, 5, bias=True)
    layer.weight = torch.nn.Parameter(layer.weight.data.bfloat16(), requires_grad=False)
    layer.bias.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ref = torch.nn.functional.linear(ref_x, layer.weight.float(), layer.bias)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.grad is None


def test_all_4bit_pattern_matches_transformers_nf4(tiny_config):
    from haflq_flower.model import load_base_model

    torch.manual_seed(0)
    ref, tokenizer = load_base_model(
        tiny_config(model__quantization="nf4", model__compute_dtype="float32").model, 2, CPU
    )
    store_embeddings_16bit(ref, torch.float32)  # the block path keeps embeddings in 16 bits
    torch.manual_seed(0)
    mine, _ = load_base_model(tiny_config(model__compute_dtype="float32").model, 2, CPU, (4, 4))
    batch = tokenize(tokenizer, ["the same numbers"], 16)
    with torch.no_grad():
        torch.testing.assert_close(mine(**batch).logits, ref(**batch).logits, rtol=0, atol=0)
    assert base_weight_bytes(mine) == base_weight_bytes(ref)


def test_apply_refuses_a_quantized_model(tiny_config):
    from haflq_flower.model import load_base_model

    model, _ = load_base_model(tiny_config(model__quantization="nf4").model, 2, CPU)
    with pytest.raises(ValueError, match="unquantized"):
        apply_block_bits(model, (8, 8), torch.float32, CPU)
    with pytest.raises(ValueError, match="levels for"):
        apply_block_bits(model, (8,), torch.float32, CPU)


# ------------------------------------------------------------------ salience
def _lm(num_layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (4, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _scale_outputs(block) -> None:
    """A block that writes 40x more into the residual stream."""
    block.self_attn.o_proj.weight.mul_(40.0)
    block.mlp.down_proj.weight.mul_(40.0)


def _add_outliers(block) -> None:
    """One large outlier per 64-weight NF4 group: 4-bit rounds the others to zero."""
    for _, linear in block_linears(block):
        w = linear.weight.view(-1, 64)
        w[:, 0] = 20 * w.abs().max()


@pytest.mark.parametrize(
    "metric, damage",
    [
        ("gradient", _scale_outputs),
        ("influence", _scale_outputs),
        ("quantization", _add_outliers),
        ("recovery", _add_outliers),
    ],
)
def test_a_damaged_block_ranks_highest(metric, damage):
    """Damaging block 2 the way each metric is meant to notice makes it rank first."""
    model = _lm()
    batch = _batch()
    before = block_salience(model, batch, metric)
    assert before.shape == (4,) and np.all(np.isfinite(before))
    with torch.no_grad():
        damage(transformer_blocks(model)[2])
    after = block_salience(model, batch, metric)
    assert int(np.argmax(after)) == 2
    assert after[2] > before[2]


def test_recovery_equals_quantization_for_a_single_block():
    """With one block, restoring it recovers all of the all-4-bit KL, which is exactly
    what quantizing it alone costs: the two metrics must agree to rounding."""
    model = _lm(num_layers=1)
    batch = _batch()
    quant = block_salience(model, batch, "quantization")
    recovery = block_salience(model, batch, "recovery")
    assert quant[0] > 0
    np.testing.assert_allclose(recovery, quant, rtol=1e-5)


def test_salience_leaves_the_model_unchanged():
    model = _lm()
    batch = _batch()
    exact = {n: p.detach().clone() for n, p in model.named_parameters()}
    for metric in METRICS:
        block_salience(model, batch, metric)
    for n, p in model.named_parameters():
        assert torch.equal(p, exact[n]) and p.grad is None
    with pytest.raises(ValueError, match="unknown salience metric"):
        block_salience(model, batch, "magic")


# ------------------------------------------------------ server-side planning
class SalienceGrid:
    """Answers salience queries with a per-node vector (or garbage)."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.asked: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import MetricRecord, RecordDict

        from haflq_flower.lora.state import to_array_record
        from haflq_flower.strategy.blocks import SALIENCE_KEY, SALIENCE_QUERY

        replies = []
        for msg in messages:
            assert msg.metadata.message_type == SALIENCE_QUERY
            assert msg.content["config"]["rows"] == 8
            node = msg.metadata.dst_node_id
            self.asked.append(node)
            vector = np.asarray(self.answers[node], dtype=np.float64)
            content = RecordDict(
                {
                    SALIENCE_KEY: to_array_record({SALIENCE_KEY: vector}),
                    "metrics": MetricRecord({"num-examples": 8}),
                }
            )
            replies.append(Message(content=content, reply_to=msg))
        return replies


def _planner(precision: str = "salience"):
    from haflq_flower.strategy.blocks import BlockPlanner

    planner = BlockPlanner(precision, metric="gradient", calibration_rows=8, calibration_clients=2)
    planner.layout = _layout(num_blocks=3)
    return planner


def test_planner_asks_the_largest_memory_nodes_and_drops_bad_answers():
    planner = _planner()
    profiles = {
        1: ClientProfile("low", memory_mb=0.001),
        2: ClientProfile("high", memory_mb=0),  # unlimited: the largest
        3: ClientProfile("mid", memory_mb=0.01),
    }
    grid = SalienceGrid({2: [1.0, 3.0, 0.0], 3: [1.0, float("nan"), 1.0]})
    spent = planner.plan(grid, profiles, server_round=1, timeout=1)
    assert sorted(grid.asked) == [2, 3] and spent > 0
    np.testing.assert_allclose(planner.salience, [0.25, 0.75, 0.0])  # node 3 was rejected
    assert planner.plan(grid, profiles, 2, 1) == 0 and len(grid.asked) == 2  # once per run

    all4 = planner.layout.weight_bytes((4, 4, 4))
    up8 = planner.layout.block_bytes(0, 8) - planner.layout.block_bytes(0, 4)
    tight = ClientProfile(memory_mb=(all4 + up8) / 2**20)
    assert planner.pattern_for(1, tight) == (4, 8, 4)  # block 1 is the most salient
    too_small = ClientProfile(memory_mb=(all4 - 1) / 2**20)
    assert planner.pattern_for(1, too_small) == (4, 4, 4)  # warned, run goes on
    assert planner.pattern_for(1, ClientProfile()) == (16, 16, 16)


def test_planner_without_any_usable_salience_says_what_to_do():
    from haflq_flower.strategy.blocks import SalienceError

    planner = _planner()
    grid = SalienceGrid({1: [1.0, 2.0]})  # wrong length
    with pytest.raises(SalienceError, match="blocks.precision=random"):
        planner.plan(grid, {1: ClientProfile()}, 1, 1)


def test_uniform_and_random_planners_need_no_query():
    uniform = _planner("uniform-8")
    assert uniform.plan(None, {}, 1, 1) == 0
    assert uniform.pattern_for(1, ClientProfile(memory_mb=1e-9)) == (8, 8, 8)
    rand = _planner("random")
    assert rand.plan(None, {}, 1, 1) == 0
    assert sorted(rand.salience) == [0.0, 1.0, 2.0]
    off = _planner("off")
    assert off.pattern_for(1, ClientProfile()) is None


def test_client_model_is_reused_while_the_pattern_holds_and_rebuilt_when_it_changes(tiny_config):
    from haflq_flower import client_app

    cfg = tiny_config()
    client_app._MODEL_CACHE.clear()
    first, _ = client_app._model(cfg, 2, CPU, (4, 8))
    assert client_app._model(cfg, 2, CPU, (4, 8))[0] is first
    assert client_app._model(cfg, 2, CPU, any_bits=True)[0] is first  # evaluation
    second, _ = client_app._model(cfg, 2, CPU, (16, 8))
    assert second is not first and block_bits_of(second) == (16, 8)
    assert len(client_app._MODEL_CACHE) == 1  # the old model is not kept alive
    client_app._MODEL_CACHE.clear()


@pytest.mark.parametrize("pattern", [(4, 16), (8, 8)])
def test_gradient_checkpointing_gives_the_same_lora_gradients_and_keeps_less(tiny_config, pattern):
    from haflq_flower.train import set_gradient_checkpointing

    cfg = tiny_config(model__compute_dtype="float32", lora__dropout=0.0)
    model, tokenizer = load_lora_model(
        cfg.model, cfg.lora, 2, seed=0, device=CPU, block_bits=pattern
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    batch = tokenize(tokenizer, ["a fine film", "a dull film", "so so"], 32)

    def step() -> tuple[dict[str, torch.Tensor], int]:
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        model.zero_grad(set_to_none=True)
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch, labels=torch.tensor([1, 0, 1])).loss
        loss.backward()
        return {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }, saved[0]

    plain, plain_saved = step()
    set_gradient_checkpointing(model, True)
    assert model.get_base_model().is_activation_checkpointing
    ckpt, ckpt_saved = step()
    assert ckpt.keys() == plain.keys() and any("lora_A" in n for n in ckpt)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-7)
    assert ckpt_saved < plain_saved / 2  # only block inputs stay alive across the forward
    set_gradient_checkpointing(model, False)
    assert not model.get_base_model().is_activation_checkpointing
    _, again = step()
    assert again == plain_saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_int8_layer_matches_bitsandbytes_and_keeps_no_input(dtype):
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 40, bias=True)
    ours = apply_to_one(dense, dtype)
    theirs = apply_to_one(dense, dtype)
    theirs.__class__ = bnb.nn.Linear8bitLt  # bitsandbytes' own CPU training path
    assert isinstance(ours, bnb.nn.Linear8bitLt) and ours.weight.dtype == torch.int8
    x = torch.randn(3, 5, 96, dtype=dtype)
    outs, grads, kept = [], [], []
    for layer in (ours, theirs):
        layer.train()
        xi = x.clone().requires_grad_(True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(_keep(saved), lambda t: t):
            out = layer(xi)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
        kept.append(saved)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # only the int8 weight and its row scales are kept: no activation-sized tensor
    assert [(t.dtype, tuple(t.shape)) for t in kept[0]] == [
        (torch.int8, (40, 96)),
        (ours.state.SCB.dtype, (40,)),
    ]
    # evaluation is bitsandbytes' own int8 inference path
    ours.eval()
    with torch.no_grad():
        assert ours(x).shape == (3, 5, 40)


def _keep(saved: list[torch.Tensor]):
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    return pack


def apply_to_one(dense: torch.nn.Linear, dtype: torch.dtype) -> torch.nn.Module:
    from haflq_flower.quant.mixed import _quantized_linear

    return _quantized_linear(dense, 8, dtype, "nf4", CPU)
