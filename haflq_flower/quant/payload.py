"""Importance-aware, bandwidth-adaptive payload quantization with bit-packed codes.

A client's upload is a set of rank-1 component *deltas* ``(da_{m,i}, db_{m,i})`` plus the
head's delta. Each component gets a width from {16, 8, 4, 2, 0} (0: not sent):

- 16: the two vectors as float16;
- 8/4/2: per-vector asymmetric uniform quantization, ``x ~ lo + q * scale`` with
  ``scale = (max - min) / (2^w - 1)``, stochastic rounding (unbiased), codes bit-packed
  into uint8 (4 codes per byte at 2 bits, 2 at 4 bits).

:func:`allocate_widths` chooses the widths under a byte budget (greedy in descending
importance); :func:`encode` builds the arrays of one self-describing record;
:func:`decode` checks every claimed size against what the receiver knows *before*
allocating anything and returns the deltas. The byte size used for the budget is the
size Flower counts for the record (``ArrayRecord.count_bytes()``: serialized arrays plus
keys), so the bytes on the wire are the compressed bytes.

Everything is vectorized with numpy over the flat concatenation of all vectors of one
width (segment reductions), with no Python loop over elements.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..lora.components import a_key, b_key, other_keys

WIDTHS = (16, 8, 4, 2)
# How a component upload travels (payload.uplink): the adaptive bit-packed payload of
# this module, or every trained component's deltas in fp16 / fp32.
UPLINKS = ("adaptive", "fp16", "fp32")
# The global adapter on the way down (payload.downlink-bits): 8-bit codes
# (:func:`encode_downlink`), float16 or float32.
DOWNLINK_BITS = (8, 16, 32)
FORMAT_VERSION = 1
INDEX_BYTES = 8  # (module, component) as two int32
VECTOR_HEADER_BYTES = 8  # lo and scale as two float32 per vector


class PayloadError(ValueError):
    """A payload is malformed, truncated, or does not match what the receiver expects."""


# --------------------------------------------------------------------------- bit packing
def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes in ``[0, 2^bits)`` into bytes, little end first (8 bits: a copy)."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    if bits == 8:
        return codes.copy()
    per_byte = 8 // bits
    pad = (-len(codes)) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros(pad, np.uint8)])
    grouped = codes.reshape(-1, per_byte)
    out = grouped[:, 0].copy()
    for j in range(1, per_byte):  # 1 or 3 vectorized shifts, not a loop over elements
        out |= grouped[:, j] << np.uint8(j * bits)
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` for ``count`` codes."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    if bits == 8:
        return packed[:count].copy()
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((len(packed), per_byte), dtype=np.uint8)
    for j in range(per_byte):
        np.bitwise_and(packed >> np.uint8(j * bits), mask, out=out[:, j])
    return out.ravel()[:count]


def packed_len(count: int, bits: int) -> int:
    return -(-count * bits // 8)


# --------------------------------------------------------------------- quantization
def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def quantize(
    flat: np.ndarray, lengths: np.ndarray, bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-vector asymmetric uniform quantization with stochastic rounding.

    ``flat`` is the concatenation of vectors of the given ``lengths`` (all > 0). Returns
    (codes, lo, scale) with one ``lo``/``scale`` per vector, as float32. Stochastic
    rounding as ``floor(y + u)``, ``u ~ U[0, 1)``: rounds up with probability ``y - floor(y)``.
    """
    flat = np.asarray(flat, dtype=np.float32)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.float32), np.zeros(0, np.float32)
    starts = _starts(lengths)
    lo = np.minimum.reduceat(flat, starts).astype(np.float32)
    hi = np.maximum.reduceat(flat, starts).astype(np.float32)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).astype(np.float32)
    inv = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0).astype(np.float32)
    y = flat - np.repeat(lo, lengths)
    y *= np.repeat(inv, lengths)
    y += rng.random(y.shape, dtype=np.float32)
    np.floor(y, out=y)
    np.clip(y, 0, levels, out=y)
    return y.astype(np.uint8), lo, scale


def dequantize(codes: np.ndarray, lo: np.ndarray, scale: np.ndarray, lengths) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    out = codes.astype(np.float32)
    out *= np.repeat(scale, lengths)
    out += np.repeat(lo, lengths)
    return out


# ---------------------------------------------------------------------- size model
def _npy_bytes(array: np.ndarray) -> int:
    """Bytes of ``array`` in NumPy's .npy format, as Flower serializes an Array."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getbuffer().nbytes


def record_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """What ``ArrayRecord.count_bytes()`` reports for these arrays (data + keys)."""
    return sum(_npy_bytes(np.ascontiguousarray(v)) + len(k) for k, v in arrays.items())


def component_cost(length: int, bits: int) -> int:
    """Approximate bytes one component of ``length`` elements (a + b) adds at ``bits``.

    Codes are packed per width group, so the exact cost depends on the group; the
    allocation uses this estimate and :func:`encode_within_budget` checks the real size.
    """
    if bits == 0:
        return 0
    if bits == 16:
        return 2 * length + INDEX_BYTES
    return packed_len(length, bits) + 2 * VECTOR_HEADER_BYTES + INDEX_BYTES


# ------------------------------------------------------------------------ allocation
def allocate_widths(
    importance: Sequence[float],
    lengths: Sequence[int],
    budget_bytes: int,
    widths: Sequence[int] = WIDTHS,
) -> np.ndarray:
    """Bit-width per component under a byte budget (for the components' own bytes).

    1. In descending importance, give each component the lowest allowed width if it
       still fits; a component that does not fit even then gets 0 (not sent).
    2. Then raise widths one level at a time (2 -> 4 -> 8 -> 16), each pass in descending
       importance, while the total still fits; repeat the passes until no single one-level
       upgrade fits any more (so no budget that could buy an upgrade is left unused).

    Ties in importance go to the lower index. Returns an int array of widths.
    """
    allowed = sorted({w for w in widths if w > 0})
    if not allowed or any(w not in WIDTHS for w in allowed):
        raise ValueError(f"widths must be drawn from {WIDTHS}, got {list(widths)}")
    importance = np.asarray(importance, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(importance)), -importance))
    out = np.zeros(len(importance), dtype=np.int64)
    used = 0
    for i in order:
        cost = component_cost(int(lengths[i]), allowed[0])
        if used + cost <= budget_bytes:
            out[i] = allowed[0]
            used += cost
    changed = True
    while changed:  # repeat the passes until no single one-level upgrade fits
        changed = False
        for level in range(1, len(allowed)):
            for i in order:
                if out[i] != allowed[level - 1]:
                    continue
                extra = component_cost(int(lengths[i]), allowed[level]) - component_cost(
                    int(lengths[i]), allowed[level - 1]
                )
                if used + extra <= budget_bytes:
                    out[i] = allowed[level]
                    used += extra
                    changed = True
    return out


# ------------------------------------------------------------------------- encoding
@dataclass
class ComponentSet:
    """Uploaded components in canonical order, with their vectors.

    ``keys`` is (n, 2) int (module index, component index); ``a[j]`` and ``b[j]`` are the
    two delta vectors of component j (lengths d_in and d_out of its module).
    """

    keys: np.ndarray
    a: list[np.ndarray]
    b: list[np.ndarray]


def encode(
    components: ComponentSet,
    widths: np.ndarray,
    head: Mapping[str, np.ndarray],
    rng: np.random.Generator,
) -> OrderedDict[str, np.ndarray]:
    """The arrays of one self-describing payload record (components with width 0 dropped)."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    out["meta"] = np.array([FORMAT_VERSION], dtype=np.int32)
    for bits in WIDTHS:
        sel = np.flatnonzero(widths == bits)
        keys = components.keys[sel].astype(np.int32).reshape(-1, 2)
        vecs = [v for j in sel for v in (components.a[j], components.b[j])]
        flat = np.concatenate(vecs).astype(np.float32) if vecs else np.zeros(0, np.float32)
        out[f"idx.{bits}"] = keys
        if bits == 16:
            out["val.16"] = flat.astype(np.float16)
            continue
        lengths = np.array([len(v) for v in vecs], dtype=np.int64)
        codes, lo, scale = quantize(flat, lengths, bits, rng)
        out[f"code.{bits}"] = pack_codes(codes, bits)
        out[f"lo.{bits}"] = lo
        out[f"scale.{bits}"] = scale
    for key, value in head.items():
        out[f"head.{key}"] = np.asarray(value, dtype=np.float16)
    return out


FLOAT16_RELATIVE_ERROR = 2.0**-11  # half a unit in the last place of float16's 10 bits
FLOAT16_SUBNORMAL_ERROR = 2.0**-25  # half the smallest float16 step, below 2^-14


def quantization_error_bound(
    components: ComponentSet, widths: np.ndarray, head: Mapping[str, np.ndarray]
) -> float:
    """An upper bound on ``||decoded - original||_2`` of :func:`encode` with these
    widths (dropped components, width 0, not counted: they are not sent). Stochastic
    rounding moves each value by less than one step ``(max - min) / (2^b - 1)`` of its
    vector; float16 by at most half an ulp (relative 2^-11, or 2^-25 absolute below
    2^-14). Used to state how far quantization can take an update past a clip."""
    total = 0.0
    for j, bits in enumerate(np.asarray(widths)):
        for vec in (components.a[j], components.b[j]):
            v = np.asarray(vec, np.float64)
            if bits == 16:
                err = np.maximum(np.abs(v) * FLOAT16_RELATIVE_ERROR, FLOAT16_SUBNORMAL_ERROR)
                total += float(np.sum(err**2))
            elif bits > 0 and len(v):
                step = (v.max() - v.min()) / ((1 << int(bits)) - 1)
                total += len(v) * step**2
    for value in head.values():
        v = np.asarray(value, np.float64)
        err = np.maximum(np.abs(v) * FLOAT16_RELATIVE_ERROR, FLOAT16_SUBNORMAL_ERROR)
        total += float(np.sum(err**2))
    return float(np.sqrt(total))


def encode_within_budget(
    components: ComponentSet,
    importance: np.ndarray,
    head: Mapping[str, np.ndarray],
    budget_bytes: int,
    rng: np.random.Generator,
    widths: Sequence[int] = WIDTHS,
) -> tuple[OrderedDict[str, np.ndarray], np.ndarray]:
    """Allocate widths, encode, and guarantee ``record_bytes(arrays) <= budget_bytes``.

    The fixed part (meta, headers of every array, the head) is measured exactly by
    encoding an empty set first; if the estimate of packed codes overshoots by a few
    bytes, the least important sent component is dropped and the payload re-encoded.
    """
    lengths = np.array([len(a) + len(b) for a, b in zip(components.a, components.b, strict=True)])
    empty = ComponentSet(np.zeros((0, 2), np.int64), [], [])
    fixed = record_bytes(encode(empty, np.zeros(0, np.int64), head, rng))
    chosen = allocate_widths(importance, lengths, budget_bytes - fixed, widths)
    order = np.lexsort((np.arange(len(importance)), -np.asarray(importance, dtype=np.float64)))
    while True:
        arrays = encode(components, chosen, head, rng)
        if record_bytes(arrays) <= budget_bytes or not chosen.any():
            return arrays, chosen
        last = [i for i in order if chosen[i] > 0][-1]
        chosen[last] = 0


def fixed_payload_bytes(head_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Exact bytes of a payload that carries no component: meta, the empty arrays of
    every width group and the head in float16. No budget below this can be met."""
    head = {k: np.zeros(shape, np.float16) for k, shape in head_shapes.items()}
    empty = ComponentSet(np.zeros((0, 2), np.int64), [], [])
    return record_bytes(encode(empty, np.zeros(0, np.int64), head, np.random.default_rng(0)))


# Arrays of a payload besides the head: meta, idx x4, val.16, code/lo/scale x3.
_PAYLOAD_ARRAYS = 13


def max_payload_bytes(
    lengths: Sequence[int],
    head_shapes: Mapping[str, tuple[int, ...]],
    widths: Sequence[int] = WIDTHS,
) -> int:
    """An upper bound on the bytes of any payload of these components (``lengths``:
    d_in + d_out of each) at any of the allowed ``widths``: the fixed part, each
    component at its costliest allowed width, and 64 bytes per array for ``.npy``
    headers that grow with their shapes. A budget above this buys nothing more."""
    allowed = [w for w in widths if w > 0]
    per_component = sum(max(component_cost(int(n), w) for w in allowed) for n in lengths)
    slack = 64 * (_PAYLOAD_ARRAYS + len(head_shapes))
    return fixed_payload_bytes(head_shapes) + per_component + slack


def bound_budget(budget: int, fixed: int, largest: int) -> tuple[int, str]:
    """A payload budget raised to the fixed part or lowered to the largest payload, and
    what was done: ``"raised to the fixed part"``, ``"capped at the largest payload"``
    or ``""``. Below the fixed part a client cannot send even its head and scores; above
    the largest payload the budget no longer limits anything the server must receive.
    """
    if budget < fixed:
        return fixed, "raised to the fixed part"
    if budget > largest:
        return largest, "capped at the largest payload"
    return budget, ""


# ------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class Layout:
    """What the receiver knows: per module (d_in, d_out), the rank, the head's shapes."""

    module_dims: tuple[tuple[int, int], ...]
    rank: int
    head_shapes: Mapping[str, tuple[int, ...]]


class DecodedPayload(NamedTuple):
    """A validated, dequantized payload: ``keys`` (n, 2) of (module index, component),
    each component's ``widths`` (n,), its ``a`` and ``b`` vectors, and the ``head``."""

    keys: np.ndarray
    widths: np.ndarray
    a: list[np.ndarray]
    b: list[np.ndarray]
    head: dict[str, np.ndarray]


def decode(
    arrays: Mapping[str, np.ndarray],
    layout: Layout,
    allowed_widths: Sequence[int] = WIDTHS,
) -> DecodedPayload:
    """Validate and decode a payload.

    Returns a :class:`DecodedPayload` (keys, widths, a-vectors, b-vectors, head) with
    components in the order of ``WIDTHS`` groups. Everything is checked before anything is
    dequantized: the array names, every shape and dtype against what the receiver
    knows (vector lengths come from ``layout``, never from the payload), indices in
    range, no component twice, no component at a width outside ``allowed_widths``,
    finite ``lo``/``scale`` and head. So a hostile payload costs no more than its own
    bytes to reject, and an accepted one decodes into at most one float32 vector per
    (module, component) of the layout. Raises :class:`PayloadError`.
    """
    _check_names(arrays, layout)
    dims = np.asarray(layout.module_dims, dtype=np.int64).reshape(-1, 2)
    # (bits, keys, lengths, total): every group checked before any decoding
    groups = [_checked_group(arrays, bits, dims, layout.rank, allowed_widths) for bits in WIDTHS]
    keys = np.concatenate([g[1] for g in groups])
    if len(keys):
        flat_ids = keys[:, 0] * layout.rank + keys[:, 1]
        if len(np.unique(flat_ids)) != len(flat_ids):
            raise PayloadError("a component appears more than once in the payload")
    _check_head(arrays, layout)
    all_widths, a_out, b_out = [], [], []
    for bits, group_keys, lengths, total in groups:
        flat = _decoded_values(arrays, bits, lengths, total)
        bounds = np.cumsum(lengths)[:-1] if len(lengths) else []
        vecs = np.split(flat, bounds) if len(lengths) else []
        a_out += vecs[0::2]
        b_out += vecs[1::2]
        all_widths.append(np.full(len(group_keys), bits, dtype=np.int64))
    head = {key: np.asarray(arrays[f"head.{key}"]).astype(np.float32) for key in layout.head_shapes}
    return DecodedPayload(keys, np.concatenate(all_widths), a_out, b_out, head)


def _check_names(arrays: Mapping[str, np.ndarray], layout: Layout) -> None:
    """Exactly the arrays of the format, and the format's version."""
    expected = {"meta"} | {f"head.{k}" for k in layout.head_shapes}
    for bits in WIDTHS:
        expected |= {f"idx.{bits}"} | (
            {"val.16"} if bits == 16 else {f"code.{bits}", f"lo.{bits}", f"scale.{bits}"}
        )
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise PayloadError(f"payload arrays differ: missing {missing[:3]}, unexpected {extra[:3]}")
    meta = np.asarray(arrays["meta"])
    if meta.shape != (1,) or int(meta[0]) != FORMAT_VERSION:
        raise PayloadError(f"unknown payload format {meta.tolist()}; expected [{FORMAT_VERSION}]")


def _checked_group(
    arrays: Mapping[str, np.ndarray],
    bits: int,
    dims: np.ndarray,
    rank: int,
    allowed_widths: Sequence[int],
) -> tuple[int, np.ndarray, np.ndarray, int]:
    """One width group's indices, vector lengths and total length, every array of the
    group checked against them (nothing dequantized)."""
    keys = np.asarray(arrays[f"idx.{bits}"])
    if keys.ndim != 2 or keys.shape[1] != 2 or not np.issubdtype(keys.dtype, np.integer):
        raise PayloadError(f"idx.{bits}: expected an (n, 2) integer array, got {keys.shape}")
    if keys.size and bits not in allowed_widths:
        raise PayloadError(
            f"idx.{bits}: {len(keys)} component(s) at {bits} bits; the allowed widths "
            f"are {sorted(w for w in allowed_widths if w > 0)}"
        )
    if keys.size and (
        keys[:, 0].min() < 0
        or keys[:, 0].max() >= len(dims)
        or keys[:, 1].min() < 0
        or keys[:, 1].max() >= rank
    ):
        raise PayloadError(f"idx.{bits}: module or component index out of range")
    keys = keys.astype(np.int64)
    # Vector lengths come from the receiver's own shapes, never from the payload.
    lengths = dims[keys[:, 0]].reshape(-1) if keys.size else np.zeros(0, np.int64)
    total = int(lengths.sum())
    if bits == 16:
        val = np.asarray(arrays["val.16"])
        if val.dtype != np.float16 or val.shape != (total,):
            raise PayloadError(f"val.16: expected ({total},) float16, got {val.shape} {val.dtype}")
        return bits, keys, lengths, total
    code, lo, scale = (np.asarray(arrays[f"{p}.{bits}"]) for p in ("code", "lo", "scale"))
    if code.dtype != np.uint8 or code.shape != (packed_len(total, bits),):
        raise PayloadError(
            f"code.{bits}: expected ({packed_len(total, bits)},) uint8, got "
            f"{code.shape} {code.dtype}"
        )
    for name, arr in (("lo", lo), ("scale", scale)):
        if arr.dtype != np.float32 or arr.shape != (len(lengths),):
            raise PayloadError(f"{name}.{bits}: expected ({len(lengths)},) float32")
    if not (np.isfinite(lo).all() and np.isfinite(scale).all()) or (scale < 0).any():
        raise PayloadError(f"lo/scale.{bits}: non-finite or negative values")
    return bits, keys, lengths, total


def _check_head(arrays: Mapping[str, np.ndarray], layout: Layout) -> None:
    for key, shape in layout.head_shapes.items():
        value = np.asarray(arrays[f"head.{key}"])
        if value.shape != tuple(shape) or not np.issubdtype(value.dtype, np.floating):
            raise PayloadError(f"head.{key}: expected {tuple(shape)} float, got {value.shape}")
        if not np.isfinite(value).all():
            raise PayloadError(f"head.{key}: non-finite values")


def _decoded_values(
    arrays: Mapping[str, np.ndarray], bits: int, lengths: np.ndarray, total: int
) -> np.ndarray:
    """One checked group's values, dequantized to float32 (all finite, or an error)."""
    if bits == 16:
        flat = np.asarray(arrays["val.16"]).astype(np.float32)
    else:
        code, lo, scale = (np.asarray(arrays[f"{p}.{bits}"]) for p in ("code", "lo", "scale"))
        flat = dequantize(unpack_codes(code, bits, total), lo, scale, lengths)
    if not np.isfinite(flat).all():
        raise PayloadError(f"width {bits}: non-finite values")
    return flat


# ------------------------------------------------------- adapter sub-states <-> payload
def components_from_delta(
    delta: Mapping[str, np.ndarray], selection: Mapping[str, np.ndarray], modules: Sequence[str]
) -> tuple[ComponentSet, list[str]]:
    """A delta sub-state as a :class:`ComponentSet` (module index = position in ``modules``),
    plus the non-LoRA keys (the head) it also carries."""
    keys, a, b = [], [], []
    for m_idx, module in enumerate(modules):
        da, db = delta[a_key(module)], delta[b_key(module)]
        for j, comp in enumerate(np.asarray(selection[module], dtype=np.int64)):
            keys.append((m_idx, int(comp)))
            a.append(np.asarray(da[j, :], dtype=np.float32))
            b.append(np.asarray(db[:, j], dtype=np.float32))
    key_array = np.array(keys, dtype=np.int64).reshape(-1, 2)
    return ComponentSet(key_array, a, b), other_keys(delta)


def delta_from_components(
    keys: np.ndarray,
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    head: Mapping[str, np.ndarray],
    modules: Sequence[str],
    dims: Sequence[tuple[int, int]],
) -> tuple[dict[str, np.ndarray], OrderedDict[str, np.ndarray]]:
    """Decoded components back to (selection, delta sub-state); ``dims`` are each module's
    (d_in, d_out), so a module with nothing uploaded gets correctly shaped empty factors."""
    selection: dict[str, np.ndarray] = {}
    delta: OrderedDict[str, np.ndarray] = OrderedDict()
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    for m_idx, module in enumerate(modules):
        rows = np.flatnonzero(keys[:, 0] == m_idx)
        rows = rows[np.argsort(keys[rows, 1], kind="stable")]
        selection[module] = keys[rows, 1].copy()
        d_in, d_out = dims[m_idx]
        delta[a_key(module)] = (
            np.stack([a[r] for r in rows]) if len(rows) else np.zeros((0, d_in), np.float32)
        )
        delta[b_key(module)] = (
            np.stack([b[r] for r in rows], axis=1)
            if len(rows)
            else np.zeros((d_out, 0), np.float32)
        )
    for key, value in head.items():
        delta[key] = value
    return selection, delta


def layout_of(state: Mapping[str, np.ndarray], modules: Sequence[str]) -> Layout:
    """The :class:`Layout` of an adapter state (what both sides know of the model)."""
    dims = tuple((int(state[a_key(m)].shape[1]), int(state[b_key(m)].shape[0])) for m in modules)
    rank = int(state[a_key(modules[0])].shape[0]) if modules else 0
    return Layout(dims, rank, {k: tuple(state[k].shape) for k in other_keys(state)})


def encode_downlink(
    sub: Mapping[str, np.ndarray],
    selection: Mapping[str, np.ndarray],
    modules: Sequence[str],
    rng: np.random.Generator,
):
    """The arrays of an 8-bit downlink record: every sent component at 8 bits, the head in
    float16 (the strategy wraps them in an ArrayRecord)."""
    components, head_keys = components_from_delta(sub, selection, modules)
    return encode(components, np.full(len(components.keys), 8), {k: sub[k] for k in head_keys}, rng)


def decode_downlink(
    arrays: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray], modules: Sequence[str]
) -> tuple[dict[str, np.ndarray], OrderedDict[str, np.ndarray]]:
    """(selection, sub-state) from an 8-bit downlink record, checked against ``state``."""
    layout = layout_of(state, modules)
    keys, _, a, b, head = decode(arrays, layout)
    return delta_from_components(keys, a, b, head, modules, layout.module_dims)
