"""The trainable state of a PEFT model (LoRA factors + head) as plain arrays and records.

Keys are PEFT's adapter-name-free state-dict keys (``...q_proj.lora_A.weight``,
``...score.weight``), so a state saved here is what ``PeftModel.from_pretrained`` expects.
Values are float32 numpy arrays: numpy has no bfloat16, and the master copy is fp32.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from ..untrusted import FLOAT32_MAX, within
from .components import LoraState


class StateMismatchError(ValueError):
    """A received state does not match the model's adapter (keys or shapes)."""


def trainable_state(model: PeftModel) -> LoraState:
    """The adapter's state (LoRA factors and modules_to_save) as float32 arrays."""
    state = get_peft_model_state_dict(model)
    return OrderedDict(
        (name, tensor.detach().to("cpu", torch.float32).numpy().copy())
        for name, tensor in state.items()
    )


def check_state(expected: LoraState, received: LoraState, limit: float = FLOAT32_MAX) -> None:
    """Raise :class:`StateMismatchError` unless keys, shapes and dtypes match and every
    value is finite with ``|x| <= limit``.

    The range is checked on the values as received (float64 included), so that nothing
    becomes Inf when the state is cast to float32 (``limit`` defaults to float32's
    largest value; a strategy that sends its global in float16 passes float16's).
    """
    missing = sorted(set(expected) - set(received))
    extra = sorted(set(received) - set(expected))
    if missing or extra:
        raise StateMismatchError(
            f"adapter keys differ: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for name, ref in expected.items():
        value = received[name]
        if value.shape != ref.shape:
            raise StateMismatchError(f"{name}: shape {value.shape}, expected {ref.shape}")
        if not np.issubdtype(value.dtype, np.floating):
            raise StateMismatchError(f"{name}: dtype {value.dtype} is not floating point")
        if not within(value, limit):
            raise StateMismatchError(
                f"{name}: contains NaN, Inf or values beyond +-{limit:.4g} "
                f"(the range of the float type the global state is kept or sent in)"
            )


def load_trainable_state(model: PeftModel, state: LoraState) -> None:
    """Overwrite the adapter's parameters in place with ``state`` (validated first)."""
    check_state(trainable_state(model), state)
    tensors = {
        name: torch.from_numpy(np.asarray(value, dtype=np.float32)) for name, value in state.items()
    }
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise StateMismatchError(f"PEFT did not accept keys: {unexpected[:3]}")


def to_array_record(state: LoraState) -> ArrayRecord:
    """Pack a state into an ArrayRecord (key order preserved)."""
    return ArrayRecord(
        OrderedDict((name, Array(np.ascontiguousarray(v))) for name, v in state.items())
    )


def array_to_numpy(arr: Array) -> np.ndarray:
    """A received :class:`Array` as a writable numpy array, checked before allocation.

    ``Array.numpy()`` trusts the ``.npy`` header inside the bytes, and numpy allocates
    what the header claims before it reads the data; a hostile header could claim
    terabytes. Here the header is parsed first and the claimed size must equal the bytes
    that are actually there; only plain numeric dtypes are accepted.

    Raises
    ------
    StateMismatchError
        If the array is not a well-formed numeric ``.npy`` blob.
    """
    if arr.stype != "numpy.ndarray":
        raise StateMismatchError(f"array of serialization type {arr.stype!r}, expected numpy")
    data = bytes(arr.data)
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    except Exception as err:  # numpy's parser raises many types on hostile bytes
        raise StateMismatchError(f"malformed array header: {type(err).__name__}: {err}") from err
    if dtype.kind not in "fiub" or dtype.hasobject:
        raise StateMismatchError(f"array dtype {dtype} is not numeric")
    count = 1
    for dim in shape:
        count *= int(dim)
    body = len(data) - buf.tell()
    if count * dtype.itemsize != body:
        raise StateMismatchError(
            f"array header claims shape {tuple(shape)} of {dtype} "
            f"({count * dtype.itemsize} bytes) but {body} bytes follow"
        )
    out = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell())
    return out.reshape(shape, order="F" if fortran else "C").copy()


def from_array_record(record: ArrayRecord) -> LoraState:
    """Unpack an ArrayRecord into arrays (copies, safe to modify), each checked by
    :func:`array_to_numpy`."""
    return OrderedDict((name, array_to_numpy(arr)) for name, arr in record.items())


def record_dict_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serializes it (arrays, configs, metrics).

    Flower's ``count_bytes`` raises on an empty string or an empty list in a config or
    metric record (flwr 1.42), which a device may send; such records are counted here
    value by value instead, so counting never fails.
    """
    total = 0
    for record in content.values():
        if isinstance(record, (ArrayRecord, ConfigRecord, MetricRecord)):
            try:
                total += record.count_bytes()
            except (ValueError, IndexError, TypeError):
                total += sum(len(k) + _value_bytes(v) for k, v in record.items())
    return total


def _value_bytes(value) -> int:
    """What a config/metric value occupies: 1 per bool, 8 per number, 1 per character."""
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, (str, bytes)):
        return len(value)
    return 8
