"""Run one in-process simulation in this process (for tests that kill it).

Usage: python -m tests.sim_child '<json run-config overrides>' <num clients>
"""

import json
import os
import sys

from flwr.simulation import run_simulation

from haflq_flower.client_app import make_client_app
from haflq_flower.server_app import make_server_app

if __name__ == "__main__":
    overrides = json.loads(sys.argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=make_client_app(overrides),
        num_supernodes=int(sys.argv[2]),
        backend_config={"client_resources": {"num_cpus": 1}},
    )
