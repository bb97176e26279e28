"""Typed run configuration: every knob declared once, on the dataclass that holds it.

Flower hands the app a flat ``run_config`` mapping (``"lora.rank" -> 8``). Under
``flwr run`` it holds every default from ``pyproject.toml``; under the in-process
``run_simulation`` it is empty. Each key is a field of one of the section dataclasses
below (or of :class:`~haflq_flower.privacy.DPConfig`), declared with
:func:`~haflq_flower.settings.setting`: key, default and check. :data:`DEFAULTS` (kept
identical to ``pyproject.toml`` by a test) and :func:`parse_run_config` are derived from
those declarations, so a wrong value fails at start-up with the key, the value and what
is allowed. The allowed values belong to the modules that implement them.

What depends on the chosen strategy (can it do DP, block precision, a 16-bit base? its
own options?) is checked by :func:`haflq_flower.strategy.load_run_config`, which the apps
and the launcher call; this module imports no strategy, torch or Flower.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .hardware import COMPUTE_DTYPES, auto_compute_dtype
from .lora.aggregate import AGGREGATIONS
from .lora.components import MODES
from .lora.importance import TIE_BREAKS
from .privacy import DPConfig
from .profiles import ProfileError, TierTable
from .prompts import HEAD_INITS, resolve_label_words, resolve_template
from .quant.blocks import BLOCK_PRECISIONS, QUANTIZATIONS, SALIENCE_METRICS
from .quant.payload import DOWNLINK_BITS, UPLINKS, WIDTHS
from .settings import (
    ConfigError,
    choice,
    defaults_of,
    names,
    parse_section,
    positive,
    setting,
    setting_of,
    settings_of,
    split_names,
    within,
)
from .splits import EVAL_SPLITS, PARTITIONERS

__all__ = ["ConfigError", "DEFAULTS", "RunConfig", "parse_run_config"]


# --------------------------------------------------------- checks needing context
def _stripped(nonempty: str = "") -> Callable[[str, str, Mapping[str, Any]], str]:
    def check(key: str, value: str, cfg: Mapping[str, Any]) -> str:
        value = value.strip()
        if nonempty and not value:
            raise ConfigError(f"run config '{key}' is empty; {nonempty}")
        return value

    return check


def _compute_dtype(key: str, value: str, cfg: Mapping[str, Any]) -> str:
    """``auto`` resolves here, on the machine that parses the config."""
    choice(COMPUTE_DTYPES)(key, value, cfg)
    return auto_compute_dtype() if value == "auto" else value


def _cache_dir(key: str, value: str, cfg: Mapping[str, Any]) -> Path:
    return Path(value).expanduser() if value else default_cache_dir()


def _label_words(key: str, value: str, cfg: Mapping[str, Any]) -> tuple[str, ...]:
    return resolve_label_words(split_names(value), _dataset(cfg))


def _template(key: str, value: str, cfg: Mapping[str, Any]) -> str:
    value = resolve_template(value, _dataset(cfg))
    if value and value.count("{text}") != 1:
        raise ConfigError(
            f"run config '{key}' must contain '{{text}}' exactly once, got {value!r}. "
            'Example: data.template="Review: {text}\\nSentiment:"'
        )
    return value


def _widths(key: str, value: str, cfg: Mapping[str, Any]) -> tuple[int, ...]:
    try:
        widths = tuple(sorted({int(w) for w in split_names(value)}))
    except ValueError:
        widths = ()
    if not widths or any(w not in WIDTHS for w in widths):
        raise ConfigError(
            f"run config '{key}' must list widths from {', '.join(map(str, WIDTHS))}; got {value!r}"
        )
    return widths


_STRATEGY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # a registered name, e.g. "fedit"
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # "package.module:ClassName"


def _strategy_name(key: str, value: str, cfg: Mapping[str, Any]) -> str:
    """The form of a strategy name: a registered name or an import path
    ``package.module:ClassName``. Which class it is, and whether it exists, is
    :func:`haflq_flower.strategy.load_run_config`'s to check (this module imports no
    strategy)."""
    name = value.strip()
    if _STRATEGY_NAME.match(name) or _IMPORT_PATH.match(name):
        return name
    raise ConfigError(
        f"run config '{key}': {name!r} is neither a strategy name (e.g. 'haflq', "
        "'fedit') nor an import path 'package.module:ClassName' of a LoRAStrategy subclass"
    )


def _absolute_output(key: str, value: str, cfg: Mapping[str, Any]) -> Path:
    path = Path(value).expanduser() if value else default_output_dir()
    if not path.is_absolute():
        raise ConfigError(
            f"run config '{key}' must be an absolute path, got {value!r}: under `flwr run` "
            "the apps run in the SuperLink's working directory, not in the project."
        )
    return path


def _resume(key: str, value: str, cfg: Mapping[str, Any]) -> Path | None:
    value = value.strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ConfigError(
            f"run config '{key}' must be the absolute path of the run directory to "
            f"continue (the one holding checkpoint.npz), got {value!r}"
        )
    return path


def default_cache_dir() -> Path:
    """Where converted models live: $HAFLQ_CACHE_DIR, else ~/.cache/haflq-flower."""
    env = os.environ.get("HAFLQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "haflq-flower"


def default_output_dir() -> Path:
    """A fresh absolute run directory; the apps do not run in the project directory."""
    env = os.environ.get("HAFLQ_OUTPUT_DIR")
    root = Path(env) if env else Path.home() / "haflq-flower-runs"
    return root / time.strftime("run-%Y%m%d-%H%M%S")


# ---------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelConfig:
    name: str = setting(
        "model.name", "smollm2-135m", _stripped("e.g. 'smollm2-135m' or a directory")
    )
    quantization: str = setting("model.quantization", "nf4", choice(QUANTIZATIONS))
    compute_dtype: str = setting("model.compute-dtype", "auto", _compute_dtype)
    max_length: int = setting("model.max-length", 64, positive())
    cache_dir: Path = setting("model.cache-dir", "", _cache_dir)
    # "label-words": the classification head starts as the LM head's rows of one word per
    # label (the model answers with a label word); "random": a fresh seeded head; "auto":
    # label words where the model allows them (tied embeddings, distinct first tokens),
    # else random.
    head_init: str = setting("model.head-init", "auto", choice(HEAD_INITS))
    label_words: tuple[str, ...] = setting("model.label-words", "", _label_words)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = setting("lora.rank", 8, positive())
    alpha: float = setting("lora.alpha", 16, positive(), kind=float)
    dropout: float = setting("lora.dropout", 0.05, within(0.0, 1.0, closed_high=False))
    target_modules: tuple[str, ...] = setting(
        "lora.target-modules", "q_proj,k_proj,v_proj,o_proj", names("names no module")
    )

    @property
    def scaling(self) -> float:
        """LoRA scale alpha/R, with the global R on every client."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class DataConfig:
    name: str = setting("data.name", "rotten-tomatoes", _stripped())
    files: tuple[str, ...] = setting("data.files", "", names())
    text_column: str = setting("data.text-column", "text")
    label_column: str = setting("data.label-column", "label")
    partitioner: str = setting("data.partitioner", "dirichlet", choice(PARTITIONERS))
    dirichlet_alpha: float = setting("data.dirichlet-alpha", 0.5, positive())
    test_per_class: int = setting("data.test-per-class", 100, positive())
    max_train_examples: int = setting("data.max-train-examples", 0, positive(allow_zero=True))
    # The run's seed (key ``seed``), for the partitions and the splits.
    seed: int = 0
    # Balanced rows per label held out of the training pool for choosing learning rates
    # and rounds (``eval.split="validation"``); 0 = none.
    validation_per_class: int = setting("data.validation-per-class", 0, positive(allow_zero=True))
    # Prompt around every text, e.g. "Review: {text}\nSentiment:"; "" = the text as is.
    template: str = setting("data.template", "auto", _template)


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = setting("train.local-steps", 6, positive())
    batch_size: int = setting("train.batch-size", 8, positive())
    learning_rate: float = setting("train.learning-rate", 1e-3, positive())
    head_learning_rate: float = setting("train.head-learning-rate", 0.0, positive(True))
    weight_decay: float = setting("train.weight-decay", 0.0, positive(allow_zero=True))
    eval_batch_size: int = setting("eval.batch-size", 32, positive())
    # The split the server evaluates on every round ("test" or "validation"), and whether
    # it writes every row's predicted label to predictions.npz.
    eval_split: str = setting("eval.split", "test", choice(EVAL_SPLITS))
    eval_predictions: bool = setting("eval.predictions", True)
    # Evaluate after rounds 0, k, 2k, ... and always after the last; 0 = the last round
    # only (a grid that reports final accuracy skips the intermediate evaluations).
    eval_every: int = setting("eval.every", 1, positive(allow_zero=True))
    # Recompute each block's activations in backward instead of keeping them: less
    # peak memory for more compute per step (docs/benchmarks.md has both measured).
    gradient_checkpointing: bool = setting("train.gradient-checkpointing", False)

    def evaluates_after(self, server_round: int, num_rounds: int) -> bool:
        """Whether the server evaluates the global adapter after ``server_round``."""
        if server_round >= num_rounds:
            return True
        return self.eval_every > 0 and server_round % self.eval_every == 0


_UNIT = within(0.0, 1.0, closed_high=False)


@dataclass(frozen=True)
class ImportanceConfig:
    beta1: float = setting("importance.beta1", 0.85, _UNIT)
    beta2: float = setting("importance.beta2", 0.85, _UNIT)
    smoothing: float = setting("importance.smoothing", 0.5, _UNIT)
    tie_break: str = setting("importance.tie-break", "index", choice(TIE_BREAKS))


@dataclass(frozen=True)
class TiersConfig:
    """The tier table as written in the run config (comma-separated, one value per tier);
    :meth:`table` checks it as a whole."""

    names: str = setting("tiers.names", "low,mid,high")
    lora_ranks: str = setting("tiers.lora-ranks", "2,4,8")
    fractions: str = setting("tiers.fractions", "")
    distances_km: str = setting("tiers.distances-km", "")
    memory_mb: str = setting("tiers.memory-mb", "")

    def table(self) -> TierTable:
        try:
            return TierTable.from_lists(
                split_names(self.names),
                [int(r) for r in split_names(self.lora_ranks)],
                [float(f) for f in split_names(self.fractions)],
                [float(d) for d in split_names(self.distances_km)],
                [float(m) for m in split_names(self.memory_mb)],
            )
        except (ProfileError, ValueError) as err:
            raise ConfigError(
                f'run config tiers: {err}. Example: tiers.names="low,mid,high" '
                f'tiers.lora-ranks="2,4,8" tiers.fractions="0.4,0.3,0.3" '
                f'tiers.distances-km="2.0,1.5,1.1" tiers.memory-mb="180,220,300"'
            ) from err


@dataclass(frozen=True)
class ChannelConfig:
    bandwidth_hz: float = setting("channel.bandwidth-hz", 1e6, positive())
    power_w: float = setting("channel.power-w", 0.1, positive())
    deadline_s: float = setting("channel.deadline-s", 3.0, positive())


@dataclass(frozen=True)
class PayloadConfig:
    uplink: str = setting("payload.uplink", "auto", choice(("auto", *UPLINKS)))
    widths: tuple[int, ...] = setting("payload.widths", "16,8,4,2", _widths)
    downlink_bits: int = setting("payload.downlink-bits", 16, choice(DOWNLINK_BITS))


@dataclass(frozen=True)
class BlockConfig:
    """Block-wise precision of the base model (HAFLQ's first mechanism)."""

    precision: str = setting("blocks.precision", "off", choice(BLOCK_PRECISIONS))
    salience_metric: str = setting("blocks.salience-metric", "recovery", choice(SALIENCE_METRICS))
    calibration_rows: int = setting("blocks.calibration-rows", 16, positive())
    calibration_clients: int = setting("blocks.calibration-clients", 2, positive())

    @property
    def enabled(self) -> bool:
        return self.precision != "off"


_FRACTION = within(0.0, 1.0)


@dataclass(frozen=True)
class StrategyConfig:
    name: str = setting("strategy.name", "haflq", _strategy_name)
    mode: str = setting("strategy.mode", "freeze", choice(MODES))
    aggregation: str = setting("strategy.aggregation", "adaptive", choice(AGGREGATIONS))
    fraction_train: float = setting("strategy.fraction-train", 1.0, _FRACTION)
    min_train_nodes: int = setting("strategy.min-train-nodes", 1, positive())
    fraction_evaluate: float = setting("strategy.fraction-evaluate", 0.0, _FRACTION)
    round_timeout: float = setting("strategy.round-timeout", 3600.0, positive())
    min_replies: int = setting("strategy.min-replies", 1, positive())
    max_examples: int = setting("strategy.max-examples", 10_000_000, positive())
    clip_factor: float = setting("strategy.clip-factor", 5.0, positive(allow_zero=True))
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    tiers: TierTable = field(default_factory=lambda: TiersConfig().table())
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    payload: PayloadConfig = field(default_factory=PayloadConfig)
    blocks: BlockConfig = field(default_factory=BlockConfig)
    # Robustness against self-reported numbers (docs/reliability.md): caps on weights
    # and scores relative to the round, and on claimed uplink and memory.
    weight_clip: float = setting("strategy.weight-clip", 5.0, positive(allow_zero=True))
    score_clip: float = setting("importance.score-clip", 10.0, positive(allow_zero=True))
    max_uplink_bps: float = setting("profile.max-uplink-bps", 1e9, positive(allow_zero=True))
    max_memory_mb: float = setting("profile.max-memory-mb", 262144.0, positive(allow_zero=True))


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    train: TrainConfig
    strategy: StrategyConfig
    # The flat run config as given, with every default filled in (results.json).
    raw: dict[str, Any]
    num_rounds: int = setting("num-server-rounds", 3, positive())
    seed: int = setting("seed", 0)
    output_dir: Path = setting("output.dir", "", _absolute_output)
    plots: bool = setting("output.plots", True)
    # Write checkpoint.npz after every round; resume: the run directory to continue.
    checkpoint: bool = setting("output.checkpoint", True)
    resume: Path | None = setting("resume", "", _resume)
    # Simulation only: the probability that a client fails a round (as a crashed device).
    dropout: float = setting("simulation.dropout", 0.0, within(0.0, 1.0, closed_high=False))
    # Client-level differential privacy (docs/privacy.md); off by default.
    dp: DPConfig = field(default_factory=DPConfig)
    # The strategy's own options (an instance of its ``options`` dataclass), if it has any.
    options: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The flat run config as given (with defaults filled), for results.json."""
        return dict(self.raw)


# Every section that declares run-config keys, in the order pyproject.toml lists them.
SECTIONS: tuple[type, ...] = (
    RunConfig,
    ModelConfig,
    LoraConfig,
    DataConfig,
    TrainConfig,
    StrategyConfig,
    ImportanceConfig,
    TiersConfig,
    BlockConfig,
    ChannelConfig,
    PayloadConfig,
    DPConfig,
)
# Defaults of every run-config key. Must match [tool.flwr.app.config] in pyproject.toml.
DEFAULTS: dict[str, Any] = defaults_of(SECTIONS)


def _dataset(cfg: Mapping[str, Any]) -> str:
    """The dataset name a check depends on (template and label words per dataset)."""
    return str(cfg.get("data.name", DEFAULTS["data.name"])).strip()


def _output_paths(cfg: Mapping[str, Any]) -> tuple[Path, Path | None]:
    """``output.dir`` and ``resume`` (absolute); a resumed run writes into the
    directory it continues."""
    resume = setting_of(RunConfig, "resume").read(cfg)
    output_dir = setting_of(RunConfig, "output.dir").read(cfg)
    given_out = str(cfg.get("output.dir", "")).strip()
    if resume is not None:
        if given_out and output_dir != resume:
            raise ConfigError(
                f"run config 'resume' ({resume}) and 'output.dir' ({output_dir}) differ: a "
                "resumed run writes into the directory it continues; leave output.dir empty"
            )
        output_dir = resume
    return output_dir, resume


def _namespace(key: str) -> str:
    """A key's first section (``lora`` of ``lora.rank``); a key without one is its own
    (and haflq-flower's: the app's keys must have a section)."""
    return key.split(".", 1)[0] if "." in key else ""


# The sections of haflq-flower's keys, and its keys without a section: a key there that
# is not one of ours is a typo. Keys of other sections belong to the app (a strategy's
# own options, docs/extending.md).
NAMESPACES = frozenset(_namespace(key) for key in DEFAULTS)  # "" for the keys without


def _option_keys(options: type | None) -> dict[str, Any]:
    """The keys of a strategy's options dataclass with their defaults; each must lie in a
    section of its own (under `flwr run` every key of the app's pyproject reaches every
    run, whichever strategy it selects)."""
    if options is None:
        return {}
    keys = {spec.key: spec.default for spec in settings_of(options)}
    for key in keys:
        if "." not in key or _namespace(key) in NAMESPACES:
            raise ConfigError(
                f"strategy option {key!r} ({options.__name__}) must lie in a section of its "
                f"own, e.g. 'my-strategy.{key.rsplit('.', 1)[-1]}': "
                f"{', '.join(sorted(NAMESPACES))} are haflq-flower's"
            )
    return keys


def parse_run_config(cfg: Mapping[str, Any], options: type | None = None) -> RunConfig:
    """Validate a flat run config (missing keys take their defaults).

    Parameters
    ----------
    cfg : Mapping
        The flat run config (``"lora.rank" -> 8``).
    options : type, optional
        The strategy's own options dataclass (fields declared with
        :func:`~haflq_flower.settings.setting`): its keys are accepted too, and the
        parsed instance is ``RunConfig.options``.

    Raises
    ------
    ConfigError
        On an unknown key in one of haflq-flower's sections or the strategy's, a wrong
        type or a value out of range. Keys of other sections are kept (``raw``, written
        to results.json) and not used: they are the app's keys of another strategy.
    """
    known = {**DEFAULTS, **_option_keys(options)}
    own = NAMESPACES | {_namespace(key) for key in known if key not in DEFAULTS}
    unknown = sorted(key for key in set(cfg) - set(known) if _namespace(key) in own)
    if unknown:
        raise ConfigError(
            f"unknown run config key(s): {', '.join(unknown)}. "
            f"Known keys are listed in pyproject.toml under [tool.flwr.app.config]"
            + (f" and in {options.__name__}." if options is not None else ".")
        )
    foreign = sorted(set(cfg) - set(known))
    if foreign:  # an app's keys for another strategy (docs/extending.md): kept, unused
        known.update((key, cfg[key]) for key in foreign)
    seed = setting_of(RunConfig, "seed").read(cfg)
    data = parse_section(DataConfig, cfg, seed=seed)
    train = parse_section(TrainConfig, cfg)
    if train.eval_split == "validation" and not data.validation_per_class:
        raise ConfigError(
            "run config 'eval.split' is 'validation' but 'data.validation-per-class' is 0: "
            "hold out a validation split, e.g. data.validation-per-class=200"
        )
    strategy = parse_section(
        StrategyConfig,
        cfg,
        importance=parse_section(ImportanceConfig, cfg),
        tiers=parse_section(TiersConfig, cfg).table(),
        channel=parse_section(ChannelConfig, cfg),
        payload=parse_section(PayloadConfig, cfg),
        blocks=parse_section(BlockConfig, cfg),
    )
    dp = parse_section(DPConfig, cfg)
    try:
        dp.check()
    except ValueError as err:
        raise ConfigError(f"run config: {err}") from err
    output_dir, resume = _output_paths(cfg)
    return parse_section(
        RunConfig,
        cfg,
        model=parse_section(ModelConfig, cfg),
        lora=parse_section(LoraConfig, cfg),
        data=data,
        train=train,
        strategy=strategy,
        raw={key: cfg.get(key, default) for key, default in known.items()},
        output_dir=output_dir,
        resume=resume,
        dp=dp,
        options=None if options is None else parse_section(options, cfg),
    )


def resolve_auto_blocks(cfg: RunConfig, check: Callable[[RunConfig], None]) -> RunConfig:
    """``blocks.precision="auto"``: ``salience`` when the tiers have weight budgets
    (``tiers.memory-mb``) and the strategy accepts per-client block precision (``check``
    does not raise: haflq, hetlora and the other heterogeneous strategies), else ``off``
    (``model.quantization`` for the whole base), so that e.g. ``strategy.name="fedit"``
    alone is a valid run config. Other precisions are returned as they are."""

    def with_precision(precision: str) -> RunConfig:
        blocks = replace(cfg.strategy.blocks, precision=precision)
        return replace(cfg, strategy=replace(cfg.strategy, blocks=blocks))

    if cfg.strategy.blocks.precision != "auto":
        return cfg
    if any(p.memory_mb > 0 for p in cfg.strategy.tiers.profiles):
        candidate = with_precision("salience")
        try:
            check(candidate)
            return candidate
        except ConfigError:
            pass
    return with_precision("off")
