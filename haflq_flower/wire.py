"""The wire protocol between the ServerApp and the ClientApps, in one place.

Record names in a message's ``RecordDict``, message types of the queries, the names of
the training metrics a client reports, and the two small record codecs both sides use.
The component messages of the heterogeneous strategies are encoded and decoded here on
both sides: the download a node trains from (:func:`encode_download` on the server,
:func:`decode_download` on the client: the global adapter or the node's components, as
8-bit codes, float16 or float32, and its selection) and the upload it answers with
(:func:`encode_upload` on the client, in the format the server asked for: fp32, fp16 or
the bit-packed payload of ``quant/payload.py``; :func:`decode_upload` on the server, which
checks every size, index and value against what the node was asked to do before it
parses anything). What else each strategy puts in its messages is in its class
(``strategy/``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from .lora.components import (
    FREEZE,
    ClientUpdate,
    LoraState,
    Selection,
    check_selection,
    full_selection,
    gather,
    lora_modules,
    module_rank,
    scatter,
)
from .lora.state import array_to_numpy, check_state, from_array_record, to_array_record
from .quant.payload import (
    WIDTHS,
    Layout,
    PayloadError,
    components_from_delta,
    decode,
    decode_downlink,
    delta_from_components,
    encode_downlink,
    encode_within_budget,
)
from .untrusted import FLOAT32_MAX, within

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


class ReplyError(ValueError):
    """A client's reply cannot be used; the message says why."""


def check_record_bytes(record: ArrayRecord, limit: int, name: str) -> None:
    """Raise :class:`ReplyError` if ``record`` holds more than ``limit`` bytes (its
    serialized size as Flower counts it), before anything in it is parsed or copied."""
    size = record.count_bytes()
    if size > limit:
        raise ReplyError(
            f"the '{name}' record holds {size} bytes, more than the {limit} the assigned "
            "work can need"
        )


def state_record_limit(state: LoraState, itemsize: int = 8) -> int:
    """The largest honest serialized size of ``state`` sent back with ``itemsize``-byte
    values (float64 at most): values, one ``.npy`` header per array (< 256 bytes) and keys."""
    return sum(v.size * itemsize + 256 + len(k) for k, v in state.items())


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


# --- the component download ---------------------------------------------------------
def encode_download(
    global_state: LoraState,
    selection: Selection,
    mode: str,
    downlink_bits: int,
    rng: np.random.Generator,
) -> dict[str, ArrayRecord]:
    """What a node trains from: the whole global adapter (freeze) or only its selected
    components (truncate), as 8-bit codes (``down``), float16 or float32 (``arrays``),
    and its ``selection``."""
    sent = selection if mode != FREEZE else full_selection(global_state)
    arrays = gather(global_state, sent)
    if downlink_bits == 8:
        modules = lora_modules(global_state)
        records = {DOWN_KEY: to_array_record(encode_downlink(arrays, sent, modules, rng))}
    else:
        if downlink_bits == 16:
            arrays = OrderedDict((k, v.astype(np.float16)) for k, v in arrays.items())
        records = {ARRAYS_KEY: to_array_record(arrays)}
    return {**records, SELECTION_KEY: selection_to_record(selection)}


def decode_download(
    content: RecordDict, current: LoraState, mode: str
) -> tuple[Selection, LoraState]:
    """Client side of :func:`encode_download`: the components to train and the full
    adapter state to start from (``current`` gives the keys and shapes, and the values
    of what was not sent)."""
    modules = lora_modules(current)
    selection = check_selection(
        record_to_arrays(content.array_records[SELECTION_KEY]),
        modules,
        module_rank(current, modules[0]),
    )
    if DOWN_KEY in content.array_records:  # 8-bit downlink
        sent, sub = decode_downlink(
            record_to_arrays(content.array_records[DOWN_KEY]), current, modules
        )
        return selection, scatter(current, sub, sent)
    received = from_array_record(content.array_records[ARRAYS_KEY])
    return selection, received if mode == FREEZE else scatter(current, received, selection)


# --- the component upload: decoded on the server ----------------------------------------
@dataclass(frozen=True)
class UploadTerms:
    """What the server asked one node to upload, against which its reply is checked.

    Attributes
    ----------
    assigned : Selection
        The components the node was assigned, per module.
    uplink : str
        ``adaptive`` (bit-packed payload within ``budget_bytes``), ``fp16`` or ``fp32``.
    budget_bytes : int
        The payload budget (adaptive uplink).
    global_rank : int
        R: every index must lie in [0, R).
    widths : tuple of int
        The bit widths the payload may use.
    value_limit : float
        The largest magnitude a global value may take after the update.
    """

    assigned: Selection
    uplink: str
    budget_bytes: int
    global_rank: int
    widths: tuple[int, ...] = WIDTHS
    value_limit: float = FLOAT32_MAX


def decode_upload(
    content: RecordDict, terms: UploadTerms, global_state: LoraState, layout: Layout
) -> tuple[ClientUpdate, dict[str, int] | None]:
    """A component upload as a :class:`~haflq_flower.lora.components.ClientUpdate` (its
    deltas, uploaded and trained components, scores) and, for the bit-packed payload, how
    many components came at each width.

    Sizes are checked first, from the records' byte counts: nothing is parsed beyond what
    the assigned work can need. Then the trained components must be assigned ones, the
    uploaded ones trained ones, the scores finite and >= 0, and global + delta within
    ``terms.value_limit``.

    Raises
    ------
    ReplyError
        Naming what is wrong.
    """
    upload_key = PAYLOAD_KEY if terms.uplink == "adaptive" else ARRAYS_KEY
    for key in (upload_key, SELECTION_KEY, SCORES_KEY):
        if key not in content.array_records:
            raise ReplyError(f"reply lacks the '{key}' record")
    modules = list(terms.assigned)
    # one int64/float64 per assigned component and module, at most
    index_limit = sum(len(m) + 256 + 8 * len(terms.assigned[m]) for m in modules)
    for key in (SELECTION_KEY, SCORES_KEY):
        check_record_bytes(content.array_records[key], index_limit, key)
    if upload_key == ARRAYS_KEY:
        limit = state_record_limit(gather(global_state, terms.assigned))
        check_record_bytes(content.array_records[ARRAYS_KEY], limit, ARRAYS_KEY)
    trained = check_selection(
        record_to_arrays(content.array_records[SELECTION_KEY]), modules, terms.global_rank
    )
    for m in modules:
        if not np.isin(trained[m], terms.assigned[m]).all():
            raise ReplyError(f"{m}: trained components that were not assigned")
    scores = _checked_scores(record_to_arrays(content.array_records[SCORES_KEY]), trained)
    bits = None
    if upload_key == PAYLOAD_KEY:
        record = content.array_records[PAYLOAD_KEY]
        selection, delta, bits = _decode_payload(record, terms, layout, lora_modules(global_state))
    else:
        delta = from_array_record(content.array_records[ARRAYS_KEY])
        check_state(gather(global_state, trained), delta)
        selection = trained
        delta = OrderedDict((k, v.astype(np.float32)) for k, v in delta.items())
    for m in modules:
        if not np.isin(selection[m], trained[m]).all():
            raise ReplyError(f"{m}: uploaded components that were not trained")
    _check_new_values(global_state, selection, delta, terms.value_limit)
    return ClientUpdate(delta, selection=selection, trained=trained, scores=scores), bits


def _checked_scores(scores: dict[str, np.ndarray], trained: Selection) -> dict[str, np.ndarray]:
    """One finite score >= 0 per trained component and module, as float64."""
    if set(scores) != set(trained):
        raise ReplyError("scores do not name the assigned modules")
    out = {}
    for m, idx in trained.items():
        sc = np.asarray(scores[m])
        if (
            sc.shape != idx.shape
            or sc.dtype.kind not in "fiu"
            or not within(sc, FLOAT32_MAX)
            or (sc < 0).any()
        ):
            raise ReplyError(f"{m}: scores must be {idx.shape} numbers >= 0 and finite in float32")
        out[m] = sc.astype(np.float64)
    return out


def _decode_payload(
    record: ArrayRecord, terms: UploadTerms, layout: Layout, modules: list[str]
) -> tuple[Selection, LoraState, dict[str, int]]:
    size = record.count_bytes()
    if size > terms.budget_bytes:
        raise ReplyError(f"payload of {size} bytes exceeds the budget of {terms.budget_bytes}")
    try:
        keys, widths, a, b, head = decode(record_to_arrays(record), layout, terms.widths)
    except PayloadError as err:
        raise ReplyError(f"payload: {err}") from err
    bits = {str(w): int((widths == w).sum()) for w in WIDTHS}
    selection, delta = delta_from_components(keys, a, b, head, modules, layout.module_dims)
    return selection, delta, bits


def _check_new_values(
    global_state: LoraState, selection: Selection, delta: LoraState, limit: float
) -> None:
    """Reject a delta that would take a value of the global state out of ``limit`` (the
    range of the float type the global is sent in; global + delta in float64)."""
    base = gather(global_state, selection)
    for key, value in delta.items():
        if key in base and not within(base[key].astype(np.float64) + value, limit):
            raise ReplyError(
                f"{key}: global + delta leaves +-{limit:.4g}, the range of the float "
                "type the global adapter is sent in"
            )
