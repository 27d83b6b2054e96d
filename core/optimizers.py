"""Layer-wise adaptive optimizers for large batches: LARS (You et al., 2017) and LAMB (You et al., 2019).

Both scale each parameter tensor's update by a trust ratio, ``||w|| / ||update||``, so every layer
moves by a set fraction of its own norm whatever its gradient's scale. Parameter groups with
``adapt=False`` (biases, norms, learned tokens: the ones `build_optimizer` exempts from weight
decay) take the plain update, as in SimCLR and BYOL. The per-tensor norms run as one ``foreach``
call over a group, not a Python loop of kernels per tensor.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

__all__ = ["LARS", "LAMB"]


def _trust_ratios(params: list[Tensor], updates: list[Tensor], scale: float) -> list[Tensor]:
    """``scale * ||w|| / ||u||`` per tensor, 1 where either norm is zero (a fresh zero bias, no gradient)."""
    w_norms = torch._foreach_norm(params)
    u_norms = torch._foreach_norm(updates)
    return [torch.where((w > 0) & (u > 0), scale * w / u, torch.ones_like(w)) for w, u in zip(w_norms, u_norms)]


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """The step loop both share: each group's parameters that have a gradient go to `_update`."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError


class LARS(_LayerwiseOptimizer):
    """SGD with momentum on the trust-scaled update ``g + wd * w``.

    Args:
        params: parameters or groups; a group's ``adapt`` (default True) turns the trust ratio on.
        lr: learning rate.
        momentum: momentum of the scaled update.
        weight_decay: added to the gradient before scaling (``wd * w``).
        trust_coefficient: ``eta``: the fraction of ``||w||`` an update of lr 1 moves a tensor by.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0 and trust_coefficient > 0; got "
                             f"{lr}, {momentum}, {weight_decay}, {trust_coefficient}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, adapt=True))

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        updates = [p.grad.clone() for p in params]
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        if group["adapt"]:
            torch._foreach_mul_(updates, _trust_ratios(params, updates, group["trust_coefficient"]))
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, updates)
        torch._foreach_add_(params, buffers, alpha=-group["lr"])


class LAMB(_LayerwiseOptimizer):
    """Adam's bias-corrected step plus decoupled weight decay, ``r = m / (sqrt(v) + eps) + wd * w``,
    scaled by the trust ratio ``||w|| / ||r||``: with ``adapt`` a tensor moves by ``lr * ||w||`` a step.

    Args:
        params: parameters or groups; a group's ``adapt`` (default True) turns the trust ratio on.
        lr: learning rate.
        betas: Adam's moment decays.
        eps: added to ``sqrt(v)``.
        weight_decay: decoupled, inside the trust-scaled update.
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or not all(0 <= b < 1 for b in betas) or eps <= 0 or weight_decay < 0:
            raise ValueError(f"LAMB needs lr >= 0, 0 <= betas < 1, eps > 0 and weight_decay >= 0; got {lr}, {betas}, "
                             f"{eps}, {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adapt=True))

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        firsts, seconds, grads, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            firsts.append(state["exp_avg"])
            seconds.append(state["exp_avg_sq"])
            grads.append(p.grad)
            steps.append(float(state["step"]))
        torch._foreach_lerp_(firsts, grads, 1 - beta1)
        torch._foreach_mul_(seconds, beta2)
        torch._foreach_addcmul_(seconds, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(seconds)
        torch._foreach_div_(denominators, [(1 - beta2 ** s) ** 0.5 for s in steps])
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(firsts, denominators)
        torch._foreach_div_(updates, [1 - beta1 ** s for s in steps])
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        if group["adapt"]:
            torch._foreach_mul_(updates, _trust_ratios(params, updates, 1.0))
        torch._foreach_add_(params, updates, alpha=-group["lr"])
