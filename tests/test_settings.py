"""Settings: a run-config key declared once, on its dataclass field."""

from dataclasses import dataclass

import pytest

from haflq_flower.config import (
    DEFAULTS,
    SECTIONS,
    BlockConfig,
    ChannelConfig,
    DataConfig,
    ImportanceConfig,
    LoraConfig,
    ModelConfig,
    PayloadConfig,
    TrainConfig,
    parse_run_config,
)
from haflq_flower.privacy import DPConfig
from haflq_flower.settings import (
    ConfigError,
    choice,
    defaults_of,
    names,
    parse_section,
    positive,
    setting,
    setting_of,
    settings_of,
    within,
)


@dataclass(frozen=True)
class Knobs:
    count: int = setting("k.count", 3, positive())
    rate: float = setting("k.rate", 1, within(0.0, 2.0), kind=float)
    flag: bool = setting("k.flag", False)
    kind: str = setting("k.kind", "a", choice(("a", "b")))
    parts: tuple[str, ...] = setting("k.parts", "x, y", names("names nothing"))
    untouched: str = "derived"


def test_a_section_reads_types_checks_and_defaults():
    assert parse_section(Knobs, {}) == Knobs(3, 1.0, False, "a", ("x", "y"))
    got = parse_section(Knobs, {"k.count": 5.0, "k.rate": 2, "k.flag": "true", "k.parts": "p,,q "})
    assert (got.count, got.rate, got.flag, got.parts) == (5, 2.0, True, ("p", "q"))
    assert type(got.rate) is float and type(got.count) is int
    assert parse_section(Knobs, {}, untouched="given").untouched == "given"
    for values, fragment in (
        ({"k.count": 0}, "'k.count' must be > 0"),
        ({"k.count": True}, "'k.count' must be of type int"),
        ({"k.count": 2.5}, "must be of type int"),
        ({"k.rate": 2.5}, "'k.rate' must lie in [0, 2]"),
        ({"k.rate": float("nan")}, "'k.rate' must lie in [0, 2]"),
        ({"k.kind": "c"}, "'k.kind' is 'c'; allowed: a, b"),
        ({"k.parts": " , "}, "'k.parts' names nothing"),
        ({"k.flag": "yes"}, "must be of type bool"),
    ):
        with pytest.raises(ConfigError, match=None) as err:
            parse_section(Knobs, values)
        assert fragment in str(err.value), (values, str(err.value))


def test_field_defaults_are_the_checked_defaults():
    """A section built in code without arguments equals the one parsed from an empty run
    config: the field default and the pyproject default cannot drift apart."""
    parsed = parse_run_config({})
    assert ModelConfig() == parsed.model
    assert LoraConfig() == parsed.lora
    assert DataConfig() == parsed.data
    assert TrainConfig() == parsed.train
    assert ImportanceConfig() == parsed.strategy.importance
    assert ChannelConfig() == parsed.strategy.channel
    assert PayloadConfig() == parsed.strategy.payload
    assert BlockConfig() == parsed.strategy.blocks
    assert DPConfig() == parsed.dp


def test_every_key_is_declared_once_and_found_by_name():
    keys = [s.key for section in SECTIONS for s in settings_of(section)]
    assert len(keys) == len(set(keys)) == len(DEFAULTS)
    assert setting_of(TrainConfig, "train.local-steps").default == DEFAULTS["train.local-steps"]
    with pytest.raises(KeyError):
        setting_of(TrainConfig, "lora.rank")

    @dataclass(frozen=True)
    class Twice:
        a: int = setting("k.count", 1)

    with pytest.raises(ValueError, match="declared twice"):
        defaults_of([Knobs, Twice])
