"""Kill a run mid-way (SIGKILL, not a polite stop), resume it, and get the uninterrupted
run's adapter and results exactly (fixed seeds, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from haflq_flower.checkpoint import CheckpointError, load_checkpoint

from .conftest import TINY

# starts real processes (SuperLink, SuperNodes, Ray): `pytest -m "not slow"` skips it
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Per client and round: everything but timings and memory, which are measurements.
CLIENT_FIELDS = ("partition", "tier", "rank", "num_examples", "bytes_up", "bytes_down")
CLIENT_FIELDS += ("train_loss", "components_up", "budget_bytes", "payload_bytes", "bits")
CLIENT_FIELDS += ("status",)
ROUND_FIELDS = ("round", "accuracy", "loss", "bytes_up", "bytes_down", "rejected", "update")


def _child(overrides: dict, num_clients: int) -> subprocess.Popen:
    """One in-process simulation in its own process group (Ray's processes included)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.sim_child", json.dumps(overrides), str(num_clients)],
        cwd=ROOT,
        env=os.environ.copy(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _comparable(results: dict) -> list[dict]:
    out = []
    for r in results["rounds"]:
        row = {k: r.get(k) for k in ROUND_FIELDS}
        clients = sorted(r["clients"], key=lambda c: c["partition"])
        row["clients"] = [{k: c.get(k) for k in CLIENT_FIELDS} for c in clients]
        out.append(row)
    return out


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return load_checkpoint(run_dir).round
    except CheckpointError:
        return -1


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    base = {**TINY, "num-server-rounds": 3, "strategy.name": "haflq"}
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"

    _finish(_child({**base, "output.dir": str(full_dir)}, 2))

    proc = _child({**base, "output.dir": str(killed_dir)}, 2)
    deadline = time.monotonic() + 600
    while _checkpoint_round(killed_dir) < 1:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_round(killed_dir)
    assert 1 <= killed_at < 3, "the run was not killed mid-way"
    assert (killed_dir / "results.json").exists()
    assert not (killed_dir / "adapter").exists()

    _finish(_child({**base, "resume": str(killed_dir)}, 2))

    full = json.loads((full_dir / "results.json").read_text())
    resumed = json.loads((killed_dir / "results.json").read_text())
    assert resumed["resumed_after"] == [killed_at]
    assert _comparable(resumed) == _comparable(full)
    assert resumed["final"]["accuracy"] == full["final"]["accuracy"]
    a = load_file(full_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(killed_dir / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the checkpoint's strategy state is the uninterrupted run's, too
    ca, cb = load_checkpoint(full_dir), load_checkpoint(killed_dir)
    assert ca.round == cb.round == 3
    assert sorted(ca.strategy_arrays) == sorted(cb.strategy_arrays)
    for key, value in ca.strategy_arrays.items():
        np.testing.assert_array_equal(value, cb.strategy_arrays[key], err_msg=key)


@pytest.mark.parametrize(
    "change, message",
    [({"lora.rank": 4}, "lora.rank"), ({"num-server-rounds": 1}, "beyond num-server-rounds")],
)
def test_resume_refuses_a_different_experiment(tmp_path, change, message):
    from haflq_flower.checkpoint import save_checkpoint
    from haflq_flower.config import ConfigError, parse_run_config
    from haflq_flower.server_app import _resume

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = parse_run_config({**TINY, "output.dir": str(run_dir)})
    results = {"rounds": [{"round": 2, "accuracy": 0.5}]}
    state = {"x": np.zeros(2, np.float32)}
    save_checkpoint(run_dir, 2, cfg.to_dict(), state, ({}, {}), results, 1.0)
    ok = parse_run_config({**TINY, "resume": str(run_dir), "num-server-rounds": 5})
    assert _resume(ok, state).round == 2 and ok.output_dir == run_dir
    with pytest.raises(CheckpointError, match="does not fit"):
        _resume(ok, {"x": np.zeros(3, np.float32)})
    with pytest.raises(ConfigError, match=message):
        _resume(parse_run_config({**TINY, **change, "resume": str(run_dir)}), state)
