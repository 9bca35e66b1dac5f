"""FedMed: federated QLoRA fine-tuning for clinical information extraction (Fed-MedLoRA / Fed-MedLoRA+)."""

__version__ = "0.1.0"
