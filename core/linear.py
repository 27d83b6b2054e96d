"""The linear probes' classifier: multinomial logistic regression on standardized features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fit_linear"]


def fit_linear(train_x: Tensor, train_y: Tensor, classes: int, iters: int = 100,
               l2: float = 1e-4) -> tuple[nn.Linear, tuple[Tensor, Tensor]]:
    """Multinomial logistic regression on standardized features (L-BFGS, seeded): the layer and the
    ``(mean, std)`` that standardize its inputs."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr = (train_x - mean) / std
    torch.manual_seed(0)
    layer = torch.nn.Linear(xtr.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(xtr), train_y) + l2 * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer, (mean, std)
