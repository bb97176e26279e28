"""The simulation on an existing multi-node Ray cluster (issue 23): a head node and a
second node on 127.0.0.1 (Ray's own ``cluster_utils.Cluster``, real raylets), the real
``flwr run`` path through the launcher's ``--ray-address``, the tiny model."""

import json

import pytest

from .conftest import TINY, launch_tiny

# starts real processes (SuperLink, SuperNodes, Ray): `pytest -m "not slow"` skips it
pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def test_clients_train_on_more_than_one_ray_node(tmp_path, two_node_cluster, monkeypatch):
    # the launcher sets RAY_ADDRESS for the processes it starts; undone after the test
    monkeypatch.setenv("RAY_ADDRESS", "")
    out = tmp_path / "run"
    config = {**TINY, "num-server-rounds": 2, "data.max-train-examples": 200}
    code = launch_tiny(out, config, 4, "--ray-address", two_node_cluster.address)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["status"] == "completed"
    used = {c["ray_node"] for r in results["rounds"][1:] for c in r["clients"]}
    cluster_nodes = {n.node_id[:12] for n in two_node_cluster.list_all_nodes()}
    assert len(cluster_nodes) == 2
    # every client reply names a node of this cluster, and both nodes trained clients
    assert used == cluster_nodes


def test_a_client_on_a_shared_gpu_caps_its_cuda_memory_at_its_share(monkeypatch):
    """--client-gpus 0.25: Ray assigns each actor a quarter GPU; the client caps its CUDA
    allocator there (no GPU needed: Ray's runtime context and torch's cap are stood in)."""
    import sys
    import types

    import torch

    from haflq_flower import client_app

    calls = []
    context = types.SimpleNamespace(get_assigned_resources=lambda: {"GPU": 0.25, "CPU": 1.0})
    fake_ray = types.SimpleNamespace(
        is_initialized=lambda: True, get_runtime_context=lambda: context
    )
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", calls.append)
    client_app._cap_to_gpu_share.cache_clear()
    try:
        assert client_app._cap_to_gpu_share() == 0.25
        assert client_app._cap_to_gpu_share() == 0.25  # once per process
        assert calls == [0.25]
        client_app._cap_to_gpu_share.cache_clear()
        context.get_assigned_resources = lambda: {"GPU": 1.0}
        assert client_app._cap_to_gpu_share() == 1.0 and calls == [0.25]  # a whole GPU
    finally:
        client_app._cap_to_gpu_share.cache_clear()
