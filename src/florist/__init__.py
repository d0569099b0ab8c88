"""florist: federated LoRA fine-tuning of LLMs with FLoRIST aggregation, on Flower."""

import logging

__version__ = "0.1.0"

# peft imports bitsandbytes, whose CPU backend warns on every import that it could not fetch an
# optional kernel from the model hub (the `kernels` package, which florist does not install: no hub
# at run time). It falls back to its own CPU kernel; the warning would end up in every error line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
