"""ClientApp: local LoRA fine-tuning of the (quantized) base model on this node's data."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .config import RunConfig
from .data import client_partition, device_frame, load_task, tokenize
from .logs import setup_logging
from .lora.components import (
    A_SUFFIX,
    B_SUFFIX,
    LoraState,
    component_delta,
    gather,
    lora_modules,
    only_factor,
    without_factor,
)
from .lora.merge import merge_stacks
from .lora.residual import personal_residual_terms
from .lora.robust import state_norm
from .lora.state import from_array_record, load_trainable_state, to_array_record, trainable_state
from .lora.view import MODES, component_view, frozen_a
from .model import (
    load_calibration_model,
    load_lora_model,
    release_freed_memory,
    select_device,
)
from .privacy import LOCAL, add_noise, clip_update
from .profiles import resolve_profile
from .quant.blocks import pattern_from_str, pattern_to_str
from .quant.mixed import base_weight_bytes
from .quant.salience import block_salience
from .strategy import parse_client_config
from .strategy.ffa import trainable_part
from .train import TrainResult, evaluate_run_rows, train_local
from .wire import (
    ARRAYS_KEY,
    B_START_NORM,
    CONFIG_KEY,
    EXAMPLES_SEEN,
    FREEZE_A,
    KEEP_B,
    LOAD_S,
    MERGE_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    OPTIMIZER_STATE_BYTES,
    PARTITION_ID,
    PEAK_MEM_BYTES,
    PERSONAL_A_KEY,
    PERSONAL_B_KEY,
    PERSONAL_EVAL,
    PERSONAL_RESIDUAL,
    PREDICTIONS_KEY,
    PROFILE_KEY,
    RAY_NODE,
    RESIDUAL_DEN,
    RESIDUAL_NUM,
    SALIENCE_KEY,
    STEPS,
    TRAIN_LOSS,
    TRAIN_S,
    TRAINABLE_PARAMS,
    WEIGHT_BYTES,
    decode_download,
    encode_upload,
    record_to_arrays,
)

log = logging.getLogger(__name__)

# A simulated node's process (Ray actor) serves many messages: keep the model loaded
# while its block pattern is unchanged, rebuild it when the pattern changes. Every
# message overwrites all trainable state, so reuse never leaks between clients. A
# deployed node starts a new process per message: there the 4-bit base comes from the
# on-disk cache (model.load_base_model(cache_quantized=True)).
_MODEL_CACHE: dict[tuple, tuple] = {}
# Seconds the last _model() call spent building or loading (0 when reused from memory).
_LAST_LOAD_S = 0.0


def _model(
    cfg: RunConfig,
    num_labels: int,
    device: torch.device,
    block_bits: tuple[int, ...] | None = None,
    any_bits: bool = False,
):
    """The cached (model, tokenizer) for this config and block pattern.

    ``any_bits``: reuse whatever pattern is loaded (evaluation messages carry none).
    """
    global _LAST_LOAD_S
    _LAST_LOAD_S = 0.0
    key = (cfg.model, cfg.lora, num_labels, cfg.seed, str(device))
    if any_bits and len(_MODEL_CACHE) == 1 and next(iter(_MODEL_CACHE))[:-1] == key:
        return next(iter(_MODEL_CACHE.values()))
    key = (*key, block_bits)
    if key not in _MODEL_CACHE:
        start = time.perf_counter()
        _MODEL_CACHE.clear()  # free the old model before building the new one
        release_freed_memory()
        if block_bits is not None:
            log.info("building the base with block bits %s", pattern_to_str(block_bits))
        _MODEL_CACHE[key] = load_lora_model(
            cfg.model, cfg.lora, num_labels, cfg.seed, device, block_bits, cache_quantized=True
        )
        _LAST_LOAD_S = time.perf_counter() - start
    return _MODEL_CACHE[key]


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    try:
        return int(node["partition-id"]), int(node["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; set partition-id and num-partitions in --node-config, "
            "or data-files (the device's own data)"
        ) from err


def _client_data(context: Context, cfg: RunConfig) -> tuple[int, pd.DataFrame]:
    """(id for seeds and reports, training rows) of this node: its own ``data-files``
    when the node config names them (a real device), else its partition of the run's
    dataset (simulation, or a device that takes a partition)."""
    node = context.node_config
    if "data-files" in node:
        task = load_task(cfg.data)
        pid = int(node.get("partition-id", 0))
        return pid, device_frame(cfg.data, str(node["data-files"]), task.label_names)
    pid, num_parts = _partition(context)
    return pid, client_partition(cfg.data, pid, num_parts)


class SimulatedDropout(RuntimeError):
    """Raised by a client that ``simulation.dropout`` takes out of a round."""


def drops_out(seed: int, server_round: int, partition: int, probability: float) -> bool:
    """Whether a partition drops out of a round: a seeded coin, the same in every run."""
    if probability <= 0.0:
        return False
    return bool(np.random.default_rng([seed, server_round, partition, 7]).random() < probability)


def client_device():
    """The device this client trains on; on a GPU shared by several simulated clients
    (``--client-gpus 0.25``: four Ray actors per GPU) the process's CUDA allocator is
    capped at its share, so a client that outgrows it fails alone, with an out-of-memory
    error, instead of taking the GPU from the clients beside it."""
    device = select_device()
    if device.type == "cuda":
        _cap_to_gpu_share()
    return device


@functools.cache
def _cap_to_gpu_share() -> float:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 1.0
    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0))
    if 0.0 < share < 1.0:
        torch.cuda.set_per_process_memory_fraction(share)
        log.info("CUDA memory capped at this client's GPU share, %.2f", share)
    return share


def ray_node_tag() -> int:
    """The first 48 bits of the Ray node this client runs on, as an integer (metrics hold
    numbers only); 0 outside Ray (a deployed SuperNode). Shows which machine of a Ray
    cluster trained which client."""
    ray = sys.modules.get("ray")  # never imported here: only where Ray already runs us
    if ray is None or not ray.is_initialized():
        return 0
    return int(ray.get_runtime_context().get_node_id()[:12], 16)


def _train_metrics(num_rows: int, result: TrainResult) -> MetricRecord:
    return MetricRecord(
        {
            RAY_NODE: ray_node_tag(),
            # FedAvg weight n_k: the size of the local dataset (not the examples seen, which
            # is steps x batch and the same for every client).
            NUM_EXAMPLES: num_rows,
            EXAMPLES_SEEN: result.num_examples,
            TRAIN_LOSS: result.loss,
            TRAIN_S: result.train_s,
            STEPS: result.steps,
            PEAK_MEM_BYTES: result.peak_mem_bytes,
            TRAINABLE_PARAMS: result.trainable_params,
            OPTIMIZER_STATE_BYTES: result.optimizer_state_bytes,
        }
    )


def handle_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Load the received adapter, train on the local partition, reply with the update.

    Without a ``mode`` in the config (FedIT), the whole adapter is trained and sent back.
    With ``mode`` = freeze or truncate (HAFLQ, HetLoRA), only the components named in the
    ``selection`` record are trained, and their deltas, indices and importance scores
    are sent back.
    """
    pid, frame = _client_data(context, cfg)
    node_cfg = msg.content[CONFIG_KEY]
    server_round = int(node_cfg.get("server-round", 0))
    if drops_out(cfg.seed, server_round, pid, cfg.dropout):
        # As a crashed device: no update comes back, Flower reports an error reply.
        raise SimulatedDropout(
            f"partition {pid} dropped out of round {server_round} "
            f"(simulation.dropout={cfg.dropout})"
        )
    mode = str(node_cfg.get("mode", ""))
    if mode and mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r} from the server; allowed: {MODES}")
    device = client_device()
    task = load_task(cfg.data)
    block_bits = pattern_from_str(node_cfg["block-bits"]) if "block-bits" in node_cfg else None
    model, tokenizer = _model(cfg, task.num_labels, device, block_bits)

    def run(after_backward=None) -> TrainResult:
        return train_local(
            model,
            tokenizer,
            frame,
            cfg.train,
            max_length=cfg.model.max_length,
            compute_dtype=cfg.model.compute_dtype,
            device=device,
            seed=cfg.seed * 1_000_003 + server_round * 1009 + pid,
            desc=f"client {pid} round {server_round}"
            + (f" ({mode} r={node_cfg['rank']})" if mode else ""),
            after_backward=after_backward,
        )

    _merge(model, msg)
    if mode:
        rng = np.random.default_rng([cfg.seed, server_round, pid])
        result, records, extra_metrics = _train_components(msg, model, mode, run, cfg, rng)
    else:
        result, records, extra_metrics = _train_whole(msg, context, model, run, cfg)
    metrics = _train_metrics(len(frame), result)
    if cfg.dp.enabled:  # neither the data's size nor its loss leaves the device under DP
        metrics[NUM_EXAMPLES] = 1
        del metrics[TRAIN_LOSS]
    metrics.update(extra_metrics)
    metrics[PARTITION_ID] = pid
    metrics[WEIGHT_BYTES] = base_weight_bytes(model)
    metrics[LOAD_S] = _LAST_LOAD_S
    reply = RecordDict({**records, METRICS_KEY: metrics})
    return Message(content=reply, reply_to=msg)


def _train_whole(msg: Message, context: Context, model, run, cfg: RunConfig):
    """FedIT-style local training of the whole adapter (FFA-LoRA: with A frozen;
    FedSA-LoRA: with this client's own B); returns the training result, the reply
    records and extra metrics."""
    node_cfg = msg.content[CONFIG_KEY]
    received = from_array_record(msg.content[ARRAYS_KEY])
    keep_b = bool(node_cfg.get(KEEP_B, False))  # FedSA-LoRA
    extra_metrics = {}
    if keep_b:
        received, own_norm = _with_own_b(context, received, trainable_state(model))
        extra_metrics[B_START_NORM] = own_norm
    load_trainable_state(model, received)
    freeze_a = bool(node_cfg.get(FREEZE_A, False))  # FFA-LoRA
    with frozen_a(model, freeze_a):
        result = run()
    state = trainable_state(model)
    if keep_b:
        context.state[PERSONAL_B_KEY] = to_array_record(only_factor(state, B_SUFFIX))
        context.state[PERSONAL_A_KEY] = to_array_record(only_factor(state, A_SUFFIX))
        state = without_factor(state, B_SUFFIX)
    upload = trainable_part(state) if freeze_a else state
    # clip (and, local DP, noise) the change to what it received; where Flower's DP
    # wrapper sent its clipping norm, Flower's fixedclipping_mod clips the reply
    if cfg.dp.enabled and KEY_CLIPPING_NORM not in node_cfg:
        delta = _privatize(OrderedDict((k, v - received[k]) for k, v in upload.items()), cfg)
        upload = OrderedDict((k, received[k] + d) for k, d in delta.items())
    return result, {ARRAYS_KEY: to_array_record(upload)}, extra_metrics


def _privatize(delta: LoraState, cfg: RunConfig) -> LoraState:
    """Client-level DP on the device (docs/privacy.md): the whole update clipped to
    ``dp.clip``; with ``dp.mode="local"`` also Gaussian noise of std ``z C``, drawn from
    the OS (not the run's seed, which the server knows). Quantization comes after."""
    clipped, _ = clip_update(delta, cfg.dp.clip)
    if cfg.dp.mode == LOCAL:
        return add_noise(clipped, cfg.dp.noise_std, np.random.default_rng())
    return clipped


def _with_own_b(
    context: Context, shared: LoraState, template: LoraState
) -> tuple[LoraState, float]:
    """FedSA-LoRA: the shared A (and head) from the server with this client's own B,
    kept in ``context.state`` between its rounds (zeros, PEFT's initialization, before its
    first round); and that B's norm. ``template`` gives the model's keys and shapes."""
    own = {}
    if PERSONAL_B_KEY in context.state.array_records:
        own = record_to_arrays(context.state.array_records[PERSONAL_B_KEY])
    full = OrderedDict()
    for key, value in template.items():
        if key.endswith(B_SUFFIX):
            b = own.get(key)
            full[key] = b if b is not None and b.shape == value.shape else np.zeros_like(value)
        else:
            full[key] = shared[key]
    norm = state_norm(only_factor(full, B_SUFFIX))
    return full, norm


def _merge(model, msg: Message) -> None:
    """FLoRA: merge the stacked adapters of past rounds into the base weights (or restore
    the pristine base when the message carries none)."""
    merge = msg.content.array_records.get(MERGE_KEY)
    rank = merge_stacks(model, None if merge is None else record_to_arrays(merge))
    if rank:
        log.info("merged stacked adapters of rank %d into the base", rank)


def _train_components(msg, model, mode: str, run, cfg: RunConfig, rng):
    """HAFLQ/HetLoRA local training: only the selected components train (freeze or
    truncate); returns the training result, the reply records and extra metrics."""
    current = trainable_state(model)
    modules = lora_modules(current)
    selection, full = decode_download(msg.content, current, mode)
    load_trainable_state(model, full)
    before = gather(full, selection)
    imp = cfg.strategy.importance
    with component_view(model, selection, mode, imp.beta1, imp.beta2) as view:
        result = run(after_backward=view.track_importance)
        scores = view.scores()
    delta = component_delta(before, gather(trainable_state(model), selection))
    if cfg.dp.enabled:
        delta = _privatize(delta, cfg)
        # scores come from the local data and steer the server's selection: under DP the
        # device reports none (all zero), so the selection is the server's alone
        scores = {m: np.zeros_like(v) for m, v in scores.items()}
    records, metrics = encode_upload(
        delta, selection, scores, modules, msg.content[CONFIG_KEY], rng
    )
    return result, records, metrics


def handle_profile(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Tell the server what this node can do (its tier and LoRA rank budget)."""
    profile = resolve_profile(context.node_config, cfg.strategy.tiers)
    return Message(
        content=RecordDict({PROFILE_KEY: ConfigRecord(profile.to_record())}), reply_to=msg
    )


def handle_salience(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Block salience on a few rows of this node's data: one number per block leaves.

    The unquantized base is loaded for this message only (as a causal LM: the metric is
    the model's own next-token loss) and freed afterwards.
    """
    pid, frame = _client_data(context, cfg)
    query = msg.content[CONFIG_KEY]
    metric, rows = str(query["metric"]), int(query["rows"])
    sample = frame.sample(n=min(rows, len(frame)), random_state=cfg.seed + pid)
    device = client_device()
    _MODEL_CACHE.clear()  # make room: calibration needs the unquantized model
    model, tokenizer = load_calibration_model(cfg.model, device)
    try:
        batch = tokenize(tokenizer, sample["text"].tolist(), cfg.model.max_length, device)
        salience = block_salience(model, batch, metric)
    finally:
        del model
        release_freed_memory()
    log.info("client %d: %s salience on %d rows: %s", pid, metric, len(sample), salience.round(4))
    content = RecordDict(
        {
            SALIENCE_KEY: to_array_record({SALIENCE_KEY: salience.astype(np.float64)}),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: len(sample)}),
        }
    )
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Evaluate the received adapter on this node's own partition, or (a personal
    evaluation, FedSA-LoRA) this node's own model on the run's evaluation rows, replying
    with every row's prediction, or (FedSA-LoRA's residual) how far the new shared A
    moves this node's own product."""
    node_cfg = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    if bool(node_cfg.get(PERSONAL_RESIDUAL, False)):
        return _personal_residual_reply(msg, context)
    pid, frame = _client_data(context, cfg)
    device = client_device()
    task = load_task(cfg.data)
    model, tokenizer = _model(cfg, task.num_labels, device, any_bits=True)
    _merge(model, msg)
    received = from_array_record(msg.content[ARRAYS_KEY])
    if bool(node_cfg.get(KEEP_B, False)):
        received, _ = _with_own_b(context, received, trainable_state(model))
    load_trainable_state(model, received)
    if bool(node_cfg.get(PERSONAL_EVAL, False)):
        rows = task.split(cfg.train.eval_split)
        result = evaluate_run_rows(cfg, model, tokenizer, rows, device, f"client {pid} personal")
        predicted = np.asarray(result.predictions, dtype=np.int64)
        metrics = MetricRecord(
            {
                NUM_EXAMPLES: len(rows),
                "loss": float(result.loss),
                "accuracy": float(result.accuracy),
                PARTITION_ID: pid,
            }
        )
        records = ArrayRecord({PREDICTIONS_KEY: Array(predicted)})
        return Message(
            content=RecordDict({METRICS_KEY: metrics, PREDICTIONS_KEY: records}), reply_to=msg
        )
    result = evaluate_run_rows(cfg, model, tokenizer, frame, device, f"client {pid} eval")
    metrics = MetricRecord(
        {NUM_EXAMPLES: len(frame), "loss": result.loss, "accuracy": result.accuracy}
    )
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def _personal_residual_reply(msg: Message, context: Context) -> Message:
    """FedSA-LoRA: the two sums of :func:`personal_residual_terms` for this node's own B,
    the A it trained last and the new shared A in the message (no model, no data)."""
    own_b, own_a = {}, {}
    if PERSONAL_B_KEY in context.state.array_records:
        own_b = record_to_arrays(context.state.array_records[PERSONAL_B_KEY])
        own_a = record_to_arrays(context.state.array_records[PERSONAL_A_KEY])
    num, den = personal_residual_terms(own_b, own_a, from_array_record(msg.content[ARRAYS_KEY]))
    metrics = MetricRecord({RESIDUAL_NUM: num, RESIDUAL_DEN: den, NUM_EXAMPLES: 1})
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def flower_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` for the training messages that ask for it (Flower's
    DP wrapper put its clipping norm in the config: FedIT under central DP); every other
    message passes through untouched."""
    node_cfg = msg.content.config_records.get(CONFIG_KEY)
    if node_cfg is not None and KEY_CLIPPING_NORM in node_cfg:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` win over the run config (for in-process simulations)."""
    client_app = ClientApp()

    def config(context: Context) -> RunConfig:
        setup_logging()
        return parse_client_config({**dict(context.run_config), **(overrides or {})})

    @client_app.train(mods=[flower_clipping_mod])
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, config(context))

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, config(context))

    @client_app.query("profile")
    def profile(msg: Message, context: Context) -> Message:
        return handle_profile(msg, context, config(context))

    @client_app.query("salience")
    def salience(msg: Message, context: Context) -> Message:
        return handle_salience(msg, context, config(context))

    return client_app


app = make_client_app()
