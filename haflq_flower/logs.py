"""Progress output: our INFO lines next to Flower's, in the ServerApp and the ClientApps,
without third-party noise.

Two layers keep the output readable:

- :func:`quiet_third_party` (called when the package is imported, before torch,
  transformers or bitsandbytes are) silences their import-time and load-time chatter
  at the source: the transformers ``LOAD REPORT`` table (the freshly initialized
  classification head ``score.weight`` is expected: it is what we train), the
  bitsandbytes notice that it could not download an optional CPU kernel (the project
  runs offline; bitsandbytes falls back to its built-in kernel), and library
  deprecation warnings (``FutureWarning``, ``DeprecationWarning``).
  ``HAFLQ_LOG_LEVEL=DEBUG`` keeps all of them.
- :class:`NoiseFilter` filters the same notices out of the streamed run log in the
  launcher (where Ray workers and Flower's own processes print them too), and prints
  one line explaining each kind the first time it is dropped.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field

NOISY_LOGGERS = ("transformers", "bitsandbytes", "peft", "accelerate", "datasets")


def _debug() -> bool:
    return os.environ.get("HAFLQ_LOG_LEVEL", "INFO").upper() == "DEBUG"


def quiet_third_party() -> None:
    """Silence third-party load reports, kernel notices and deprecation warnings in this
    process (unless ``HAFLQ_LOG_LEVEL=DEBUG``). Idempotent; cheap."""
    if _debug():
        return
    # transformers sets its root logger's level from this variable when it configures
    # itself (lazily, after our setLevel below would have run)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Library deprecations (torch.jit.script_method, transformers' renamed helpers) are
    # for the libraries' maintainers, not for a user of this app; our code emits none.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def setup_logging() -> None:
    """Send the ``haflq_flower`` logger to stderr once per process (level: $HAFLQ_LOG_LEVEL)."""
    logger = logging.getLogger("haflq_flower")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s haflq %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("HAFLQ_LOG_LEVEL", "INFO").upper())
    logger.propagate = False
    quiet_third_party()
    try:  # transformers draws a "Loading weights" bar per model load: noise in the logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not _debug():
            hf_logging.set_verbosity_error()  # e.g. the LOAD REPORT table of a new head
    except ImportError:
        pass


# ----------------------------------------------------------------- the streamed log

# Ray prefixes a worker's lines with "(ClientAppActor pid=123) ", in color.
_RAY_PREFIX = re.compile(
    r"^(?:\x1b\[[0-9;]*m)?\([A-Za-z_]+ pid=\d+(?:, ip=[^)]*)?\)(?:\x1b\[[0-9;]*m)?\s?"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OURS = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) haflq ")


@dataclass(frozen=True)
class NoiseRule:
    """One kind of third-party notice.

    ``first`` matches the notice's first line; ``continuation`` matches the lines that
    belong to it (a warning's source line, a table's rows); ``note`` is printed once,
    the first time the rule drops something.
    """

    name: str
    first: re.Pattern[str]
    note: str
    continuation: re.Pattern[str] | None = None


NOISE_RULES: tuple[NoiseRule, ...] = (
    NoiseRule(
        "bnb-kernel",
        re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community"),
        "bitsandbytes could not fetch an optional CPU kernel from the Hugging Face hub "
        "(offline here); it uses its built-in kernel. Harmless.",
    ),
    NoiseRule(
        "load-report",
        re.compile(r"LOAD REPORT"),
        "transformers reported the classification head (score.weight) as newly "
        "initialized: expected, the head is trained with LoRA.",
        # the report's table rows, its notes and blank lines
        re.compile(
            r"^\s*$|^Key\s|^[-+|\s]+$|^\s*Notes:|^- |"
            r"^\S+\s*\|\s*(?:MISSING|UNEXPECTED|MISMATCH|CONVERSION)\b"
        ),
    ),
    NoiseRule(
        "python-warning",
        re.compile(r"^\S+\.py:\d+: (?:Future|Deprecation)Warning: "),
        "library deprecation warnings (FutureWarning, DeprecationWarning) are hidden; "
        "HAFLQ_LOG_LEVEL=DEBUG shows them.",
        # the source line Python prints under a warning
        re.compile(r"^\s+\S"),
    ),
    NoiseRule(
        "flwr-federation-size",
        re.compile(r"default simulated SuperNodes changed from 10 to 2|To change federation size"),
        "Flower's hint about the federation size does not apply: the launcher sets "
        "num-supernodes (--num-supernodes).",
        re.compile(r"flwr federation simulation-config"),
    ),
)


@dataclass
class NoiseFilter:
    """Drop third-party notices from a stream of log lines, explaining each kind once.

    Feed lines in order with :meth:`feed`; it returns the lines to print (possibly
    none, possibly a one-line note instead of a notice). Pure and line-based, so it is
    tested on captured output.
    """

    rules: tuple[NoiseRule, ...] = NOISE_RULES
    dropped: dict[str, int] = field(default_factory=dict)
    _open: NoiseRule | None = None

    def feed(self, line: str) -> list[str]:
        """The lines to print for ``line`` (which ends with its newline, or not)."""
        text = _ANSI.sub("", _RAY_PREFIX.sub("", line.rstrip("\n")))
        if _OURS.match(text):  # our own lines always print and end any notice
            self._open = None
            return [line if line.endswith("\n") else line + "\n"]
        if self._open is not None:
            cont = self._open.continuation
            if cont is not None and cont.search(text):
                self.dropped[self._open.name] += 1
                return []
            self._open = None
        for rule in self.rules:
            if rule.first.search(text):
                first_time = rule.name not in self.dropped
                self.dropped[rule.name] = self.dropped.get(rule.name, 0) + 1
                self._open = rule
                return [f"(note) {rule.note}\n"] if first_time else []
        return [line if line.endswith("\n") else line + "\n"]
