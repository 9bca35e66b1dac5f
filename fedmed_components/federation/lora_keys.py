"""LoRA tensor names: which PEFT state-dict keys are adapter factors, and which is which.

Keys are PEFT state-dict names (``get_peft_model_state_dict``), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (shape ``[r, in]``)
and ``...q_proj.lora_B.weight`` (shape ``[out, r]``). A name is judged by its
dot-separated parts, never by substring: ``x.my_lora_A_thing.weight`` is not LoRA.
"""

from __future__ import annotations

__all__ = ["is_factor_weight", "is_lora_A", "is_lora_B", "is_lora_key", "layer_name", "lora_partner"]

_A_PARTS = ("lora_A", "lora_embedding_A")
_B_PARTS = ("lora_B", "lora_embedding_B")
_PARTNER = {"lora_A": "lora_B", "lora_B": "lora_A", "lora_embedding_A": "lora_embedding_B", "lora_embedding_B": "lora_embedding_A"}
_OTHER_LORA_PARTS = ("lora_magnitude_vector",)  # DoRA


def _lora_part(key: str) -> tuple[int, str] | None:
    """Index and name of the ``lora_A``/``lora_B``/``lora_embedding_*`` component of a key."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _PARTNER:
            return i, part
    return None


def is_lora_A(key: str) -> bool:
    """True for a LoRA down-projection (``lora_A``, ``lora_embedding_A``) tensor name."""
    found = _lora_part(key)
    return found is not None and found[1] in _A_PARTS


def is_lora_B(key: str) -> bool:
    """True for a LoRA up-projection (``lora_B``, ``lora_embedding_B``) tensor name."""
    found = _lora_part(key)
    return found is not None and found[1] in _B_PARTS


def is_lora_key(key: str) -> bool:
    """True for any tensor a LoRA/DoRA adapter legitimately carries."""
    return _lora_part(key) is not None or any(part in _OTHER_LORA_PARTS for part in key.split("."))


def lora_partner(key: str) -> str | None:
    """The name of the other factor of the same layer (A -> B, B -> A), or None."""
    found = _lora_part(key)
    if found is None:
        return None
    parts = key.split(".")
    parts[found[0]] = _PARTNER[found[1]]
    return ".".join(parts)


def layer_name(key: str) -> str:
    """``...q_proj.lora_A.weight`` -> ``...q_proj`` (the key itself if it is not a factor)."""
    found = _lora_part(key)
    return key if found is None else ".".join(key.split(".")[: found[0]])


def is_factor_weight(key: str) -> bool:
    """An A/B factor matrix (not a ``lora_B.bias``)."""
    return _lora_part(key) is not None and not key.endswith(".bias")
