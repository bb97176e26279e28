"""The wire protocol between the ServerApp and the ClientApps, in one place.

Record names in a message's ``RecordDict``, message types of the queries, the names of
the training metrics a client reports, and the two small record codecs both sides use.
The component upload is encoded here (:func:`encode_upload`, in the format the server
asked for: fp32, fp16 or the bit-packed payload of ``quant/payload.py``) and decoded by
:class:`~haflq_flower.strategy.heterogeneous.HeterogeneousLoRA`; what each strategy puts
in its messages is in its class (``strategy/``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from .lora.state import array_to_numpy, to_array_record
from .quant.payload import components_from_delta, encode_within_budget

# --- records of a message ---------------------------------------------------------------
ARRAYS_KEY = "arrays"  # the (global or trained) adapter state
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
DOWN_KEY = "down"  # an 8-bit downlink payload, in place of ``arrays``
SELECTION_KEY = "selection"  # per module, the global indices of the components to train
SCORES_KEY = "scores"  # the client's importance scores of the components it trained
PAYLOAD_KEY = "payload"  # the bit-packed component upload
MERGE_KEY = "merge"  # FLoRA / FedEx-LoRA: factors every client merges into its base
PROFILE_KEY = "profile"
SALIENCE_KEY = "salience"
PREDICTIONS_KEY = "predictions"  # a personal evaluation's predicted label of every row

# --- message types of the queries (beside Flower's train and evaluate) ------------------
PROFILE_QUERY = "query.profile"
SALIENCE_QUERY = "query.salience"

# --- config flags ------------------------------------------------------------------------
FREEZE_A = "freeze-a"  # FFA-LoRA: train B only
KEEP_B = "keep-b"  # FedSA-LoRA: B stays on the client (train), use the client's own B (eval)
PERSONAL_EVAL = "personal-eval"  # evaluate on the run's eval split, return every prediction
PERSONAL_RESIDUAL = "personal-residual"  # FedSA-LoRA: how far the new shared A moves B_k A_k

# --- a client's own state between messages of a run (Flower's ``Context.state``) ---------
PERSONAL_B_KEY = "fedsa-b"  # FedSA-LoRA: the client's own B factors
PERSONAL_A_KEY = "fedsa-a"  # FedSA-LoRA: the A the client ended its last round with
RESIDUAL_NUM = "residual-num"  # sum over modules of ||B_k (A_k - A_new)||_F^2
RESIDUAL_DEN = "residual-den"  # sum over modules of ||B_k A_k||_F^2

# --- training metrics a client reports (MetricRecord: numbers only) ---------------------
NUM_EXAMPLES = "num-examples"  # n_k, the FedAvg weight: the local dataset's size
EXAMPLES_SEEN = "examples-seen"
TRAIN_LOSS = "train-loss"
TRAIN_S = "train-s"
LOAD_S = "load-s"
STEPS = "steps"
PEAK_MEM_BYTES = "peak-mem-bytes"
TRAINABLE_PARAMS = "trainable-params"
OPTIMIZER_STATE_BYTES = "optimizer-state-bytes"
PARTITION_ID = "partition-id"
WEIGHT_BYTES = "weight-bytes"
RAY_NODE = "ray-node"  # first 48 bits of the Ray node id, 0 outside Ray
B_START_NORM = "b-start-norm"  # FedSA-LoRA: norm of the client's own B it started from


def selection_to_record(selection: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict((m, Array(np.asarray(idx, dtype=np.int64))) for m, idx in selection.items())
    )


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Arrays by name, each size-checked before allocation (:func:`array_to_numpy`)."""
    return {name: array_to_numpy(arr) for name, arr in record.items()}


def encode_upload(
    delta: dict[str, np.ndarray],
    selection: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    modules: list[str],
    node_cfg,
    rng: np.random.Generator,
) -> tuple[dict[str, ArrayRecord], dict[str, int]]:
    """A component upload's records and the metrics about them: the deltas as the server
    asked for them (adaptive bit-packed payload, fp16 or fp32), the trained components'
    selection and their importance scores."""
    records = {
        SELECTION_KEY: selection_to_record(selection),
        SCORES_KEY: to_array_record({m: v.astype(np.float32) for m, v in scores.items()}),
    }
    uplink = str(node_cfg.get("uplink", "fp32"))
    if uplink == "fp32":
        return {ARRAYS_KEY: to_array_record(delta), **records}, {}
    if uplink == "fp16":
        half = {k: v.astype(np.float16) for k, v in delta.items()}
        return {ARRAYS_KEY: to_array_record(half), **records}, {}
    if uplink != "adaptive":
        raise ValueError(f"unknown uplink {uplink!r} from the server")
    budget = int(node_cfg["uplink-budget-bytes"])
    widths = tuple(int(w) for w in str(node_cfg["uplink-widths"]).split(","))
    components, head_keys = components_from_delta(delta, selection, modules)
    importance = np.concatenate([scores[m] for m in modules]) if modules else np.zeros(0)
    arrays, chosen = encode_within_budget(
        components, importance, {k: delta[k] for k in head_keys}, budget, rng, widths
    )
    record = to_array_record(arrays)
    metrics = {f"bits-{w}": int((chosen == w).sum()) for w in (16, 8, 4, 2, 0)}
    metrics["payload-bytes"] = record.count_bytes()
    return {PAYLOAD_KEY: record, **records}, metrics
