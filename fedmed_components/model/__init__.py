"""The model at a site: built-in and HF models with their LoRA adapters, the trainer (bf16,
DP-SGD, FedProx), generation, the token-classification baseline, the task-model seam
between the two kinds (task_model) and the site runtime."""
