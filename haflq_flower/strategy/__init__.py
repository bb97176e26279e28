"""Federated LoRA strategies: the extendable base and the methods built on it."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ..config import (
    ConfigError,
    RunConfig,
    StrategyConfig,
    parse_run_config,
    resolve_auto_blocks,
)
from ..settings import setting_of
from .base import ClientUpdate, LoRAStrategy, ReplyError, RoundStats
from .blocks import BlockPlanner
from .fair import LoRAFAIR
from .fedex import FedExLoRA
from .fedit import FedIT
from .fedsa import FedSALoRA
from .ffa import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .haflq import HAFLQStrategy
from .heterogeneous import HeterogeneousLoRA
from .hetlora import FedITTruncated, HetLoRA

STRATEGIES: dict[str, type[LoRAStrategy]] = {
    "fedex-lora": FedExLoRA,
    "fedit": FedIT,
    "fedit-trunc": FedITTruncated,
    "fedsa-lora": FedSALoRA,
    "ffa-lora": FFALoRA,
    "flexlora": FlexLoRA,
    "flora": FLoRA,
    "haflq": HAFLQStrategy,
    "hetlora": HetLoRA,
    "lora-fair": LoRAFAIR,
}


def strategy_class(name: str) -> type[LoRAStrategy]:
    """The class ``strategy.name`` names: a registered name (``haflq``, ``fedit``, ...) or
    an import path ``package.module:ClassName`` of a :class:`LoRAStrategy` subclass.

    An import path works under ``flwr run`` and on deployed SuperNodes, where the
    ServerApp and every ClientApp parse the run config in their own processes: each
    imports the class itself (the module must be importable there, e.g. a file of the
    app directory, which travels in the FAB). A name registered in ``STRATEGIES`` at run
    time is known only to the process that registered it.

    Raises
    ------
    ValueError
        When the name is not registered, the module cannot be imported, or the
        attribute is not a LoRAStrategy subclass.
    """
    if ":" not in name:
        if name not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}, or an import "
                "path 'package.module:ClassName' of a LoRAStrategy subclass"
            )
        return STRATEGIES[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"strategy {name!r}: cannot import {module_name!r} ({err}); the module must be "
            "importable by the ServerApp and every ClientApp (e.g. a .py file in the app "
            "directory)"
        ) from err
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, LoRAStrategy)):
        raise ValueError(f"strategy {name!r}: {attr!r} in {module_name} is not a LoRAStrategy")
    return cls


def resolved_class(values: Mapping[str, Any]) -> type[LoRAStrategy]:
    """The class ``strategy.name`` in a flat run config names (its form checked first).

    Raises
    ------
    ConfigError
        When the name is malformed, unknown or cannot be imported.
    """
    name = setting_of(StrategyConfig, "strategy.name").read(values)
    try:
        return strategy_class(name)
    except ValueError as err:
        raise ConfigError(f"run config 'strategy.name': {err}") from err


def parse_client_config(values: Mapping[str, Any]) -> RunConfig:
    """What a ClientApp parses: the run config with the strategy's own keys accepted
    (the client acts on the instructions in each message, not on the strategy)."""
    return parse_run_config(values, resolved_class(values).options)


def load_run_config(values: Mapping[str, Any]) -> RunConfig:
    """:func:`~haflq_flower.config.parse_run_config` with the strategy's own options
    (:attr:`LoRAStrategy.options`), then what depends on the strategy: its class (a name
    or an import path), ``blocks.precision="auto"`` resolved, whether it supports
    ``dp.mode``, and its own :meth:`LoRAStrategy.check_run_config`.

    Raises
    ------
    ConfigError
        With the setting, what is wrong and what to do.
    """
    cls = resolved_class(values)
    cfg = parse_run_config(values, cls.options)
    cfg = resolve_auto_blocks(cfg, cls.check_run_config)
    if cfg.dp.enabled and not cls.supports_dp:
        raise ConfigError(
            f"run config 'dp.mode={cfg.dp.mode}' needs a strategy whose aggregate is an "
            "average of the clients' updates (fedit, ffa-lora, fedsa-lora, haflq, "
            f"fedit-trunc); {cfg.strategy.name!r} is not (docs/privacy.md). Use one of "
            "those, or dp.mode=off."
        )
    cls.check_run_config(cfg)
    return cfg


def build_strategy(cfg: RunConfig) -> LoRAStrategy:
    """The strategy named by ``strategy.name``, built by its own
    :meth:`LoRAStrategy.from_run_config` with every knob from the run config."""
    return strategy_class(cfg.strategy.name).from_run_config(cfg)


__all__ = [
    "BlockPlanner",
    "ClientUpdate",
    "FedExLoRA",
    "FedIT",
    "FedITTruncated",
    "FedSALoRA",
    "FFALoRA",
    "FLoRA",
    "FlexLoRA",
    "HAFLQStrategy",
    "HetLoRA",
    "HeterogeneousLoRA",
    "LoRAFAIR",
    "LoRAStrategy",
    "ReplyError",
    "RoundStats",
    "STRATEGIES",
    "build_strategy",
    "load_run_config",
    "parse_client_config",
    "resolved_class",
    "strategy_class",
]
