"""Run-config keys declared on the dataclasses that hold them.

Every knob of a run is a field of a frozen dataclass (``TrainConfig.local_steps``,
``DPConfig.clip``, a user strategy's own options) declared with :func:`setting`: its
run-config key, its default (the value ``pyproject.toml`` must list) and how a value is
checked. That declaration is the one place a key is written in Python; the flat
``DEFAULTS``, the parser and the errors are derived from it
(:func:`haflq_flower.config.parse_run_config`).

Pure Python: declaring or reading settings imports nothing heavy, so the module that
implements a mechanism can own its allowed values and still sit below the config.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

# check(key, value, cfg) -> value: ``value`` already has the default's type; ``cfg`` is
# the whole flat run config, for the few checks that depend on another key.
Check = Callable[[str, Any, Mapping[str, Any]], Any]

_SETTING = "haflq-setting"


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class Setting:
    """One run-config key: its default (as ``pyproject.toml`` writes it) and its check."""

    key: str
    default: Any
    check: Check | None = None
    # the value's type; default: the default's (an int default of a float knob says so)
    kind: type | None = None

    def read(self, cfg: Mapping[str, Any]) -> Any:
        """The checked value of this key in ``cfg`` (its default when absent)."""
        kind = self.kind or type(self.default)
        value = typed(self.key, cfg.get(self.key, self.default), kind, self.default)
        return value if self.check is None else self.check(self.key, value, cfg)


def setting(key: str, default: Any, check: Check | None = None, kind: type | None = None) -> Any:
    """A dataclass field for run-config key ``key``.

    The field's own default is the checked default, so a section built in code without
    an argument equals one parsed from an empty run config (computed when needed: some
    checks resolve ``auto`` by looking at the machine).
    """
    spec = Setting(key, default, check, kind)
    meta = {_SETTING: spec}
    if check is None and kind in (None, type(default)):
        return field(default=default, metadata=meta)
    return field(default_factory=functools.partial(spec.read, {}), metadata=meta)


def settings_of(section: type) -> list[Setting]:
    """The settings a section dataclass declares, in field order (nested sections are
    not followed: each section is parsed on its own)."""
    if not is_dataclass(section):
        raise TypeError(f"{section!r} is not a dataclass")
    return [f.metadata[_SETTING] for f in fields(section) if _SETTING in f.metadata]


def setting_of(section: type, key: str) -> Setting:
    """The setting of ``section`` for run-config key ``key``."""
    for spec in settings_of(section):
        if spec.key == key:
            return spec
    raise KeyError(f"{section.__name__} declares no run-config key {key!r}")


def defaults_of(sections: Iterable[type]) -> dict[str, Any]:
    """Every key the sections declare, with its default; a key declared twice is a bug."""
    out: dict[str, Any] = {}
    for section in sections:
        for spec in settings_of(section):
            if spec.key in out:
                raise ValueError(f"run-config key {spec.key!r} is declared twice")
            out[spec.key] = spec.default
    return out


def parse_section(section: type, cfg: Mapping[str, Any], **given: Any) -> Any:
    """An instance of ``section`` with every declared setting read from ``cfg``; fields
    without a setting (nested sections, derived values) come from ``given``."""
    values = {
        f.name: f.metadata[_SETTING].read(cfg)
        for f in fields(section)
        if _SETTING in f.metadata and f.name not in given
    }
    missing = [
        f.name
        for f in fields(section)
        if f.name not in values
        and f.name not in given
        and f.default is MISSING
        and f.default_factory is MISSING
    ]
    if missing:
        raise TypeError(f"{section.__name__}: no setting and no value for {missing}")
    return section(**values, **given)


def typed(key: str, value: Any, kind: type, example: Any) -> Any:
    """``value`` as ``kind`` (int for a float default is widened, an integral float is an
    int, "true"/"false" are booleans), or a ConfigError with an example."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"run config '{key}' must be of type {kind.__name__}, got {value!r} "
            f'({type(value).__name__}). Example: --run-config "{key}={example!r}"'
        )
    return value


# ------------------------------------------------------------------ checks
def choice(allowed: Iterable[Any]) -> Check:
    """One of ``allowed``."""
    options = tuple(allowed)

    def check(key: str, value: Any, cfg: Mapping[str, Any]) -> Any:
        if value not in options:
            raise ConfigError(
                f"run config '{key}' is {value!r}; allowed: {', '.join(map(str, options))}"
            )
        return value

    return check


def positive(allow_zero: bool = False) -> Check:
    """A finite number > 0 (or >= 0)."""

    def check(key: str, value: Any, cfg: Mapping[str, Any]) -> Any:
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"run config '{key}' must be {bound}, got {value!r}")
        return value

    return check


def within(low: float, high: float, closed_high: bool = True) -> Check:
    """A number in [low, high] (or [low, high))."""

    def check(key: str, value: Any, cfg: Mapping[str, Any]) -> Any:
        if not (low <= value <= high) or (not closed_high and value == high):
            bracket = "]" if closed_high else ")"
            raise ConfigError(
                f"run config '{key}' must lie in [{low:g}, {high:g}{bracket}, got {value!r}"
            )
        return value

    return check


def names(nonempty: str = "") -> Check:
    """A comma-separated list as a tuple of stripped names; with ``nonempty``, an empty
    list is an error that ends with that text."""

    def check(key: str, value: Any, cfg: Mapping[str, Any]) -> tuple[str, ...]:
        out = split_names(value)
        if nonempty and not out:
            raise ConfigError(f"run config '{key}' {nonempty}")
        return out

    return check


def split_names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())
