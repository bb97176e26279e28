"""Run the app with ``flwr run`` against a private, short-lived simulation SuperLink.

``flwr run .`` on its own talks to a machine-wide local SuperLink (127.0.0.1:39091) that
outlives the command, is shared by every process on the machine, and by default
re-installs the app's dependencies for every run. This launcher instead:

1. creates its own ``FLWR_HOME`` with one connection, ``haflq``;
2. starts ``flower-superlink --simulation`` on a free port on 127.0.0.1, with runtime
   dependency installation disabled (the app runs in this environment);
3. calls ``flwr run <app> haflq --stream`` with the federation and run config given;
4. asks the SuperLink for the run's final status (``flwr run --stream`` exits 0 even when
   the run failed) and exits non-zero unless the run completed *and* applied at least one
   update (``final.status`` in results.json);
5. stops the SuperLink by PID, prints the run's report and the directory that holds
   the results.

Before any of this it parses the run config as the apps will (a wrong value stops it at
once) and draws the clients' data partitions (too many partitions for the data, or a
Dirichlet split that cannot be drawn, stop it with the keys to change). The streamed log
goes through :class:`~haflq_flower.logs.NoiseFilter` (third-party notices explained once).

Usage::

    python -m haflq_flower.launch --num-supernodes 6 --run-config "num-server-rounds=3"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .logs import NoiseFilter

CONNECTION = "haflq"
DEFAULT_SUPERNODES = 6


class LaunchError(ValueError):
    """The launcher's arguments cannot give a run; the message says what to change."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """The console script next to this interpreter (venv), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"error: '{name}' not found; install the project first (make install)")
    return found


@dataclass
class SuperLink:
    """A simulation SuperLink process owned by this launcher."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the SuperLink's process group and every process it started: the
        SuperExec and ``flwr-simulation`` (with Ray) run in sessions of their own, and an
        interrupted run would leave them behind."""
        children = _descendants(self.process.pid)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        _terminate(children)


def _descendants(pid: int) -> list:
    """The processes started (directly or not) by ``pid``, as psutil handles."""
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        return []


def _terminate(processes: list, timeout: float = 10.0) -> None:
    """SIGTERM the given processes that still run, then SIGKILL what is left."""
    if not processes:
        return
    import psutil

    alive = []
    for proc in processes:
        try:
            proc.terminate()
            alive.append(proc)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=timeout)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass


def flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The SuperLink spawns flower-superexec, flwr-simulation, ... by name: put this
    # environment's scripts first on PATH even when the venv is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def write_connection(flwr_home: Path, address: str) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )


def spawn(cmd: list[str], flwr_home: Path, log_path: Path) -> subprocess.Popen:
    """Start a Flower process with its own ``FLWR_HOME`` (also its working directory),
    output appended to ``log_path``, in its own process group (stopping the group
    takes its children too)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            cmd,
            env=flwr_env(flwr_home),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=flwr_home,
            start_new_session=True,
        )


def start_superlink(flwr_home: Path, startup_timeout: float = 60.0) -> SuperLink:
    port = free_port()
    log_path = flwr_home / "superlink.log"
    flwr_home.mkdir(parents=True, exist_ok=True)
    cmd = [
        _bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    process = spawn(cmd, flwr_home, log_path)
    link = SuperLink(process, port, log_path)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"error: flower-superlink exited with code {process.returncode}; "
                f"log:\n{log_path.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://{link.address}/health", timeout=1) as resp:
                if resp.status == 200:
                    write_connection(flwr_home, link.address)
                    return link
        except OSError:
            pass
        time.sleep(0.3)
    link.stop()
    raise SystemExit(f"error: flower-superlink did not become healthy in {startup_timeout:.0f}s")


def run_status(flwr_home: Path, run_id: int, connection: str = CONNECTION) -> str:
    """The run's status string as the SuperLink reports it (e.g. 'finished:completed')."""
    out = subprocess.run(
        [_bin("flwr"), "list", connection, "--run-id", str(run_id), "--format", "json"],
        env=flwr_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        data = json.loads(out.stdout)
        return str(data["runs"][0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip()[-500:]} {out.stderr.strip()[-500:]})"


def stream_run(
    flwr_home: Path, cmd: list[str], timeout: float, connection: str = CONNECTION
) -> tuple[int | None, str]:
    """Run ``flwr run ... --stream`` with its logs on stdout, then return (run id, final
    status): ``flwr run --stream`` exits 0 even when the run failed."""
    print("+", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(
        cmd,
        env=flwr_env(flwr_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    run_id = None
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    noise = NoiseFilter()
    for line in proc.stdout:
        for out in noise.feed(line):
            sys.stdout.write(out)
        match = re.search(r"Successfully started run (\d+)", line)
        if match:
            run_id = int(match.group(1))
        if time.monotonic() > deadline:
            proc.kill()
            print(f"error: run exceeded {timeout:.0f}s; stopped", file=sys.stderr)
            break
    proc.wait()
    if run_id is None:
        return None, f"not started (flwr run exited with {proc.returncode})"
    status = run_status(flwr_home, run_id, connection)
    for _ in range(40):  # the stream can end a moment before the status is final
        if status.startswith("finished"):
            break
        time.sleep(0.5)
        status = run_status(flwr_home, run_id, connection)
    return run_id, status


def run_app(
    app_dir: Path,
    flwr_home: Path,
    num_supernodes: int,
    run_config: list[str],
    client_cpus: int,
    client_gpus: float,
    timeout: float,
) -> tuple[int | None, str]:
    """Start a SuperLink, ``flwr run --stream``, wait, return (run id, final status)."""
    link = start_superlink(flwr_home)
    try:
        fed = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus} "
            f"client-resources-num-gpus={client_gpus}"
        )
        cmd = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        cmd += ["--federation-config", fed]
        for item in run_config:
            cmd += ["--run-config", item]
        return stream_run(flwr_home, cmd, timeout)
    finally:
        link.stop()


def given_run_config(items: list[str]) -> dict[str, Any]:
    """The run-config overrides as Flower will parse them (``--run-config`` items)."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args(items))
    except Exception as err:  # click.ClickException, tomli errors, ValueError
        raise LaunchError(f"--run-config cannot be parsed: {err}") from err


def declared_keys(app_dir: Path) -> set[str]:
    """The run-config keys the app declares (``[tool.flwr.app.config]`` of its
    pyproject.toml, nested tables joined by dots, as Flower flattens them)."""
    import tomllib

    def flatten(prefix: str, table: dict) -> set[str]:
        keys = set()
        for key, value in table.items():
            full = f"{prefix}.{key}" if prefix else key
            keys |= flatten(full, value) if isinstance(value, dict) else {full}
        return keys

    try:
        pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise LaunchError(f"cannot read {app_dir / 'pyproject.toml'}: {err}") from err
    return flatten("", pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def check_declared(given: dict[str, Any], app_dir: Path) -> None:
    """`flwr run` accepts only run-config keys the app declares: say which are not, and
    where to declare them, before a SuperLink starts (Flower says only "Invalid run
    configuration")."""
    missing = sorted(set(given) - declared_keys(app_dir))
    if missing:
        raise LaunchError(
            f"run config key(s) {', '.join(missing)} not declared in "
            f"{app_dir / 'pyproject.toml'} [tool.flwr.app.config]; `flwr run` accepts only "
            "declared keys. Check the spelling, or declare a strategy's own key there with "
            "its default (docs/extending.md)."
        )


def resolve_output_dir(given: dict[str, Any], flag: str | None, default: Path) -> Path:
    """The run directory: ``output.dir`` (or ``resume``) from the run config, else
    ``--output-dir``, else ``default``; absolute.

    Raises
    ------
    LaunchError
        When ``output.dir`` is relative (the apps do not run in this directory: use
        ``--output-dir``, which may be relative), or when it and ``--output-dir`` (or
        ``resume``) name different directories.
    """
    candidates = {}
    for key in ("output.dir", "resume"):
        value = str(given.get(key) or "").strip()
        if value:
            path = Path(value).expanduser()
            if not path.is_absolute():
                raise LaunchError(
                    f"run config '{key}' must be an absolute path, got {value!r}; use "
                    f"--output-dir {value} instead (the launcher makes it absolute)"
                    if key == "output.dir"
                    else f"run config 'resume' must be an absolute path, got {value!r}"
                )
            candidates[key] = path
    if flag:
        candidates["--output-dir"] = Path(flag).expanduser().resolve()
    if len(set(candidates.values())) > 1:
        named = ", ".join(f"{k}={v}" for k, v in candidates.items())
        raise LaunchError(
            f"the run directory is given more than once and differs ({named}); give it once, "
            "with --output-dir (a resumed run writes into the directory it resumes)"
        )
    if candidates:
        return next(iter(candidates.values()))
    return default.expanduser().resolve()


def preflight(given: dict[str, Any], num_supernodes: int) -> None:
    """Check what would make every client fail, before a SuperLink starts: the run
    config (as the apps parse it) and the clients' data partitions.

    Raises
    ------
    LaunchError
        With the key(s) and what to change.
    """
    from .config import ConfigError
    from .data import DataLoadError, check_partitions
    from .strategy import load_run_config

    try:
        cfg = load_run_config(given)
    except ConfigError as err:
        raise LaunchError(str(err)) from err
    try:
        check_partitions(cfg.data, num_supernodes)
    except DataLoadError as err:
        raise LaunchError(str(err)) from err


def read_final(output_dir: Path) -> dict[str, Any] | None:
    """``final`` of the run's results.json (``None`` if the run wrote none)."""
    try:
        return json.loads((output_dir / "results.json").read_text()).get("final")
    except (OSError, json.JSONDecodeError):
        return None


def exit_code(flower_status: str, final: dict[str, Any] | None) -> tuple[int, str]:
    """The launcher's exit code and a one-line verdict, from the SuperLink's run status
    and results.json's ``final`` block: 0 only when the run completed, wrote its final
    results and applied at least one update."""
    from .report import STATUS_COMPLETED

    if flower_status != "finished:completed":
        return 1, f"the run ended with status '{flower_status}'"
    if final is None:
        return 1, "the run completed but wrote no final results (results.json has no 'final')"
    status = final.get("status", STATUS_COMPLETED)
    if status != STATUS_COMPLETED:
        return 1, f"results.json says '{status}': {final.get('status_reason', '')}"
    return 0, "completed"


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default=".", help="Flower app directory (default: .)")
    parser.add_argument(
        "--num-supernodes",
        type=int,
        default=DEFAULT_SUPERNODES,
        help=f"simulated clients (default: {DEFAULT_SUPERNODES}; partition ids fall in the tiers)",
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        help='run-config overrides, e.g. "num-server-rounds=5 lora.rank=16" (repeatable)',
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="run outputs (default: ./outputs/run-<time>; made absolute; output.dir in "
        "--run-config, which must be absolute, works too)",
    )
    parser.add_argument("--flwr-home", default=None, help="default: a fresh temporary dir")
    parser.add_argument("--client-cpus", type=int, default=2)
    parser.add_argument(
        "--client-gpus",
        type=float,
        default=None,
        help="GPU share per simulated client (default: 0.5 when CUDA is present, else 0)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="run the simulation on an existing Ray cluster (e.g. 10.0.0.1:6379, as "
        "printed by `ray start --head`) instead of a private one; the environment "
        "variable RAY_ADDRESS does the same",
    )
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds for the run")
    return parser


def _checked_inputs(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The run directory and the ``--run-config`` list the apps will see, after the
    start-up checks (:func:`preflight`).

    Raises
    ------
    LaunchError
        With what is wrong and what to change.
    """
    app_dir = Path(args.app).resolve()
    if not (app_dir / "pyproject.toml").exists():
        raise LaunchError(f"{app_dir} is not a Flower app (no pyproject.toml)")
    if args.num_supernodes < 1:
        raise LaunchError("--num-supernodes must be >= 1")
    given = given_run_config(args.run_config)
    check_declared(given, app_dir)
    output_dir = resolve_output_dir(
        given, args.output_dir, Path("outputs") / time.strftime("run-%Y%m%d-%H%M%S")
    )
    if not str(given.get("resume") or "").strip():
        given["output.dir"] = str(output_dir)
    preflight(given, args.num_supernodes)
    run_config = list(args.run_config)
    if "output.dir" in given:  # last, so it is what the apps see
        run_config.append(f"output.dir={json.dumps(str(output_dir))}")
    return output_dir, run_config


def _client_gpus(share: float | None) -> float:
    """``--client-gpus``, or 0.5 of a GPU per client when CUDA is present, else 0."""
    if share is not None:
        return share
    import torch

    return 0.5 if torch.cuda.is_available() else 0.0


def _print_outcome(run_id: Any, status: str, output_dir: Path, elapsed: float) -> int:
    """The report, then the verdict; returns the exit code (:func:`exit_code`)."""
    final = read_final(output_dir)
    code, verdict = exit_code(status, final)
    report = output_dir / "report.md"
    if report.exists():
        print("\n" + report.read_text(), flush=True)
    if code:
        print(f"error: run {run_id}: {verdict} after {elapsed:.0f}s", file=sys.stderr)
        where = "Partial results" if output_dir.exists() else "No results were written; expected"
        print(f"{where}: {output_dir}", flush=True)
        return code
    print(
        f"Run {run_id} completed in {elapsed:.0f}s: final test accuracy "
        f"{final.get('accuracy')}, uplink {final.get('bytes_up')} B, adapter in "
        f"{final.get('adapter_dir')}"
    )
    print(f"Results: {output_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        output_dir, run_config = _checked_inputs(args)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gpus = _client_gpus(args.client_gpus)
    if args.ray_address:
        # Flower's Ray backend calls ray.init() without an address in the simulation
        # process the SuperLink starts; Ray then joins the cluster RAY_ADDRESS names
        os.environ["RAY_ADDRESS"] = args.ray_address
    if os.environ.get("RAY_ADDRESS"):
        print(f"Simulation on the Ray cluster at {os.environ['RAY_ADDRESS']}", flush=True)

    # `kill <launcher>` (SIGTERM) unwinds like Ctrl-C: the SuperLink and everything it
    # started are stopped by the finally blocks below
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    print(f"Results will be in {output_dir}", flush=True)
    own_home = args.flwr_home is None
    flwr_home = Path(args.flwr_home or tempfile.mkdtemp(prefix="haflq-flwr-home-")).resolve()
    start = time.perf_counter()
    try:
        run_id, status = run_app(
            Path(args.app).resolve(),
            flwr_home,
            args.num_supernodes,
            run_config,
            args.client_cpus,
            gpus,
            args.timeout,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        if own_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
    return _print_outcome(run_id, status, output_dir, time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
