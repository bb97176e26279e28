"""Federated LoRA strategies: the extendable base and the methods built on it."""

from .base import ClientUpdate, LoRAStrategy, RoundStats
from .fedit import FedIT

STRATEGIES = {"fedit": FedIT}

__all__ = ["ClientUpdate", "FedIT", "LoRAStrategy", "RoundStats", "STRATEGIES"]
