"""Federated checkpoints: the server's whole state after a round, in one atomic file.

``<run dir>/checkpoint.npz`` is rewritten after every round (written to a temporary file,
then renamed, so a crash leaves either the previous or the new checkpoint, never half of
one). It holds the global adapter and head, whatever the strategy keeps between rounds
(:meth:`LoRAStrategy.state_dict`: component importance, profiles, block salience), the
RNG states of the server process, and the results so far. Only plain arrays and one JSON
document are stored: loading never unpickles anything.
"""

from __future__ import annotations

import json
import random
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .durable import write_npz_durably
from .results import _jsonable

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1
_META = "__meta__"
_GLOBAL = "global/"
_STRATEGY = "strategy/"
_TORCH_RNG = "rng/torch"

# Run-config keys that may change when a run is resumed; every other key must match the
# checkpoint, or the resumed run would not be the same experiment.
RESUMABLE_CHANGES = frozenset(
    {
        "num-server-rounds",
        "resume",
        "output.dir",
        "output.plots",
        "strategy.round-timeout",
        "model.cache-dir",
        "eval.batch-size",
    }
)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not belong to this run config."""


@dataclass
class Checkpoint:
    """Everything a run needs to continue after ``round``."""

    round: int
    config: dict[str, Any]
    global_state: OrderedDict[str, np.ndarray]
    strategy_meta: dict[str, Any]
    strategy_arrays: dict[str, np.ndarray]
    results: dict[str, Any]
    elapsed_s: float
    rng: dict[str, Any]


def capture_rng() -> tuple[dict[str, Any], np.ndarray]:
    """The server process's RNG states: python and numpy (JSON-able) and torch (bytes)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = {"version": version, "state": list(state), "gauss": gauss}
    npy = {
        "kind": kind,
        "keys": keys.tolist(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }
    return {"python": py, "numpy": npy}, torch.get_rng_state().numpy()


def restore_rng(rng: dict[str, Any], torch_state: np.ndarray) -> None:
    py, npy = rng["python"], rng["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state(
        (
            npy["kind"],
            np.asarray(npy["keys"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached"],
        )
    )
    torch.set_rng_state(torch.from_numpy(np.asarray(torch_state, dtype=np.uint8).copy()))


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    config: dict[str, Any],
    global_state: dict[str, np.ndarray],
    strategy_state: tuple[dict[str, Any], dict[str, np.ndarray]],
    results: dict[str, Any],
    elapsed_s: float,
) -> Path:
    """Atomically (re)write ``run_dir/checkpoint.npz``; returns its path."""
    strategy_meta, strategy_arrays = strategy_state
    rng, torch_rng = capture_rng()
    meta = {
        "version": FORMAT_VERSION,
        "round": server_round,
        "config": config,
        "global_keys": list(global_state),
        "strategy": strategy_meta,
        "results": results,
        "elapsed_s": elapsed_s,
        "rng": rng,
    }
    arrays: dict[str, np.ndarray] = {
        _META: np.frombuffer(json.dumps(_jsonable(meta)).encode(), dtype=np.uint8),
        _TORCH_RNG: torch_rng,
    }
    arrays.update({_GLOBAL + k: np.asarray(v) for k, v in global_state.items()})
    arrays.update({_STRATEGY + k: np.asarray(v) for k, v in strategy_arrays.items()})
    return write_npz_durably(run_dir / CHECKPOINT_NAME, arrays)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read ``run_dir/checkpoint.npz``.

    Raises
    ------
    CheckpointError
        If there is no checkpoint or it cannot be read.
    """
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: 'resume' must name the directory of a run that "
            "finished at least one round (its results.json sits next to checkpoint.npz)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop(_META).tobytes().decode())
        if meta.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"format version {meta.get('version')!r}, expected 1")
        global_state = OrderedDict((k, arrays[_GLOBAL + k]) for k in meta["global_keys"])
        strategy_arrays = {
            k[len(_STRATEGY) :]: v for k, v in arrays.items() if k.startswith(_STRATEGY)
        }
        return Checkpoint(
            round=int(meta["round"]),
            config=meta["config"],
            global_state=global_state,
            strategy_meta=meta["strategy"],
            strategy_arrays=strategy_arrays,
            results=meta["results"],
            elapsed_s=float(meta["elapsed_s"]),
            rng={**meta["rng"], "torch": arrays[_TORCH_RNG]},
        )
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from err
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
            "start a fresh run (resume=\"\") or point 'resume' at another run directory"
        ) from err


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a checkpoint's config and the current one,
    ignoring :data:`RESUMABLE_CHANGES`."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    )
