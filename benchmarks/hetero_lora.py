"""Issue 3's ablation: FedIT (all clients at rank R), HetLoRA, freezing + zero-padding,
truncation + adaptive, freezing + adaptive (HAFL), on the embedded default task, all with
full-precision (fp32) uploads and downloads; plus HAFL with the bandwidth-adaptive
bit-packed uplink and a 16-bit downlink (``haflq-quant``).

10 clients in three tiers (r_k = 2, 4, 8 of R = 8), Dirichlet(0.5) label skew, the same
seed for every arm; sized to finish in about an hour on a 2-core CPU. Any extra
argument goes to ``haflq_flower.compare`` (e.g. ``--seeds 0,1,2``, ``--rounds 10`` or
another ``--run-config``).

    python benchmarks/hetero_lora.py --out outputs/bench-hetero
"""

import sys

from haflq_flower import compare

DEFAULTS = [
    "--arms",
    "haflq,hetlora,fedit,freeze-zeropad,truncate-adaptive,haflq-quant",
    "--rounds",
    "4",
    "--num-supernodes",
    "10",
    "--target",
    "0.7",
    "--run-config",
    'data.partitioner="dirichlet" data.dirichlet-alpha=0.5 train.local-steps=4 '
    'data.test-per-class=100 payload.uplink="fp32" payload.downlink-bits=32',
]

if __name__ == "__main__":
    sys.exit(compare.main(DEFAULTS + sys.argv[1:]))
