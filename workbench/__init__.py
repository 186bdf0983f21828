"""FlexQuant Workbench: build, serve, watch and compare multi-variant quantized checkpoints."""

import os

__version__ = "0.1.0"

# Every model here is a local folder; nothing is fetched from a model hub at run time (offline
# machines, no surprise multi-GB downloads). Without this, a model path that does not exist is taken
# for a hub repo id and transformers retries the network for ~20 s before failing. Before any
# huggingface_hub import reads it; set HF_HUB_OFFLINE=0 to allow hub downloads anyway.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
