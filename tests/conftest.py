"""Shared fixtures: a private model cache, Flower task identity, the tiny model."""

from __future__ import annotations

import os

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from haflq_flower.strategy import load_run_config


@pytest.fixture(scope="session", autouse=True)
def _private_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Converted models and run outputs go to temporary dirs, never the user's cache."""
    os.environ["HAFLQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HAFLQ_OUTPUT_DIR"] = str(tmp_path_factory.mktemp("runs"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages built outside a Flower runtime need a task identity (flwr >= 1.38)."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


TINY = {
    "model.name": "tiny",
    # the tests were written against these (pre-issue-19) defaults; `make run`'s own
    # default is HAFLQ on a Dirichlet split (pyproject.toml)
    "strategy.name": "fedit",
    "data.partitioner": "iid",
    "train.head-learning-rate": 2e-3,
    "train.learning-rate": 5e-4,
    "data.template": "",
    "data.test-per-class": 20,
    "data.max-train-examples": 400,
    "train.local-steps": 3,
    "num-server-rounds": 2,
}


@pytest.fixture
def tiny_config():
    """A parsed run config for the tiny model (overridable per test)."""

    def make(**overrides):
        return load_run_config(
            {**TINY, **{k.replace("__", ".").replace("_", "-"): v for k, v in overrides.items()}}
        )

    return make


def launch_tiny(out, config: dict, num_supernodes: int = 2, *extra: str) -> int:
    """The real launcher (`flwr run` on a private SuperLink, Ray simulation) on this app
    with ``config`` as the run config, one CPU per client; returns its exit code."""
    from pathlib import Path

    from haflq_flower import compare, launch

    app = Path(__file__).resolve().parents[1]
    argv = ["--app", str(app), "--num-supernodes", str(num_supernodes), "--client-cpus", "1"]
    argv += ["--output-dir", str(out), "--run-config", compare.config_string(config)]
    return launch.main([*argv, "--timeout", "600", *extra])
