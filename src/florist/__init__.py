"""florist: federated LoRA fine-tuning of LLMs with FLoRIST aggregation, on Flower."""

__version__ = "0.1.0"
