"""ClientApp: local LoRA fine-tuning of the (quantized) base model on this node's data."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import RunConfig, parse_run_config
from .data import client_partition, load_task
from .logs import setup_logging
from .lora.state import from_array_record, load_trainable_state, to_array_record, trainable_state
from .model import load_lora_model, select_device
from .strategy.base import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES
from .train import evaluate, train_local

log = logging.getLogger(__name__)

# A simulated node's process (Ray actor) serves many messages: keep the model loaded.
# Every message overwrites all trainable state, so reuse never leaks between clients.
_MODEL_CACHE: dict[tuple, tuple] = {}


def _model(cfg: RunConfig, num_labels: int, device: torch.device):
    key = (cfg.model, cfg.lora, num_labels, cfg.seed, str(device))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_lora_model(cfg.model, cfg.lora, num_labels, cfg.seed, device)
    return _MODEL_CACHE[key]


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    try:
        return int(node["partition-id"]), int(node["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; set partition-id and num-partitions in --node-config"
        ) from err


def handle_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Load the received adapter, train on the local partition, reply with the adapter."""
    pid, num_parts = _partition(context)
    server_round = int(msg.content[CONFIG_KEY].get("server-round", 0))
    device = select_device()
    task = load_task(cfg.data)
    model, tokenizer = _model(cfg, task.num_labels, device)
    load_trainable_state(model, from_array_record(msg.content[ARRAYS_KEY]))
    frame = client_partition(cfg.data, pid, num_parts)
    result = train_local(
        model,
        tokenizer,
        frame,
        cfg.train,
        max_length=cfg.model.max_length,
        compute_dtype=cfg.model.compute_dtype,
        device=device,
        seed=cfg.seed * 1_000_003 + server_round * 1009 + pid,
        desc=f"client {pid} round {server_round}",
    )
    metrics = MetricRecord(
        {
            # FedAvg weight n_k: the size of the local dataset (not the examples seen, which
            # is steps x batch and the same for every client).
            NUM_EXAMPLES: len(frame),
            "examples-seen": result.num_examples,
            "train-loss": result.loss,
            "train-s": result.train_s,
            "steps": result.steps,
            "peak-mem-bytes": result.peak_mem_bytes,
        }
    )
    reply = RecordDict({ARRAYS_KEY: to_array_record(trainable_state(model)), METRICS_KEY: metrics})
    return Message(content=reply, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Evaluate the received adapter on this node's own partition."""
    pid, num_parts = _partition(context)
    device = select_device()
    task = load_task(cfg.data)
    model, tokenizer = _model(cfg, task.num_labels, device)
    load_trainable_state(model, from_array_record(msg.content[ARRAYS_KEY]))
    frame = client_partition(cfg.data, pid, num_parts)
    loss, accuracy = evaluate(
        model,
        tokenizer,
        frame,
        batch_size=cfg.train.eval_batch_size,
        max_length=cfg.model.max_length,
        compute_dtype=cfg.model.compute_dtype,
        device=device,
        desc=f"client {pid} eval",
    )
    metrics = MetricRecord({NUM_EXAMPLES: len(frame), "loss": loss, "accuracy": accuracy})
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` win over the run config (for in-process simulations)."""
    client_app = ClientApp()

    def config(context: Context) -> RunConfig:
        setup_logging()
        return parse_run_config({**dict(context.run_config), **(overrides or {})})

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, config(context))

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, config(context))

    return client_app


app = make_client_app()
