"""Communication accounting: what a federated run sends per round, against full-model FedAvg."""

from __future__ import annotations


def full_model_parameters(model_path: str) -> int:
    """Parameters of the base model, counted on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def communication(adapter_state, model_path: str, rounds: int, sites: int) -> dict:
    """What travels per round per site: the fp32 adapter, versus full-model FedAvg in fp32."""
    from fedmed_components.model.modeling import adapter_num_bytes

    adapter = adapter_num_bytes(adapter_state)
    full = full_model_parameters(model_path) * 4
    return {
        "rounds": rounds,
        "sites": sites,
        "adapter_bytes_per_round_per_site": adapter,
        "full_model_bytes_per_round_per_site": full,
        "adapter_over_full": adapter / full,
        "total_adapter_bytes": adapter * rounds * sites,
        "total_full_model_bytes": full * rounds * sites,
    }
