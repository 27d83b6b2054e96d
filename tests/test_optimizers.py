"""LARS and LAMB (`optim.name`): the trust ratio sets each tensor's step to a fraction of its own
norm, exempt groups take the plain step, state round-trips through a checkpoint, and a recipe
trains with each through the real command line."""

import copy
import json

import pytest
import torch
from torch import nn

from anymodal.core.optimizers import LAMB, LARS
from anymodal.core.schedule import build_optimizer
from helpers import anymodal


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def _backward(model, seed=1):
    torch.manual_seed(seed)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()


def test_lamb_moves_each_adapted_tensor_by_lr_times_its_norm():
    model = _model()
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    optimizer = LAMB([{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0, "adapt": False}],
                     lr=0.01)
    _backward(model)
    before = [p.detach().clone() for p in weights + biases]
    optimizer.step()
    for p, old in zip(weights, before[:2]):
        assert torch.isclose((p - old).norm(), 0.01 * old.norm(), rtol=1e-4)
    # not adapted: Adam's first step, lr * sign(g) up to eps, whatever the bias's norm
    for p, old in zip(biases, before[2:]):
        assert torch.allclose((p - old).abs(), torch.full_like(p, 0.01), atol=1e-3)


def test_lars_moves_each_adapted_tensor_by_lr_eta_times_its_norm():
    model = _model()
    weights = [model[0].weight, model[2].weight]
    optimizer = LARS([{"params": weights, "weight_decay": 1e-4}], lr=0.5, trust_coefficient=0.002)
    _backward(model)
    before = [p.detach().clone() for p in weights]
    grads = [p.grad.clone() for p in weights]
    optimizer.step()
    for p, old, g in zip(weights, before, grads):
        step = old - p
        assert torch.isclose(step.norm(), 0.5 * 0.002 * old.norm(), rtol=1e-4)
        update = g + 1e-4 * old  # the direction is the decayed gradient's
        assert torch.allclose(step / step.norm(), update / update.norm(), atol=1e-5)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_state_round_trips_through_a_checkpoint(kind, tmp_path):
    """Three steps straight equal two steps, a save, a load into a fresh optimizer, and one more."""
    from omegaconf import OmegaConf

    optim = OmegaConf.create({"name": kind, "lr": 0.1, "weight_decay": 0.05, "betas": [0.9, 0.99], "fused": "auto",
                              "trust_coefficient": 0.01})
    straight, resumed = _model(), _model()
    opt_a = build_optimizer(straight, optim, torch.device("cpu"))
    opt_b = build_optimizer(resumed, optim, torch.device("cpu"))
    for seed in (1, 2):
        for model, opt in ((straight, opt_a), (resumed, opt_b)):
            _backward(model, seed)
            opt.step()
    torch.save({"model": resumed.state_dict(), "optimizer": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    again = _model()
    again.load_state_dict(state["model"])
    opt_c = build_optimizer(again, optim, torch.device("cpu"))
    opt_c.load_state_dict(state["optimizer"])
    for model, opt in ((straight, opt_a), (again, opt_c)):
        _backward(model, 3)
        opt.step()
    for a, b in zip(straight.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert opt_c.param_groups[1]["adapt"] is False and opt_c.param_groups[1]["weight_decay"] == 0.0


def test_lamb_fits_a_regression_adamw_fits():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 4)
    for make in (lambda p: LAMB(p, lr=0.02), lambda p: torch.optim.AdamW(p, lr=0.02)):
        model = copy.deepcopy(_model())
        optimizer = make(model.parameters())
        for _ in range(300):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
        assert loss.item() < 0.05, (make, loss.item())


@pytest.mark.parametrize("kind, lr", [("lars", "0.5"), ("lamb", "0.005")])
def test_a_recipe_trains_with_each(tmp_path, kind, lr):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=30",
             f"recipe.stages.pretrain.optim.name={kind}", f"recipe.stages.pretrain.optim.lr={lr}")
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(loss == loss for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_an_unknown_optimizer_is_one_error_line(tmp_path):
    proc = anymodal("config", "tiny-test", "recipe.stages.pretrain.optim.name=sgd", check=False)
    assert proc.returncode != 0
    assert "recipe.stages.pretrain.optim.name must be one of adamw, lars, lamb, got 'sgd'" in proc.stderr
