"""The scripted deployment: a real SuperLink with TLS and SuperNode authentication, real
SuperNodes with different profiles, the tiny model. Each message starts a fresh ClientApp
process, so these tests take a few minutes."""

import json
from pathlib import Path

import pytest

from haflq_flower.deploy import COMPLETED, deploy

# starts real processes (SuperLink, SuperNodes, Ray): `pytest -m "not slow"` skips it
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = (
    'model.name="tiny" strategy.name="haflq" num-server-rounds=2 data.test-per-class=20 '
    "data.max-train-examples=400 train.local-steps=3"
)


def _rounds(report) -> list[dict]:
    return json.loads((report.output_dir / "results.json").read_text())["rounds"]


def test_tls_authenticated_deployment_follows_the_node_profiles(tmp_path):
    nodes = [
        'tier="edge" lora-rank=2 partition-id=0 num-partitions=2',
        'tier="workstation" lora-rank=8 partition-id=1 num-partitions=2',
    ]
    report = deploy(tmp_path, nodes, [TINY_RUN], ROOT, unregistered=True, timeout=900)
    assert report.status == COMPLETED, (tmp_path / "superlink.log").read_text()[-3000:]
    assert report.plaintext_refused, "the SuperLink answered plain HTTP"
    assert report.refused, (tmp_path / "unregistered.log").read_text()[-2000:]
    assert (
        "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text()
    )
    rounds = _rounds(report)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        got = sorted((c["tier"], c["rank"], c["partition"], c["status"]) for c in r["clients"])
        assert got == [("edge", 2, 0, "ok"), ("workstation", 8, 1, "ok")]
    assert (report.output_dir / "adapter" / "adapter_model.safetensors").exists()


def test_a_node_that_dies_mid_run_does_not_stop_it(tmp_path):
    nodes = [f'tier="low" lora-rank=2 partition-id={i} num-partitions=3' for i in range(3)]
    report = deploy(
        tmp_path,
        nodes,
        [TINY_RUN + " strategy.round-timeout=240.0"],
        ROOT,
        kill_node=2,
        kill_after_round=1,
        timeout=900,
    )
    assert report.status == COMPLETED, (tmp_path / "superlink.log").read_text()[-3000:]
    rounds = _rounds(report)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert sorted(c["status"] for c in rounds[1]["clients"]) == ["ok"] * 3
    second = rounds[2]["clients"]
    assert sorted(c["partition"] for c in second if c["status"] == "ok") == [0, 1]
    # the dead node is either reported as failed by the SuperLink or already gone
    assert all(c["status"] in ("ok", "error", "no reply") for c in second)
    assert rounds[2]["update"] == "applied"


def test_credentials_for_a_real_server(tmp_path):
    """--make-credentials: a CA-signed server certificate for the given addresses and
    OpenSSH-format P-384 SuperNode keys (Flower refuses PKCS8)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from haflq_flower.deploy import main

    args = ["--make-credentials", str(tmp_path), "--host", "fl.example.org"]
    assert main([*args, "--host", "10.0.0.5", "--key", "jetson-1"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    cert.verify_directly_issued_by(ca)
    private = (tmp_path / "keys" / "jetson-1").read_bytes()
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(private, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    public = (tmp_path / "keys" / "jetson-1.pub").read_text()
    assert public.startswith("ecdsa-sha2-nistp384 ")


def test_private_keys_are_0600_from_the_start(tmp_path, monkeypatch):
    """Old code: keys were written with the default mode and chmod'ed afterwards (a window
    in which others could read them). Here chmod is disabled and the umask opens
    everything: the keys must still be 0600, i.e. created with that mode."""
    import os
    import stat

    from haflq_flower.deploy import make_certificates, make_supernode_key

    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    old = os.umask(0)
    try:
        private, public = make_supernode_key(tmp_path / "keys", "node")
        _, _, server_key = make_certificates(tmp_path / "certs")
    finally:
        os.umask(old)
    for path in (private, server_key, tmp_path / "certs" / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # rewriting an existing key keeps it private, and a symlink in its place is refused
    make_supernode_key(tmp_path / "keys", "node")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    (tmp_path / "keys" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        make_supernode_key(tmp_path / "keys", "link")


def test_the_control_api_is_never_exposed_without_protection(tmp_path):
    from haflq_flower.deploy import check_bind_host, fleet_proxy_config, main

    check_bind_host("127.0.0.1")
    with pytest.raises(ValueError, match="Control API"):
        check_bind_host("0.0.0.0")
    check_bind_host("10.0.0.5", control_protected=True)
    conf = fleet_proxy_config("fl.example.org", 9093, 9092, tmp_path)
    forwarded = [line.split()[1] for line in conf.splitlines() if "location" in line]
    assert forwarded == ["/v1/fleet/", "=", "/"]  # fleet, exact /health, everything else
    assert conf.count("proxy_pass https://127.0.0.1:9092") == 2
    assert "return 403" in conf and "/v1/control" not in conf.split("location / {")[0]
    assert main(["--make-credentials", str(tmp_path / "c"), "--host", "fl.example.org"]) == 0
    assert "listen 9093 ssl" in (tmp_path / "c" / "fleet-proxy.nginx.conf").read_text()


def test_fedsa_keeps_b_on_real_supernodes_under_local_dp(tmp_path):
    """Deployed, each message starts a fresh ClientApp process: FedSA-LoRA's B must come
    back from the SuperNode's context in round 2 (b_start_norm > 0), and local DP runs
    with the accountant's epsilon in every round."""
    nodes = [f'tier="low" lora-rank=8 partition-id={i} num-partitions=2' for i in range(2)]
    run = TINY_RUN.replace('strategy.name="haflq"', 'strategy.name="fedsa-lora"') + (
        ' dp.mode="local" dp.clip=0.5 dp.noise-multiplier=0.8'
    )
    report = deploy(tmp_path, nodes, [run], ROOT, timeout=900)
    assert report.status == COMPLETED, (tmp_path / "superlink.log").read_text()[-3000:]
    rounds = _rounds(report)
    assert all(v == 0.0 for v in rounds[1]["b_start_norm"].values())
    assert len(rounds[2]["b_start_norm"]) == 2
    assert all(v > 0.0 for v in rounds[2]["b_start_norm"].values())
    assert 0 < rounds[1]["dp_epsilon"] < rounds[2]["dp_epsilon"]
    assert 0.0 < rounds[2]["aggregation_residual"]
