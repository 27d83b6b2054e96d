"""Pictures for people: the loss curve and, for reconstruction objectives, input / masked input /
reconstruction grids. Written into the run folder's ``eval/``."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from .backbone import Backbone  # noqa: E402
from .build import build_masker, stage_objectives  # noqa: E402
from .data import collate  # noqa: E402
from .objective import Batch  # noqa: E402
from .runfolder import RunFolder, write_atomic  # noqa: E402

__all__ = ["plot_loss_curve", "plot_reconstructions", "plot_retrieval"]


def plot_loss_curve(folder: RunFolder) -> Optional[Path]:
    records = list(folder.read_metrics())
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for stage in dict.fromkeys(r["stage"] for r in records):
        rows = [r for r in records if r["stage"] == stage]
        ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], label=stage)
        offset += rows[-1]["step"]
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=folder.root.name)
    ax.legend()
    fig.tight_layout()
    return _save(fig, folder.eval / "loss_curve.png")


@torch.no_grad()
def plot_reconstructions(folder: RunFolder, cfg: Any, components: Any, backbone: Backbone, test: Dataset,
                         device: torch.device, count: int = 8) -> list[Path]:
    """One grid per stage objective that can ``reconstruct`` the tokenizer targets, when the tokenizer can ``render``."""
    tokenizer = backbone.tokenizer
    if not hasattr(tokenizer, "render"):
        return []
    paths = []
    raw = collate([test[i] for i in range(min(count, len(test)))])
    raw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
    for name, stage in cfg.recipe.stages.items():
        masker = build_masker(stage, components)
        objectives = stage_objectives(folder, components, backbone, name, stage) if masker is not None else None
        if objectives is None:
            continue
        objectives.to(device)
        backbone.eval()
        tokens = backbone.tokenize(raw)
        mask = masker(tokens, torch.Generator().manual_seed(0))
        for label, objective in objectives.items():
            if not hasattr(objective, "reconstruct"):
                continue
            pred = objective.reconstruct(Batch(raw, tokens, mask, torch.Generator()), backbone).float()
            full = tokens.targets.float().clone()
            full.scatter_(1, mask.target.unsqueeze(-1).expand(-1, -1, full.shape[-1]), pred)
            shown = torch.zeros(tokens.x.shape[:2], dtype=torch.bool, device=device)
            visible_only = shown.scatter(1, mask.visible, True)
            both = visible_only.scatter(1, mask.target, True)
            images = raw[tokenizer.input_key]
            extra = {"tokens": tokens} if _needs_tokens(tokenizer.render) else {}
            shown_input = tokenizer.preview(images, **extra) if hasattr(tokenizer, "preview") else images
            rows = [shown_input, tokenizer.render(images, tokens.targets.float(), visible_only, **extra),
                    tokenizer.render(images, full, both, **extra)]
            paths.append(_grid(rows, ["input", "masked input", "reconstruction"], folder.eval / f"reconstruction_{name}_{label}.png"))
    return paths


def _needs_tokens(draw: Any) -> bool:
    """A tokenizer whose pictures need the Tokens (positions, padding, which point went where) asks for them."""
    return "tokens" in inspect.signature(draw).parameters


def _viewable(backbone: Backbone, raw: dict[str, Any], key: str) -> Optional[torch.Tensor]:
    """Field ``key`` of ``raw`` as ``[B, C, H, W]`` pictures: its tokenizer's ``preview``, else the
    field itself when it is one; None when it cannot be drawn."""
    x = raw.get(key)
    if not isinstance(x, torch.Tensor):
        return None
    tokenizer = backbone.tokenizer_of(key) if key in backbone.sensors else backbone.tokenizer
    if hasattr(tokenizer, "preview"):
        return tokenizer.preview(x, tokens=backbone.tokenize(raw, key)) if _needs_tokens(tokenizer.preview) else tokenizer.preview(x)
    return x if x.dim() == 4 and x.shape[1] in (1, 3) else None


@torch.no_grad()
def plot_retrieval(path: Path, objective: Any, backbone: Backbone, test: Dataset, device: torch.device,
                   queries: int = 6, pool: int = 64) -> Optional[Path]:
    """Queries (the first test samples) and their top-5 partners among ``pool`` test samples' partners
    (captions as text, sensor data as pictures), hits framed green: the contrastive objective's
    ``embed_sample`` against its ``embed_partner``. None when the samples cannot be drawn."""
    backbone.eval()
    raw = collate([test[i] for i in range(min(pool, len(test)))])
    raw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
    samples = _viewable(backbone, raw, backbone.sensor)
    if samples is None:
        return None
    partners = raw[objective.partner_key]
    partner_images = None
    if isinstance(partners, torch.Tensor):
        partner_images = _viewable(backbone, raw, objective.partner_key)
        if partner_images is None:
            return None
    sim = objective.embed_sample(raw, backbone).float() @ objective.embed_partner(raw, backbone).float().T
    candidates = list(range(sim.shape[1]))
    if partner_images is None:  # captions repeat: rank each distinct one once
        first: dict[str, int] = {}
        for j, caption in enumerate(partners):
            first.setdefault(caption, j)
        candidates = list(first.values())
        sim = sim[:, candidates]
    n = min(queries, sim.shape[0])
    top = sim[:n].topk(min(5, sim.shape[1]), dim=1).indices.cpu()
    fig, axes = plt.subplots(n, 1 + top.shape[1], figsize=(1.5 * (1 + top.shape[1]), 1.4 * n), squeeze=False)
    for q in range(n):
        _show(axes[q][0], samples[q])
        axes[q][0].set_ylabel(f"query {q}", fontsize=7)
        for c, j in enumerate((candidates[i] for i in top[q].tolist()), start=1):
            ax = axes[q][c]
            # a hit: the query's own partner, or (captions repeat) one equal to it
            hit = j == q or (partner_images is None and partners[j] == partners[q])
            if partner_images is None:
                ax.text(0.5, 0.5, str(partners[j])[:60], ha="center", va="center", wrap=True, fontsize=6)
            else:
                _show(ax, partner_images[j])
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(color="tab:green" if hit else "tab:red", linewidth=2)
    axes[0][0].set_title("query", fontsize=8)
    for c in range(1, 1 + top.shape[1]):
        axes[0][c].set_title(f"top {c}", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _show(ax: Any, img: torch.Tensor) -> None:
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img[:3].permute(1, 2, 0))
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(rows: list[torch.Tensor], titles: list[str], path: Path) -> Path:
    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, (images, title) in enumerate(zip(rows, titles)):
        for c in range(n):
            _show(axes[r][c], images[c])
        axes[r][0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
