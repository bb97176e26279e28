"""HAFLQ as a Flower app: federated LoRA fine-tuning across heterogeneous devices."""

from .logs import quiet_third_party

# Before torch, transformers or bitsandbytes are imported by any module of the package:
# their import-time notices (deprecations, an offline kernel download) are noise here.
quiet_third_party()
