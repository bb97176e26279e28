"""Typed run configuration: one parser for every knob, with clear errors.

Flower hands the app a flat ``run_config`` mapping (``"lora.rank" -> 8``). Under
``flwr run`` it holds every default from ``pyproject.toml``; under the in-process
``run_simulation`` it is empty. :func:`parse_run_config` fills the gaps from
:data:`DEFAULTS` (kept identical to ``pyproject.toml`` by a test) and validates every
value, so a wrong value fails at start-up with the key, the value and what is allowed.
What depends on the chosen strategy (can it do DP, block precision, a 16-bit base?) is
checked by :func:`haflq_flower.strategy.load_run_config`, which the apps and the
launcher call; this module imports no strategy, torch or Flower.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .hardware import auto_compute_dtype
from .privacy import DP_MODES, DPConfig
from .profiles import ProfileError, TierTable
from .prompts import resolve_label_words, resolve_template
from .quant.blocks import SALIENCE_METRICS

# Defaults of every run-config key. Must match [tool.flwr.app.config] in pyproject.toml.
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "seed": 0,
    "model.name": "smollm2-135m",
    "model.quantization": "nf4",
    "model.compute-dtype": "auto",
    "model.max-length": 64,
    "model.cache-dir": "",
    "model.head-init": "auto",
    "model.label-words": "",
    "lora.rank": 8,
    "lora.alpha": 16,
    "lora.dropout": 0.05,
    "lora.target-modules": "q_proj,k_proj,v_proj,o_proj",
    "data.name": "rotten-tomatoes",
    "data.files": "",
    "data.text-column": "text",
    "data.label-column": "label",
    "data.partitioner": "dirichlet",
    "data.dirichlet-alpha": 0.5,
    "data.test-per-class": 100,
    "data.max-train-examples": 0,
    "data.validation-per-class": 0,
    "data.template": "auto",
    "train.local-steps": 6,
    "train.batch-size": 8,
    "train.learning-rate": 1e-3,
    "train.head-learning-rate": 0.0,
    "train.weight-decay": 0.0,
    "train.gradient-checkpointing": False,
    "eval.batch-size": 32,
    "eval.split": "test",
    "eval.predictions": True,
    "eval.every": 1,
    "strategy.name": "haflq",
    "strategy.mode": "freeze",
    "strategy.aggregation": "adaptive",
    "importance.beta1": 0.85,
    "importance.beta2": 0.85,
    "importance.smoothing": 0.5,
    "importance.tie-break": "index",
    "tiers.names": "low,mid,high",
    "tiers.lora-ranks": "2,4,8",
    "tiers.fractions": "",
    "tiers.distances-km": "",
    "tiers.memory-mb": "",
    "blocks.precision": "off",
    "blocks.salience-metric": "recovery",
    "blocks.calibration-rows": 16,
    "blocks.calibration-clients": 2,
    "channel.bandwidth-hz": 1e6,
    "channel.power-w": 0.1,
    "channel.deadline-s": 3.0,
    "payload.uplink": "auto",
    "payload.widths": "16,8,4,2",
    "payload.downlink-bits": 16,
    "strategy.fraction-train": 1.0,
    "strategy.min-train-nodes": 1,
    "strategy.fraction-evaluate": 0.0,
    "strategy.round-timeout": 3600.0,
    "strategy.min-replies": 1,
    "strategy.max-examples": 10_000_000,
    "strategy.clip-factor": 5.0,
    "strategy.weight-clip": 5.0,
    "importance.score-clip": 10.0,
    "profile.max-uplink-bps": 1e9,
    "profile.max-memory-mb": 262144.0,
    "simulation.dropout": 0.0,
    "dp.mode": "off",
    "dp.clip": 1.0,
    "dp.noise-multiplier": 1.0,
    "dp.delta": 1e-5,
    "output.dir": "",
    "output.plots": True,
    "output.checkpoint": True,
    "resume": "",
}

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
PARTITIONERS = ("iid", "dirichlet", "inner-dirichlet")
MODES = ("freeze", "truncate")
AGGREGATIONS = ("adaptive", "zero-pad")
TIE_BREAKS = ("index", "seed")
UPLINKS = ("auto", "adaptive", "fp16", "fp32")
DOWNLINK_BITS = (8, 16, 32)
HEAD_INITS = ("auto", "random", "label-words")
EVAL_SPLITS = ("test", "validation")
BLOCK_PRECISIONS = ("off", "uniform-4", "uniform-8", "uniform-16", "salience", "random", "auto")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    quantization: str
    compute_dtype: str
    max_length: int
    cache_dir: Path
    # "label-words": the classification head starts as the LM head's rows of one word per
    # label (the model answers with a label word); "random": a fresh seeded head; "auto":
    # label words where the model allows them (tied embeddings, distinct first tokens),
    # else random.
    head_init: str = "random"
    label_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        """LoRA scale alpha/R, with the global R on every client."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class DataConfig:
    name: str
    files: tuple[str, ...]
    text_column: str
    label_column: str
    partitioner: str
    dirichlet_alpha: float
    test_per_class: int
    max_train_examples: int
    seed: int
    # Balanced rows per label held out of the training pool for choosing learning rates
    # and rounds (``eval.split="validation"``); 0 = none.
    validation_per_class: int = 0
    # Prompt around every text, e.g. "Review: {text}\nSentiment:"; "" = the text as is.
    template: str = ""


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int
    batch_size: int
    learning_rate: float
    head_learning_rate: float
    weight_decay: float
    eval_batch_size: int
    # The split the server evaluates on every round ("test" or "validation"), and whether
    # it writes every row's predicted label to predictions.npz.
    eval_split: str = "test"
    eval_predictions: bool = True
    # Evaluate after rounds 0, k, 2k, ... and always after the last; 0 = the last round
    # only (a grid that reports final accuracy skips the intermediate evaluations).
    eval_every: int = 1
    # Recompute each block's activations in backward instead of keeping them: less
    # peak memory for more compute per step (docs/benchmarks.md has both measured).
    gradient_checkpointing: bool = False

    def evaluates_after(self, server_round: int, num_rounds: int) -> bool:
        """Whether the server evaluates the global adapter after ``server_round``."""
        if server_round >= num_rounds:
            return True
        return self.eval_every > 0 and server_round % self.eval_every == 0


@dataclass(frozen=True)
class ImportanceConfig:
    beta1: float
    beta2: float
    smoothing: float
    tie_break: str


@dataclass(frozen=True)
class ChannelConfig:
    bandwidth_hz: float
    power_w: float
    deadline_s: float


@dataclass(frozen=True)
class PayloadConfig:
    uplink: str
    widths: tuple[int, ...]
    downlink_bits: int


@dataclass(frozen=True)
class BlockConfig:
    """Block-wise precision of the base model (HAFLQ's first mechanism)."""

    precision: str
    salience_metric: str
    calibration_rows: int
    calibration_clients: int

    @property
    def enabled(self) -> bool:
        return self.precision != "off"


@dataclass(frozen=True)
class StrategyConfig:
    name: str
    mode: str
    aggregation: str
    fraction_train: float
    min_train_nodes: int
    fraction_evaluate: float
    round_timeout: float
    min_replies: int
    max_examples: int
    clip_factor: float
    importance: ImportanceConfig
    tiers: TierTable
    channel: ChannelConfig
    payload: PayloadConfig
    blocks: BlockConfig
    # Robustness against self-reported numbers (docs/reliability.md): caps on weights
    # and scores relative to the round, and on claimed uplink and memory.
    weight_clip: float = 0.0
    score_clip: float = 0.0
    max_uplink_bps: float = 1e9
    max_memory_mb: float = 262144.0


@dataclass(frozen=True)
class RunConfig:
    num_rounds: int
    seed: int
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    train: TrainConfig
    strategy: StrategyConfig
    output_dir: Path
    plots: bool
    raw: dict[str, Any]
    # Write checkpoint.npz after every round; resume: the run directory to continue.
    checkpoint: bool = True
    resume: Path | None = None
    # Simulation only: the probability that a client fails a round (as a crashed device).
    dropout: float = 0.0
    # Client-level differential privacy (docs/privacy.md); off by default.
    dp: DPConfig = DPConfig()

    def to_dict(self) -> dict[str, Any]:
        """The flat run config as given (with defaults filled), for results.json."""
        return dict(self.raw)


def _get(cfg: Mapping[str, Any], key: str, kind: type) -> Any:
    value = cfg.get(key, DEFAULTS[key])
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"run config '{key}' must be of type {kind.__name__}, got {value!r} "
            f'({type(value).__name__}). Example: --run-config "{key}={DEFAULTS[key]!r}"'
        )
    return value


def _choice(cfg: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = _get(cfg, key, str)
    if value not in allowed:
        raise ConfigError(f"run config '{key}' is {value!r}; allowed: {', '.join(allowed)}")
    return value


def _positive(cfg: Mapping[str, Any], key: str, kind: type, allow_zero: bool = False) -> Any:
    value = _get(cfg, key, kind)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"run config '{key}' must be {bound}, got {value!r}")
    return value


def _fraction(cfg: Mapping[str, Any], key: str) -> float:
    value = _get(cfg, key, float)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"run config '{key}' must lie in [0, 1], got {value!r}")
    return value


_STRATEGY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # a registered name, e.g. "fedit"
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # "package.module:ClassName"


def _strategy_name(cfg: Mapping[str, Any]) -> str:
    """The form of a strategy name: a registered name or an import path
    ``package.module:ClassName``. Which class it is, and whether it exists, is
    :func:`haflq_flower.strategy.load_run_config`'s to check (this module imports no
    strategy)."""
    name = _get(cfg, "strategy.name", str).strip()
    if _STRATEGY_NAME.match(name) or _IMPORT_PATH.match(name):
        return name
    raise ConfigError(
        f"run config 'strategy.name': {name!r} is neither a strategy name (e.g. 'haflq', "
        "'fedit') nor an import path 'package.module:ClassName' of a LoRAStrategy subclass"
    )


def _compute_dtype(cfg: Mapping[str, Any]) -> str:
    """The compute dtype; ``auto`` resolves here, on the machine that parses the config."""
    value = _choice(cfg, "model.compute-dtype", COMPUTE_DTYPES)
    return auto_compute_dtype() if value == "auto" else value


def _unit_interval(cfg: Mapping[str, Any], key: str) -> float:
    value = _get(cfg, key, float)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"run config '{key}' must lie in [0, 1), got {value!r}")
    return value


def _template(cfg: Mapping[str, Any]) -> str:
    value = resolve_template(_get(cfg, "data.template", str), _get(cfg, "data.name", str).strip())
    if value and value.count("{text}") != 1:
        raise ConfigError(
            f"run config 'data.template' must contain '{{text}}' exactly once, got {value!r}. "
            'Example: data.template="Review: {text}\\nSentiment:"'
        )
    return value


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def default_cache_dir() -> Path:
    """Where converted models live: $HAFLQ_CACHE_DIR, else ~/.cache/haflq-flower."""
    env = os.environ.get("HAFLQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "haflq-flower"


def default_output_dir() -> Path:
    """A fresh absolute run directory; the apps do not run in the project directory."""
    env = os.environ.get("HAFLQ_OUTPUT_DIR")
    root = Path(env) if env else Path.home() / "haflq-flower-runs"
    return root / time.strftime("run-%Y%m%d-%H%M%S")


def _model_config(cfg: Mapping[str, Any]) -> ModelConfig:
    model_name = _get(cfg, "model.name", str).strip()
    if not model_name:
        raise ConfigError("run config 'model.name' is empty; e.g. 'smollm2-135m' or a directory")
    cache = _get(cfg, "model.cache-dir", str)
    model = ModelConfig(
        name=model_name,
        quantization=_choice(cfg, "model.quantization", QUANTIZATIONS),
        compute_dtype=_compute_dtype(cfg),
        max_length=_positive(cfg, "model.max-length", int),
        cache_dir=Path(cache).expanduser() if cache else default_cache_dir(),
        head_init=_choice(cfg, "model.head-init", HEAD_INITS),
        label_words=resolve_label_words(
            _csv(_get(cfg, "model.label-words", str)), _get(cfg, "data.name", str).strip()
        ),
    )
    return model


def _lora_config(cfg: Mapping[str, Any]) -> LoraConfig:
    targets = _csv(_get(cfg, "lora.target-modules", str))
    if not targets:
        raise ConfigError("run config 'lora.target-modules' names no module")
    dropout = _get(cfg, "lora.dropout", float)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"run config 'lora.dropout' must lie in [0, 1), got {dropout!r}")
    lora = LoraConfig(
        rank=_positive(cfg, "lora.rank", int),
        alpha=_positive(cfg, "lora.alpha", float),
        dropout=dropout,
        target_modules=targets,
    )
    return lora


def _data_config(cfg: Mapping[str, Any], seed: int) -> DataConfig:
    data = DataConfig(
        name=_get(cfg, "data.name", str).strip(),
        files=_csv(_get(cfg, "data.files", str)),
        text_column=_get(cfg, "data.text-column", str),
        label_column=_get(cfg, "data.label-column", str),
        partitioner=_choice(cfg, "data.partitioner", PARTITIONERS),
        dirichlet_alpha=_positive(cfg, "data.dirichlet-alpha", float),
        test_per_class=_positive(cfg, "data.test-per-class", int),
        max_train_examples=_positive(cfg, "data.max-train-examples", int, allow_zero=True),
        seed=seed,
        validation_per_class=_positive(cfg, "data.validation-per-class", int, allow_zero=True),
        template=_template(cfg),
    )
    return data


def _train_config(cfg: Mapping[str, Any]) -> TrainConfig:
    train = TrainConfig(
        local_steps=_positive(cfg, "train.local-steps", int),
        batch_size=_positive(cfg, "train.batch-size", int),
        learning_rate=_positive(cfg, "train.learning-rate", float),
        head_learning_rate=_positive(cfg, "train.head-learning-rate", float, allow_zero=True),
        weight_decay=_positive(cfg, "train.weight-decay", float, allow_zero=True),
        eval_batch_size=_positive(cfg, "eval.batch-size", int),
        eval_split=_choice(cfg, "eval.split", EVAL_SPLITS),
        eval_predictions=_get(cfg, "eval.predictions", bool),
        eval_every=_positive(cfg, "eval.every", int, allow_zero=True),
        gradient_checkpointing=_get(cfg, "train.gradient-checkpointing", bool),
    )
    return train


def _strategy_config(cfg: Mapping[str, Any]) -> StrategyConfig:
    """The strategy section (tiers, payload, channel, blocks, importance included)."""
    importance = ImportanceConfig(
        beta1=_unit_interval(cfg, "importance.beta1"),
        beta2=_unit_interval(cfg, "importance.beta2"),
        smoothing=_unit_interval(cfg, "importance.smoothing"),
        tie_break=_choice(cfg, "importance.tie-break", TIE_BREAKS),
    )
    try:
        ranks = [int(r) for r in _csv(_get(cfg, "tiers.lora-ranks", str))]
        fractions = [float(f) for f in _csv(_get(cfg, "tiers.fractions", str))]
        distances = [float(d) for d in _csv(_get(cfg, "tiers.distances-km", str))]
        memory = [float(m) for m in _csv(_get(cfg, "tiers.memory-mb", str))]
        tiers = TierTable.from_lists(
            _csv(_get(cfg, "tiers.names", str)), ranks, fractions, distances, memory
        )
    except (ProfileError, ValueError) as err:
        raise ConfigError(
            f'run config tiers: {err}. Example: tiers.names="low,mid,high" '
            f'tiers.lora-ranks="2,4,8" tiers.fractions="0.4,0.3,0.3" '
            f'tiers.distances-km="2.0,1.5,1.1" tiers.memory-mb="180,220,300"'
        ) from err
    try:
        widths = tuple(sorted({int(w) for w in _csv(_get(cfg, "payload.widths", str))}))
    except ValueError:
        widths = ()
    if not widths or any(w not in (16, 8, 4, 2) for w in widths):
        raise ConfigError(
            f"run config 'payload.widths' must list widths from 16, 8, 4, 2; got "
            f"{cfg.get('payload.widths')!r}"
        )
    downlink = _get(cfg, "payload.downlink-bits", int)
    if downlink not in DOWNLINK_BITS:
        raise ConfigError(f"run config 'payload.downlink-bits' must be 8, 16 or 32, got {downlink}")
    payload = PayloadConfig(
        uplink=_choice(cfg, "payload.uplink", UPLINKS), widths=widths, downlink_bits=downlink
    )
    channel = ChannelConfig(
        bandwidth_hz=_positive(cfg, "channel.bandwidth-hz", float),
        power_w=_positive(cfg, "channel.power-w", float),
        deadline_s=_positive(cfg, "channel.deadline-s", float),
    )
    blocks = BlockConfig(
        precision=_choice(cfg, "blocks.precision", BLOCK_PRECISIONS),
        salience_metric=_choice(cfg, "blocks.salience-metric", SALIENCE_METRICS),
        calibration_rows=_positive(cfg, "blocks.calibration-rows", int),
        calibration_clients=_positive(cfg, "blocks.calibration-clients", int),
    )
    strategy_name = _strategy_name(cfg)
    strategy = StrategyConfig(
        name=strategy_name,
        mode=_choice(cfg, "strategy.mode", MODES),
        aggregation=_choice(cfg, "strategy.aggregation", AGGREGATIONS),
        importance=importance,
        tiers=tiers,
        channel=channel,
        payload=payload,
        blocks=blocks,
        fraction_train=_fraction(cfg, "strategy.fraction-train"),
        min_train_nodes=_positive(cfg, "strategy.min-train-nodes", int),
        fraction_evaluate=_fraction(cfg, "strategy.fraction-evaluate"),
        round_timeout=_positive(cfg, "strategy.round-timeout", float),
        min_replies=_positive(cfg, "strategy.min-replies", int),
        max_examples=_positive(cfg, "strategy.max-examples", int),
        clip_factor=_positive(cfg, "strategy.clip-factor", float, allow_zero=True),
        weight_clip=_positive(cfg, "strategy.weight-clip", float, allow_zero=True),
        score_clip=_positive(cfg, "importance.score-clip", float, allow_zero=True),
        max_uplink_bps=_positive(cfg, "profile.max-uplink-bps", float, allow_zero=True),
        max_memory_mb=_positive(cfg, "profile.max-memory-mb", float, allow_zero=True),
    )
    return strategy


def _dp_config(cfg: Mapping[str, Any]) -> DPConfig:
    dp = DPConfig(
        mode=_choice(cfg, "dp.mode", DP_MODES),
        clip=_get(cfg, "dp.clip", float),
        noise_multiplier=_get(cfg, "dp.noise-multiplier", float),
        delta=_get(cfg, "dp.delta", float),
    )
    try:
        dp.check()
    except ValueError as err:
        raise ConfigError(f"run config: {err}") from err
    return dp


def _output_paths(cfg: Mapping[str, Any]) -> tuple[Path, Path | None]:
    """``output.dir`` (absolute) and ``resume`` (absolute, the same directory)."""
    out = _get(cfg, "output.dir", str)
    output_dir = Path(out).expanduser() if out else default_output_dir()
    if not output_dir.is_absolute():
        raise ConfigError(
            f"run config 'output.dir' must be an absolute path, got {out!r}: under `flwr run` "
            "the apps run in the SuperLink's working directory, not in the project."
        )
    resume_str = _get(cfg, "resume", str).strip()
    resume = Path(resume_str).expanduser() if resume_str else None
    if resume is not None:
        if not resume.is_absolute():
            raise ConfigError(
                f"run config 'resume' must be the absolute path of the run directory to "
                f"continue (the one holding checkpoint.npz), got {resume_str!r}"
            )
        if out and output_dir != resume:
            raise ConfigError(
                f"run config 'resume' ({resume}) and 'output.dir' ({output_dir}) differ: a "
                "resumed run writes into the directory it continues; leave output.dir empty"
            )
        output_dir = resume
    return output_dir, resume


def parse_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Validate a flat run config (missing keys take their defaults).

    Raises
    ------
    ConfigError
        On an unknown key, a wrong type or a value out of range.
    """
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown run config key(s): {', '.join(unknown)}. "
            f"Known keys are listed in pyproject.toml under [tool.flwr.app.config]."
        )
    raw = {key: cfg.get(key, default) for key, default in DEFAULTS.items()}
    seed = _get(cfg, "seed", int)
    data = _data_config(cfg, seed)
    train = _train_config(cfg)
    if train.eval_split == "validation" and not data.validation_per_class:
        raise ConfigError(
            "run config 'eval.split' is 'validation' but 'data.validation-per-class' is 0: "
            "hold out a validation split, e.g. data.validation-per-class=200"
        )
    strategy = _strategy_config(cfg)
    dp = _dp_config(cfg)
    dropout = _get(cfg, "simulation.dropout", float)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"run config 'simulation.dropout' must lie in [0, 1), got {dropout!r}")
    output_dir, resume = _output_paths(cfg)

    run_config = RunConfig(
        num_rounds=_positive(cfg, "num-server-rounds", int),
        seed=seed,
        model=_model_config(cfg),
        lora=_lora_config(cfg),
        data=data,
        train=train,
        strategy=strategy,
        output_dir=output_dir,
        plots=_get(cfg, "output.plots", bool),
        raw=raw,
        checkpoint=_get(cfg, "output.checkpoint", bool),
        resume=resume,
        dropout=dropout,
        dp=dp,
    )
    return run_config


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
