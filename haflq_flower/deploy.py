"""A real local deployment: SuperLink and SuperNodes with TLS and SuperNode authentication.

What a user does on real devices, scripted on 127.0.0.1 (free ports) so that it can be
tested:

1. a self-signed CA and a server certificate for 127.0.0.1/localhost (``certs/``);
2. an ECDSA P-384 key pair per SuperNode (``keys/``, OpenSSH format, which Flower needs);
3. ``flower-superlink`` with TLS and ``--enable-supernode-auth``;
4. the CLI connection (``root-certificates``) and ``flwr supernode register`` per public key;
5. one ``flower-supernode`` per profile, each with its private key and its
   ``--node-config`` (its device profile: tier, LoRA rank, memory, uplink, data partition);
6. ``flwr run <app> deploy --stream``, then the run's final status from ``flwr list``;
7. every process it started is stopped by PID (process group), also on errors.

The SuperLink binds to 127.0.0.1 only. In Flower 1.42 its one port serves the Fleet API
(SuperNodes), the Control API (``flwr run``, ``flwr supernode register``) and the runtime
API, and open-source Flower has no Control API authentication: whoever reaches the port can
register SuperNode keys (undoing ``--enable-supernode-auth``) or run their own app on every
device. :func:`check_bind_host` refuses any other address unless the caller says the port
is protected, and ``--make-credentials`` also writes ``fleet-proxy.nginx.conf``
(:func:`fleet_proxy_config`): a TLS reverse proxy that exposes only ``/v1/fleet/`` and
``/health`` on the public address (docs/deployment.md). Private keys are created with mode
0600 (never readable by others, not even briefly).

Optional, for tests and demonstrations: ``--unregistered`` starts one more SuperNode whose
key was never registered (the SuperLink must refuse it), and ``--kill-node I
--kill-after-round R`` kills SuperNode I (SIGKILL) once round R is in ``results.json``.

Usage::

    python -m haflq_flower.deploy --workdir "$(mktemp -d)" \\
        --node 'tier="low" lora-rank=2' --node 'tier="high" lora-rank=8' \\
        --run-config 'strategy.name="haflq" num-server-rounds=2'
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .launch import _bin, flwr_env, free_port, spawn, stream_run

CONNECTION = "deploy"
COMPLETED = "finished:completed"


# ------------------------------------------------------------------ credentials
def make_certificates(
    out: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate valid for ``hosts`` (IP addresses or DNS
    names: every address the SuperNodes and the CLI dial). Valid for 30 days.

    Returns (ca.crt, server.pem, server.key).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=30))

    def write_key(path: Path, key) -> None:
        write_private(
            path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haflq-flower local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (out / "ca.crt", out / "server.pem", out / "server.key")
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(paths[2], server_key)
    write_key(out / "ca.key", ca_key)
    return paths


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, from the first byte: the file is
    created with mode 0600 (``os.open``; the umask can only remove bits), an existing
    one is set to 0600 before it is truncated, and a symlink in its place is refused."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_bind_host(host: str, control_protected: bool = False) -> None:
    """Refuse to bind the SuperLink to a non-loopback address unless the caller says
    that address is protected.

    In Flower 1.42 the SuperLink's one port also serves the Control API, which has no
    authentication in open-source Flower (``FLWR_OIDC_ENABLED`` needs Flower's enterprise
    plugin): anyone who reaches it can register SuperNode keys or start runs.

    Raises
    ------
    ValueError
        For a non-loopback ``host`` without ``control_protected``, saying what to do.
    """
    if host in LOOPBACK or control_protected:
        return
    raise ValueError(
        f"the SuperLink would serve its unauthenticated Control API on {host}: bind it to "
        "127.0.0.1 and expose only the Fleet API through a reverse proxy "
        "(fleet-proxy.nginx.conf from --make-credentials, docs/deployment.md), or put the "
        "port behind a VPN/firewall that admits only your devices and operators and pass "
        "control_protected=True"
    )


def fleet_proxy_config(
    server_name: str,
    listen_port: int,
    superlink_port: int,
    certs: Path,
) -> str:
    """An nginx server block that exposes only the SuperLink's Fleet API.

    TLS is terminated with the SuperLink's own certificate (``certs/server.pem``), and
    requests are forwarded over TLS, verified against ``certs/ca.crt``, to the SuperLink
    on ``127.0.0.1:superlink_port``. Only ``/v1/fleet/`` (SuperNodes; their signature
    headers pass through, so ``--enable-supernode-auth`` still applies) and ``/health``
    are forwarded; the Control API (``/v1/control/``), the runtime API (``/v1/runtime/``)
    and everything else get 403. Operators run ``flwr`` on the server itself or through
    an SSH tunnel to 127.0.0.1.
    """
    upstream = f"https://127.0.0.1:{superlink_port}"
    certs = certs.resolve()
    return f"""# Generated by haflq_flower.deploy: the Fleet API only (docs/deployment.md).
server {{
    listen {listen_port} ssl;
    server_name {server_name};
    ssl_certificate {certs / "server.pem"};
    ssl_certificate_key {certs / "server.key"};
    client_max_body_size 512m;   # messages carry the adapter
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;

    location /v1/fleet/ {{
        proxy_pass {upstream};
        proxy_http_version 1.1;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {certs / "ca.crt"};
        proxy_ssl_name localhost;
        proxy_set_header Host $host;
    }}
    location = /health {{
        proxy_pass {upstream};
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {certs / "ca.crt"};
        proxy_ssl_name localhost;
    }}
    location / {{
        return 403;   # Control API, runtime API, /docs: never from the network
    }}
}}
"""


def make_supernode_key(out: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair for SuperNode authentication: (private key, public key).

    Flower reads the private key in OpenSSH format only (a PKCS8 PEM key is refused).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


# -------------------------------------------------------------------- processes
@dataclass
class Proc:
    """A process this script started, in its own process group."""

    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 20.0) -> None:
        if not self.alive():
            return
        self.kill(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.popen.wait(timeout=10)


@dataclass
class Deployment:
    """The processes and files of one local deployment under ``workdir``."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    ca: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def cli_home(self) -> Path:
        return self.workdir / "cli"

    def _start(self, name: str, cmd: list[str], home: Path) -> Proc:
        log = self.workdir / f"{name}.log"
        proc = Proc(name, spawn(cmd, home, log), log)
        self.procs.append(proc)
        return proc

    def start_superlink(
        self, timeout: float = 90.0, host: str = "127.0.0.1", control_protected: bool = False
    ) -> Proc:
        """Start the SuperLink with TLS and SuperNode authentication on ``host`` (loopback
        unless ``control_protected``: see :func:`check_bind_host`)."""
        check_bind_host(host, control_protected)
        self.ca, cert, key = make_certificates(self.workdir / "certs")
        self.port = free_port()
        cmd = [_bin("flower-superlink"), "--ssl-ca-certfile", str(self.ca)]
        cmd += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        cmd += ["--enable-supernode-auth", "--disable-runtime-dependency-installation"]
        cmd += ["--host", host, "--port", str(self.port)]
        cmd += ["--database", str(self.workdir / "superlink" / "state.db")]
        proc = self._start("superlink", cmd, self.workdir / "superlink")
        context = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"flower-superlink exited; log:\n{proc.log.read_text()[-3000:]}")
            try:
                url = f"https://{self.address}/health"
                with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"flower-superlink not healthy after {timeout:.0f}s")
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.ca}"\n'
        )
        return proc

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_bin("flwr"), *args],
            env=flwr_env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register(self, public_key: Path) -> str:
        """``flwr supernode register``; returns the node id the SuperLink assigned."""
        out = self.cli("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        try:
            data = json.loads(out.stdout)
        except json.JSONDecodeError:
            data = {}
        if not data.get("success"):  # --format json exits 0 even on failure
            raise RuntimeError(f"registering {public_key} failed: {out.stdout}{out.stderr}")
        return str(data["node-id"])

    def start_supernode(self, name: str, private_key: Path, node_config: str) -> Proc:
        cmd = [_bin("flower-supernode"), "--superlink", self.address]
        cmd += ["--root-certificates", str(self.ca), "--auth-supernode-private-key"]
        cmd += [str(private_key), "--node-config", node_config]
        cmd += ["--host", "127.0.0.1", "--port", str(free_port())]
        return self._start(name, cmd, self.workdir / name)

    def run(self, app_dir: Path, run_config: list[str], timeout: float) -> tuple[int | None, str]:
        """``flwr run --stream`` (logs to stdout); returns (run id, final status)."""
        cmd = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        for item in run_config:
            cmd += ["--run-config", item]
        return stream_run(self.cli_home, cmd, timeout, CONNECTION)

    def stop(self) -> None:
        """Stop SuperNodes first, then the SuperLink (each with its process group)."""
        for proc in reversed(self.procs):
            proc.stop()


def _plaintext_refused(address: str) -> bool:
    """True when the SuperLink does not answer plain HTTP (it only speaks TLS)."""
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=5):
            return False
    except OSError:
        return True


def _wait_for_nodes(dep: Deployment, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = dep.cli("supernode", "list", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except json.JSONDecodeError:
            nodes = []
        if sum(1 for n in nodes if str(n.get("status", "")).lower() == "online") >= count:
            return
        time.sleep(1.0)
    raise RuntimeError(f"fewer than {count} SuperNodes online after {timeout:.0f}s")


def _kill_after_round(proc: Proc, results: Path, after_round: int, stop: threading.Event):
    """SIGKILL ``proc`` once ``results.json`` holds round ``after_round``."""
    while not stop.wait(0.5):
        try:
            rounds = json.loads(results.read_text())["rounds"]
        except (OSError, ValueError, KeyError):
            continue
        if any(r["round"] >= after_round for r in rounds):
            print(f"deploy: killing {proc.name} (SIGKILL) after round {after_round}", flush=True)
            proc.kill()
            return


@dataclass
class Report:
    run_id: int | None
    status: str
    node_ids: dict[str, str]
    refused: bool | None
    plaintext_refused: bool
    output_dir: Path
    seconds: float


def deploy(
    workdir: Path,
    node_configs: list[str],
    run_config: list[str],
    app_dir: Path,
    unregistered: bool = False,
    kill_node: int | None = None,
    kill_after_round: int = 1,
    timeout: float = 3600.0,
) -> Report:
    """Run the app on a local TLS + authenticated deployment; see the module docstring."""
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    output_dir = workdir / "outputs"
    dep = Deployment(workdir)
    stop_watch = threading.Event()
    try:
        dep.start_superlink()
        plaintext_refused = _plaintext_refused(dep.address)
        node_ids, nodes = {}, []
        for i, node_config in enumerate(node_configs):
            name = f"supernode-{i}"
            private, public = make_supernode_key(workdir / "keys", name)
            node_ids[name] = dep.register(public)
            nodes.append(dep.start_supernode(name, private, node_config))
            print(f"deploy: {name} (node {node_ids[name]}) --node-config {node_config!r}")
        refused = None
        if unregistered:
            private, _ = make_supernode_key(workdir / "keys", "unregistered")
            intruder = dep.start_supernode("unregistered", private, node_configs[0])
        _wait_for_nodes(dep, len(nodes))
        if unregistered:
            try:
                intruder.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            # refused = exited with an error, and the SuperLink names the unknown key
            refused = (
                not intruder.alive()
                and intruder.popen.returncode != 0
                and "Failed to activate SuperNode" in intruder.log.read_text()
            )
            print(f"deploy: SuperNode with an unregistered key refused: {refused}")
        if kill_node is not None:
            threading.Thread(
                target=_kill_after_round,
                args=(nodes[kill_node], output_dir / "results.json", kill_after_round, stop_watch),
                daemon=True,
            ).start()
        run_id, status = dep.run(
            app_dir, [f'output.dir="{output_dir}"', *run_config], timeout=timeout
        )
        return Report(
            run_id,
            status,
            node_ids,
            refused,
            plaintext_refused,
            output_dir,
            time.perf_counter() - start,
        )
    finally:
        stop_watch.set()
        dep.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default=".", help="Flower app directory (default: .)")
    parser.add_argument("--workdir", help="certs, keys, logs, outputs go here")
    parser.add_argument(
        "--make-credentials",
        metavar="DIR",
        help="only write a CA, a server certificate for --host and one key pair per "
        "--key into DIR (for real machines), then exit",
    )
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="address the SuperLink is reached at (repeatable; with --make-credentials)",
    )
    parser.add_argument("--key", action="append", default=[], help="a SuperNode key name")
    parser.add_argument(
        "--proxy-port",
        type=int,
        default=9093,
        help="with --make-credentials: the public port of the Fleet-only proxy (default 9093)",
    )
    parser.add_argument(
        "--superlink-port",
        type=int,
        default=9092,
        help="with --make-credentials: the SuperLink's port on 127.0.0.1 (default 9092)",
    )
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        help="one SuperNode's --node-config (repeatable), e.g. 'tier=\"low\" lora-rank=2'; "
        "partition-id/num-partitions are added unless given",
    )
    parser.add_argument("--run-config", action="append", default=[])
    parser.add_argument("--unregistered", action="store_true")
    parser.add_argument("--kill-node", type=int, default=None)
    parser.add_argument("--kill-after-round", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.make_credentials:
        out = Path(args.make_credentials).resolve()
        hosts = tuple(args.host) or ("127.0.0.1", "localhost")
        for path in make_certificates(out / "certs", hosts):
            print(f"wrote {path}")
        for name in args.key:
            for path in make_supernode_key(out / "keys", name):
                print(f"wrote {path}")
        proxy = out / "fleet-proxy.nginx.conf"
        proxy.write_text(
            fleet_proxy_config(hosts[0], args.proxy_port, args.superlink_port, out / "certs")
        )
        print(
            f"wrote {proxy}: expose only the Fleet API on port {args.proxy_port}; start the "
            f"SuperLink with --host 127.0.0.1 --port {args.superlink_port}"
        )
        print(
            f"certificate valid for {', '.join(hosts)}; register the .pub keys with "
            "`flwr supernode register <key>.pub <connection>`"
        )
        return 0
    if not args.workdir:
        parser.error("--workdir is required (or use --make-credentials DIR)")
    nodes = args.node or ['tier="low" lora-rank=2', 'tier="high" lora-rank=8']
    node_configs = [
        cfg if "partition-id" in cfg else f"{cfg} partition-id={i} num-partitions={len(nodes)}"
        for i, cfg in enumerate(nodes)
    ]
    report = deploy(
        Path(args.workdir).resolve(),
        node_configs,
        args.run_config,
        Path(args.app).resolve(),
        args.unregistered,
        args.kill_node,
        args.kill_after_round,
        args.timeout,
    )
    print(
        f"deploy: run {report.run_id} status {report.status} after {report.seconds:.0f}s; "
        f"outputs in {report.output_dir}"
    )
    return 0 if report.status == COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
