"""The site trainer's loss: HF's causal LM loss, with the vocabulary projection only where needed."""

import torch

from fedmed_components.model.training import IGNORE_INDEX, collate, supervised_loss


def test_supervised_loss_equals_hf_loss_and_trains(tiny_model_path):
    from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model

    model = attach_lora(load_base_model(tiny_model_path, quantize="none", device="cpu"), LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in ((20, 8), (30, 25), (12, 3)):  # answers start at different positions
        ids = torch.randint(10, 1000, (length,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    batch = collate(examples, pad_token_id=0)
    loss, n = supervised_loss(model, batch)
    assert n == (20 - 8) + (30 - 25) + (12 - 3)  # every answer token is a target
    reference = model(**batch).loss  # HF's own shifted loss over every position
    assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]  # A gets none while B = 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
