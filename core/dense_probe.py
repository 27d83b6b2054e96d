"""Dense evaluation: a per-point semantic-segmentation linear probe on a frozen encoder (the lidar
SSL benchmarks' protocol: SLidR and ScaLR probe nuScenes lidarseg this way), as mIoU and per-class IoU.

Each input point takes the feature of the token it went into (`Tokens.source`); points no token
holds (out of the tokenizer's range) and padding are left out of training and scoring alike. A
fixed number of points per frame is drawn (seeded) so memory stays bounded on 100k-point sweeps.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .backbone import Backbone
from .data import collate
from .linear import fit_linear
from .tokens import gather_tokens

__all__ = ["point_features", "confusion", "iou_from_confusion", "segmentation_probe", "format_segmentation"]

@torch.no_grad()
def point_features(backbone: Backbone, dataset: Dataset, labels: str, batch_size: int, device: torch.device,
                   sensor: Optional[str] = None, per_frame: int = 2048, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Features ``[n, D]`` and labels ``[n]`` of up to ``per_frame`` points of each frame.

    Args:
        labels: the sample field of per-point labels (``lidar_top/labels``), aligned with the
            sensor's points.
        sensor: the backbone's sensor whose tokens are probed (None: its first).

    Raises:
        ValueError: the samples lack ``labels``, or the tokenizer does not say which token each
            point went into (``Tokens.source``).
    """
    backbone.eval()
    generator = torch.Generator().manual_seed(seed)
    feats, ys = [], []
    for raw in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if labels not in raw:
            raise ValueError(f"the segmentation probe reads per-point labels from field {labels!r} (eval.point_labels); "
                             f"the samples have {sorted(raw)}")
        raw = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in raw.items()}
        tokens = backbone.tokenize(raw, sensor)
        if tokens.source is None:
            raise ValueError(f"the segmentation probe needs a tokenizer that records each point's token (Tokens.source); "
                             f"{type(backbone.tokenizer_of(sensor)).__name__} does not")
        y = raw[labels].long()
        if y.shape != tokens.source.shape:
            raise ValueError(f"field {labels!r} holds {tuple(y.shape)} labels but the tokenizer saw {tuple(tokens.source.shape)} points")
        x = backbone.encode(tokens).tokens.x.float()
        kept = tokens.source >= 0  # padding and out-of-range points have no token
        # a random subset of each frame's kept points: random keys, the kept ones first
        keys = torch.rand(kept.shape, generator=generator).to(device) - kept.float()
        take = keys.argsort(1)[:, :per_frame]
        chosen = torch.gather(kept, 1, take)
        token = torch.gather(tokens.source, 1, take).clamp_min(0)
        feats.append(gather_tokens(x, token)[chosen].cpu())
        ys.append(torch.gather(y, 1, take)[chosen].cpu())
    return torch.cat(feats), torch.cat(ys)


def confusion(pred: Tensor, target: Tensor, classes: int) -> Tensor:
    """``[classes, classes]`` counts, rows the true class, columns the predicted one."""
    return torch.bincount(target * classes + pred, minlength=classes * classes).view(classes, classes)


def iou_from_confusion(matrix: Tensor) -> Tensor:
    """Per-class IoU ``tp / (tp + fp + fn)``; NaN for a class neither present nor predicted."""
    tp = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def segmentation_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int,
                       iters: int = 100, l2: float = 1e-4) -> dict[str, Any]:
    """A linear classifier on standardized point features (L-BFGS, as the scene-level probe):
    ``{"miou", "iou": [per class, None where absent], "accuracy"}`` on the test points."""
    layer, (mean, std) = fit_linear(train_x, train_y, classes, iters, l2)
    with torch.no_grad():
        pred = layer((test_x - mean) / std).argmax(1)
    iou = iou_from_confusion(confusion(pred, test_y, classes))
    present = ~iou.isnan()
    return {"miou": iou[present].mean().item() if present.any() else float("nan"),
            "iou": [None if v != v else float(v) for v in iou.tolist()],
            "accuracy": (pred == test_y).float().mean().item()}


def format_segmentation(results: dict[str, dict[str, Any]], class_names: Sequence[str]) -> str:
    """A markdown table: one row per encoder, mIoU then each class's IoU."""
    head = ["encoder", "mIoU", *class_names]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = ["-" if v is None else f"{100 * v:.1f}" for v in r["iou"]]
        rows.append(f"| {name} | {100 * r['miou']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
