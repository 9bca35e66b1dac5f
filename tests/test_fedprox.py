"""FedProx at a site: the local loss gets mu/2 ||theta - theta_global||^2 over the trained parameters."""

import pytest
import torch

from fedmed_components.model.training import LocalTrainer, TrainSettings, proximal_term


def test_proximal_gradient_is_mu_times_the_distance_to_the_global():
    theta = [torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([[0.5]]))]
    anchors = [torch.tensor([0.0, 1.0]), torch.tensor([[2.0]])]
    term = proximal_term(theta, anchors, mu=0.3)
    # 0.3/2 * ((1-0)^2 + (-2-1)^2 + (0.5-2)^2) = 0.15 * 12.25
    assert float(term) == pytest.approx(0.15 * 12.25)
    term.backward()
    assert torch.allclose(theta[0].grad, 0.3 * torch.tensor([1.0, -3.0]))
    assert torch.allclose(theta[1].grad, 0.3 * torch.tensor([[-1.5]]))


class _Quadratic(torch.nn.Module):
    """loss (w - 3)^2: its gradient 2 (w - 3) is known at every step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0]))


def _loss(model, batch):
    return ((model.w - 3.0) ** 2).sum(), 1


def _collate(examples, pad):
    return {"attention_mask": torch.ones(1, 1)}


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_a_fedprox_round_steps_on_the_loss_plus_the_pull_to_the_round_start(mu):
    model = _Quadratic()
    settings = TrainSettings(learning_rate=0.1, max_steps=3, warmup_ratio=0.0, scheduler="constant", max_grad_norm=0.0, prox_mu=mu)
    trainer = LocalTrainer(model, 0, settings, device="cpu", loss_fn=_loss, collate_fn=_collate)
    trainer._new_optimizer = lambda: torch.optim.SGD([model.w], lr=0.1)  # plain SGD: each step by hand
    trainer.train_round([{"input_ids": [1]}])
    w, start = 1.0, 1.0
    for _ in range(3):
        w -= 0.1 * (2 * (w - 3.0) + mu * (w - start))
    assert float(model.w) == pytest.approx(w, rel=1e-6)
    # the next round's anchor is where that round starts, not the first round's start
    start = w
    trainer.train_round([{"input_ids": [1]}])
    for _ in range(3):
        w -= 0.1 * (2 * (w - 3.0) + mu * (w - start))
    assert float(model.w) == pytest.approx(w, rel=1e-6)
