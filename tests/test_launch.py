"""The launcher's decisions without a SuperLink: the run directory, start-up checks, the
exit code, and the filter of third-party noise in the streamed log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from haflq_flower import launch
from haflq_flower.data import DataLoadError, partition_indices
from haflq_flower.launch import LaunchError, exit_code, given_run_config, resolve_output_dir
from haflq_flower.logs import NoiseFilter

from .conftest import TINY

DEFAULT = Path("outputs/run-x")


def test_output_dir_from_the_run_config_is_honoured(tmp_path):
    given = given_run_config([f'num-server-rounds=2 output.dir="{tmp_path}/a"'])
    assert resolve_output_dir(given, None, DEFAULT) == tmp_path / "a"
    # the same directory twice is fine; the flag may be relative
    assert resolve_output_dir(given, str(tmp_path / "a"), DEFAULT) == tmp_path / "a"
    assert resolve_output_dir({}, None, DEFAULT) == DEFAULT.resolve()
    assert resolve_output_dir({}, "rel/dir", DEFAULT) == Path("rel/dir").resolve()


def test_output_dir_conflicts_and_relative_paths_are_refused(tmp_path):
    with pytest.raises(LaunchError, match="--output-dir"):
        resolve_output_dir({"output.dir": "relative/run"}, None, DEFAULT)
    with pytest.raises(LaunchError, match="differs"):
        resolve_output_dir({"output.dir": str(tmp_path / "a")}, str(tmp_path / "b"), DEFAULT)
    # a resumed run writes into the directory it resumes
    assert resolve_output_dir({"resume": str(tmp_path / "r")}, None, DEFAULT) == tmp_path / "r"
    with pytest.raises(LaunchError, match="resume"):
        resolve_output_dir({"resume": str(tmp_path / "r")}, str(tmp_path / "b"), DEFAULT)


def test_exit_code_needs_a_completed_run_with_an_applied_update():
    assert exit_code("finished:completed", {"status": "completed"}) == (0, "completed")
    assert exit_code("finished:failed", {"status": "completed"})[0] == 1
    assert exit_code("finished:completed", None)[0] == 1
    code, verdict = exit_code(
        "finished:completed", {"status": "no-update-applied", "status_reason": "why"}
    )
    assert code == 1 and "no-update-applied" in verdict and "why" in verdict


def _main(tmp_path, *args: str) -> int:
    return launch.main(
        ["--flwr-home", str(tmp_path / "home"), "--output-dir", str(tmp_path / "run"), *args]
    )


def _tiny_config(**extra) -> str:
    items = {**TINY, **extra}
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in items.items())


def test_too_many_partitions_fail_at_start_up(tmp_path, capsys):
    """1,000 clients for 400 rows: refused before a SuperLink starts, with what to change."""
    code = _main(tmp_path, "--num-supernodes", "1000", "--run-config", _tiny_config())
    err = capsys.readouterr().err
    assert code == 2
    assert "1000 client partitions of 400 training rows" in err and "--num-supernodes" in err
    assert not (tmp_path / "home").exists()  # no SuperLink was started


def test_an_impossible_dirichlet_split_fails_at_start_up(tmp_path, capsys):
    """The issue's case: Dirichlet(0.5) over labels cannot give 300 clients of 400 rows
    (1.3 rows each) a row each; flwr-datasets gives up after 10 draws."""
    config = _tiny_config(**{"data.partitioner": "dirichlet"})
    code = _main(tmp_path, "--num-supernodes", "300", "--run-config", config)
    err = capsys.readouterr().err
    assert code == 2
    for key in ("data.partitioner='dirichlet'", "data.dirichlet-alpha", "--num-supernodes"):
        assert key in err
    assert not (tmp_path / "home").exists()


def test_a_wrong_run_config_value_fails_at_start_up(tmp_path, capsys):
    code = _main(tmp_path, "--run-config", _tiny_config(**{"model.quantization": "3bit"}))
    assert code == 2 and "model.quantization" in capsys.readouterr().err


def test_a_key_the_app_does_not_declare_fails_at_start_up(tmp_path, capsys):
    """`flwr run` takes only keys of the app's pyproject: the launcher names the key and
    where to declare it (Flower would say only "Invalid run configuration")."""
    code = _main(tmp_path, "--run-config", _tiny_config(**{"round-robin.offset": 1}))
    err = capsys.readouterr().err
    assert code == 2
    assert "round-robin.offset not declared in" in err and "[tool.flwr.app.config]" in err
    assert not (tmp_path / "home").exists()
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        "[tool.flwr.app.config]\nseed = 0\n\n[tool.flwr.app.config.round-robin]\noffset = 0\n"
    )
    assert launch.declared_keys(app) == {"seed", "round-robin.offset"}


def test_dirichlet_error_names_the_keys():
    labels = np.array([i % 2 for i in range(12_500)])
    with pytest.raises(DataLoadError) as err:
        partition_indices(labels, 1000, "dirichlet", 0.5, seed=0)
    assert "data.dirichlet-alpha=0.5" in str(err.value) and "data.partitioner='iid'" in str(
        err.value
    )


CAPTURED = """\
\x1b[92mINFO \x1b[0m:      Starting Flower Simulation
\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.
\x1b[92mINFO \x1b[0m:      Federation `@none/default` (6 simulated SuperNodes)
\x1b[92mINFO \x1b[0m:      To change federation size, use the following command:
\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default <superlink> ...
/x/torch/jit/_script.py:365: DeprecationWarning: `torch.jit.script_method` is deprecated.
  warnings.warn(
INFO haflq Run config: {...}
\x1b[36m(ClientAppActor pid=4221)\x1b[0m /x/transformers/modeling_utils.py:3312: FutureWarning: x
\x1b[36m(ClientAppActor pid=4221)\x1b[0m   warnings.warn(
Failed to load CPU gemm_4bit_forward from kernels-community: offline. Please make sure ...
LlamaForSequenceClassification LOAD REPORT from: /cache/smollm2
Key          | Status  |
-------------+---------+-
score.weight | MISSING |

Notes:
- MISSING:\tthose params were newly initialized because missing from the checkpoint.
INFO haflq [round 1/3] accuracy 0.7000 loss 0.5000 | up 1 MB down 2 MB
\x1b[36m(ClientAppActor pid=4221)\x1b[0m /x/transformers/modeling_utils.py:3312: FutureWarning: y
\x1b[36m(ClientAppActor pid=4221)\x1b[0m   warnings.warn(
INFO haflq client 3 round 1: step 8/8
"""


def test_noise_filter_keeps_progress_and_explains_each_kind_once():
    noise = NoiseFilter()
    out = "".join(line for raw in CAPTURED.splitlines(True) for line in noise.feed(raw))
    kept = out.splitlines()
    assert "INFO haflq Run config: {...}" in kept
    assert "INFO haflq [round 1/3] accuracy 0.7000 loss 0.5000 | up 1 MB down 2 MB" in kept
    assert "INFO haflq client 3 round 1: step 8/8" in kept
    assert any("Federation `@none/default` (6 simulated SuperNodes)" in k for k in kept)
    notes = [k for k in kept if k.startswith("(note)")]
    rest = "\n".join(k for k in kept if not k.startswith("(note)"))
    for noise_text in ("Deprecation", "FutureWarning", "warnings.warn", "gemm_4bit", "MISSING"):
        assert noise_text not in rest
    assert len(notes) == 4  # flwr hint, python warnings, bnb kernel, load report: once each
    assert noise.dropped["python-warning"] == 6  # 3 warnings, each with its source line
