"""Small pure helpers for values that come from devices and cannot be trusted.

Everything a node sends (profile fields, arrays, scores, example counts, error reasons)
is checked where it enters the server (docs/reliability.md lists every check). The
helpers here are shared by those checks: numeric ranges of the float types the global
state is kept and sent in, and escaping of device strings before they reach a log line.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT16_MAX = float(np.finfo(np.float16).max)
# Device strings (error reasons, tiers) are cut to this many characters in logs/results
# (their start and their end are kept).
MAX_TEXT = 1000
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object, limit: int = MAX_TEXT) -> str:
    """``text`` as one safe log line: control characters and non-ASCII escaped
    (``\\n`` stays two characters, so a device cannot forge log lines), cut to ``limit``
    characters by dropping the middle.

    Examples
    --------
    >>> printable("oom\\nINFO haflq round 3: all good")
    'oom\\\\nINFO haflq round 3: all good'
    """
    escaped = str(text).encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(
        c if c.isprintable() else _ESCAPES.get(c, f"\\x{ord(c):02x}") for c in escaped
    )
    if len(escaped) <= limit:
        return escaped
    head = limit // 3  # the start says where, the end (an exception's message) says what
    return escaped[:head] + " ... " + escaped[len(escaped) - (limit - head - 5) :]


def within(array: np.ndarray, limit: float) -> bool:
    """True if every value of ``array`` is finite with ``|x| <= limit``.

    Checked in float64 on the values as sent, so a float64 1e39 is out of float32's
    range (``limit = FLOAT32_MAX``) instead of silently becoming Inf after a cast.
    Integer and boolean arrays are compared the same way.
    """
    values = np.asarray(array)
    if values.size == 0:
        return True
    if values.dtype.kind not in "fiub":
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        peak = np.max(np.abs(values.astype(np.float64, copy=False)))
    return bool(np.isfinite(peak) and peak <= limit)


def all_within(arrays: Iterable[np.ndarray], limit: float) -> bool:
    """:func:`within` for every array."""
    return all(within(a, limit) for a in arrays)
