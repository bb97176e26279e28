"""Local training and evaluation of a LoRA-wrapped classifier (the task module)."""

from __future__ import annotations

import logging
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .config import RunConfig, TrainConfig
from .data import tokenize

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    train_s: float
    peak_mem_bytes: int
    trainable_params: int = 0
    optimizer_state_bytes: int = 0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: lifetime peak is the best the OS tells us
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int]]:
    """Measure peak memory over a block: CUDA allocator peak on GPU, sampled RSS on CPU.

    Yields a one-element list that holds the peak in bytes once the block exits.
    """
    out = [0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out[0] = int(torch.cuda.max_memory_allocated(device))
        return
    stop = threading.Event()
    peak = [_rss_bytes()]

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out[0] = max(peak[0], _rss_bytes())


def autocast_for(device: torch.device, compute_dtype: str):
    dtype = _DTYPES[compute_dtype]
    if dtype == torch.float32:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; the classification head has its own rate."""
    lora, head = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (lora if "lora_" in name else head).append(param)
    groups = [{"params": lora, "lr": cfg.learning_rate}]
    if head:
        groups.append({"params": head, "lr": cfg.head_learning_rate})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Switch activation recomputation in the transformer blocks on or off.

    Non-reentrant checkpointing (transformers' default): LoRA gradients are the same as
    without it, only the activations of a block are recomputed in backward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if enabled == base.is_activation_checkpointing:
        return
    if not enabled:
        base.activation_checkpointing_disable()
        base.disable_input_require_grads()
        return
    if not base.supports_gradient_checkpointing:
        raise ValueError(
            f"{type(base).__name__} does not support gradient checkpointing; "
            "set train.gradient-checkpointing=false"
        )
    base.activation_checkpointing_enable({"use_reentrant": False})


def sample_batches(num_rows: int, steps: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Seeded epochs of shuffled row indices, cut into ``steps`` batches."""
    rng = np.random.default_rng(seed)
    order = np.array([], dtype=np.int64)
    for _ in range(steps):
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(num_rows)])
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def train_local(
    model: torch.nn.Module,
    tokenizer,
    frame: pd.DataFrame,
    cfg: TrainConfig,
    *,
    max_length: int,
    compute_dtype: str,
    device: torch.device,
    seed: int,
    desc: str = "train",
    after_backward: Callable[[], None] | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` optimizer steps on ``frame``; a fresh optimizer each call.

    ``after_backward`` runs after every backward pass, before the optimizer step (the
    importance tracker reads the gradients there).
    """
    if len(frame) == 0:
        raise ValueError("cannot train on an empty partition")
    torch.manual_seed(seed)
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    model.train()
    optimizer = make_optimizer(model, cfg)
    texts = frame["text"].tolist()
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.long)
    losses: list[float] = []
    examples = 0
    start = time.perf_counter()
    log_every = max(1, cfg.local_steps // 5)
    with peak_memory(device) as peak:
        for step, rows in enumerate(
            sample_batches(len(frame), cfg.local_steps, cfg.batch_size, seed), start=1
        ):
            batch = tokenize(tokenizer, [texts[i] for i in rows], max_length, device)
            with autocast_for(device, compute_dtype):
                out = model(**batch, labels=labels[rows].to(device))
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            examples += len(rows)
            if step % log_every == 0 or step == cfg.local_steps:
                log.info(
                    "%s: step %d/%d loss %.4f (%.1fs)",
                    desc,
                    step,
                    cfg.local_steps,
                    np.mean(losses[-log_every:]),
                    time.perf_counter() - start,
                )
    optimizer.zero_grad(set_to_none=True)
    return TrainResult(
        loss=float(np.mean(losses)),
        num_examples=examples,
        steps=len(losses),
        train_s=time.perf_counter() - start,
        peak_mem_bytes=peak[0],
        trainable_params=sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of the optimizer's state tensors (AdamW: two moments per parameter)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    # every row's predicted label, in the order of the evaluated frame
    predictions: np.ndarray


def evaluate(
    model: torch.nn.Module, tokenizer, frame: pd.DataFrame, **kwargs
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``frame`` (keywords: :func:`evaluate_rows`)."""
    result = evaluate_rows(model, tokenizer, frame, **kwargs)
    return result.loss, result.accuracy


@torch.no_grad()
def evaluate_rows(
    model: torch.nn.Module,
    tokenizer,
    frame: pd.DataFrame,
    *,
    batch_size: int,
    max_length: int,
    compute_dtype: str,
    device: torch.device,
    desc: str = "eval",
) -> EvalResult:
    """Mean cross-entropy, accuracy and every row's predicted label over ``frame``."""
    if len(frame) == 0:
        raise ValueError("cannot evaluate on an empty set")
    model.eval()
    texts = frame["text"].tolist()
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.long)
    total_loss, correct, predicted = 0.0, 0, []
    num_batches = math.ceil(len(texts) / batch_size)
    start = time.perf_counter()
    for b in range(num_batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        batch = tokenize(tokenizer, texts[sl], max_length, device)
        target = labels[sl].to(device)
        with autocast_for(device, compute_dtype):
            logits = model(**batch).logits.float()
        total_loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        guess = logits.argmax(-1)
        correct += int((guess == target).sum())
        predicted.append(guess.cpu().numpy())
        if (b + 1) % max(1, num_batches // 4) == 0:
            log.info(
                "%s: batch %d/%d (%.1fs)", desc, b + 1, num_batches, time.perf_counter() - start
            )
    model.train()
    return EvalResult(
        loss=total_loss / len(texts),
        accuracy=correct / len(texts),
        predictions=np.concatenate(predicted).astype(np.int64),
    )


def evaluate_run_rows(
    cfg: RunConfig, model: torch.nn.Module, tokenizer, rows: pd.DataFrame, device, desc: str
) -> EvalResult:
    """:func:`evaluate_rows` with the run config's batch size, length and dtype (what the
    server and a client's evaluations share)."""
    return evaluate_rows(
        model,
        tokenizer,
        rows,
        batch_size=cfg.train.eval_batch_size,
        max_length=cfg.model.max_length,
        compute_dtype=cfg.model.compute_dtype,
        device=device,
        desc=desc,
    )
