"""The scripted deployment: a real SuperLink with TLS and SuperNode authentication, real
SuperNodes with different profiles, the tiny model. Each message starts a fresh ClientApp
process, so these tests take a few minutes."""

import json
from pathlib import Path

from haflq_flower.deploy import COMPLETED, deploy

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
