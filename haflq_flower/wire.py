"""The wire protocol between the ServerApp and the ClientApps, in one place.

Record names in a message's ``RecordDict``, message types of the queries, the names of
the training metrics a client reports, and the two small record codecs both sides use.
The upload payload's byte format is ``quant/payload.py``'s; what each strategy puts in
its messages is in its class (``strategy/``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from .lora.state import array_to_numpy

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

# --- a client's own state between messages of a run (Flower's ``Context.state``) ---------
PERSONAL_B_KEY = "fedsa-b"  # FedSA-LoRA: the client's own B factors

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
