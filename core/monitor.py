"""Online monitors, cheap enough to leave on: k-NN and linear-probe accuracy on a small labelled
split and collapse signals of the embeddings (RankMe effective rank, per-dimension spread), every N steps."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbone import Backbone
from .build import build_dataset
from .evaluate import extract_features, knn_accuracy, linear_probe, subset

__all__ = ["OnlineMonitor", "monitor_scores", "rankme", "feature_std"]


def rankme(features: Tensor, eps: float = 1e-7) -> float:
    """Effective rank (Garrido et al. 2023, RankMe): exp of the entropy of the normalized singular values."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(features: Tensor) -> float:
    """Mean over dimensions of the std of L2-normalized features; near 0 when the encoder collapses
    (SimSiam's signal: about 1/sqrt(D) for well-spread features)."""
    return float(F.normalize(features, dim=1).std(0).mean())


class OnlineMonitor:
    """Embeds a fixed labelled subset (eval mode, no randomness drawn) and reports ``monitor/*`` metrics."""

    def __init__(self, cfg: Any, components: Any, device: torch.device) -> None:
        dataset = subset(build_dataset(cfg, "test", components), cfg.eval.monitor_samples, cfg.run.seed)
        self.dataset, self.device = dataset, device
        self.batch_size, self.k, self.field = cfg.eval.batch_size, cfg.eval.knn_k, cfg.eval.labels[0]
        self.probe_iters = cfg.eval.probe_iters

    def __call__(self, backbone: Backbone) -> dict[str, float]:
        was_training = backbone.training
        with torch.no_grad():
            feats, fields = extract_features(backbone, self.dataset, self.batch_size, self.device, [self.field])
        backbone.train(was_training)
        return monitor_scores(feats, fields[self.field], self.k, self.probe_iters)


def monitor_scores(feats: Tensor, labels: Tensor, k: int, probe_iters: int) -> dict[str, float]:
    """The ``monitor/*`` metrics of features and their labels: the first half is the reference (the
    k-NN's neighbours, the linear probe's training set), the second the query."""
    half = len(feats) // 2
    return {
        "monitor/knn": knn_accuracy(feats[:half], labels[:half], feats[half:], labels[half:], k),
        # fitted afresh each time on the reference half (L-BFGS on a few hundred vectors: milliseconds)
        "monitor/linear": linear_probe(feats[:half], labels[:half], feats[half:], labels[half:], probe_iters),
        "monitor/rankme": rankme(feats),
        "monitor/feature_std": feature_std(feats),
    }
