"""Build components from a validated config: one place that turns names into modules."""

from __future__ import annotations

import inspect
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from .backbone import Backbone
from .checkpoint import load_checkpoint, load_model_state
from .config import objective_nodes
from .encoder import Encoder
from .posenc import build_posenc
from .runfolder import RunFolder
from .schema import model_shape as encoder_shape  # (width, depth, heads) after the size's defaults

__all__ = ["encoder_shape", "build_backbone", "build_dataset", "build_transforms", "build_masker", "build_objectives",
           "build_teacher", "stage_objectives"]


def _plain(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _split_name(node: Any) -> tuple[str, dict]:
    kwargs = _plain(node)
    return kwargs.pop("name"), kwargs


def build_backbone(cfg: DictConfig, components: Any) -> Backbone:
    dim, depth, heads = encoder_shape(cfg.model)
    name, kwargs = _split_name(cfg.modality.tokenizer)
    tokenizer = components.tokenizer.build(name, dim=dim, **kwargs)
    posenc = build_posenc(cfg.model.posenc, dim, tokenizer.pos_axes, getattr(tokenizer, "grid_size", None))
    encoder = Encoder(dim, depth, heads, posenc, mlp_ratio=cfg.model.mlp_ratio, drop_path=cfg.model.drop_path,
                      attn_backend=cfg.model.attn_backend, cls_token=cfg.model.cls_token,
                      grad_checkpointing=cfg.model.grad_checkpointing)
    return Backbone(tokenizer, encoder, pool=cfg.model.pool)


def build_dataset(cfg: DictConfig, split: str, components: Any) -> Dataset:
    """The dataset of ``data.<split>``; ``data.strict`` reaches factories that take ``strict``."""
    node = cfg.data[split]
    if not node:
        raise ValueError(f"config has no data.{split} dataset")
    name, kwargs = _split_name(node)
    kwargs.setdefault("split", split)
    entry = components.dataset.entry(name)
    if "strict" in inspect.signature(entry.factory).parameters:
        kwargs.setdefault("strict", cfg.data.strict)
    return components.dataset.build(name, **kwargs)


def build_transforms(cfg: DictConfig, components: Any) -> list:
    transforms = []
    for node in cfg.data.transforms:
        name, kwargs = _split_name(node)
        transforms.append(components.transform.build(name, **kwargs))
    return transforms


def build_masker(stage: Any, components: Any) -> Any:
    if not stage.masker:
        return None
    name, kwargs = _split_name(stage.masker)
    return components.masker.build(name, **kwargs)


def build_teacher(stage: Any, components: Any, student: Backbone, folder: Any) -> Optional[nn.Module]:
    """The stage's teacher (frozen or EMA), or None when the stage names none."""
    if not stage.teacher:
        return None
    name, kwargs = _split_name(stage.teacher)
    if "folder" in inspect.signature(components.teacher.entry(name).factory).parameters:
        kwargs["folder"] = folder
    return components.teacher.build(name, student=student, **kwargs)


def build_objectives(stage: Any, components: Any, backbone: Backbone,
                     teacher: Optional[nn.Module] = None) -> tuple[nn.ModuleDict, dict[str, float]]:
    """The stage's objectives (label -> module) and their loss weights.

    Factories get ``dim`` and ``tokenizer`` (the student's), and ``teacher_dim`` when they take it.

    Raises:
        ValueError: an objective needs a masker or a teacher that the stage does not give.
    """
    modules, weights = nn.ModuleDict(), {}
    for label, node, weight in objective_nodes(stage):
        name = node.pop("name")
        factory = components.objective.entry(name).factory
        if getattr(factory, "needs_mask", False) and not stage.masker:
            raise ValueError(f"objective {label!r} ({name}) needs a masker: set the stage's `masker:`")
        if getattr(factory, "needs_teacher", False) and teacher is None:
            raise ValueError(f"objective {label!r} ({name}) needs a teacher: set the stage's `teacher:` (ema, stage, timm)")
        if "teacher_dim" in inspect.signature(factory).parameters:
            node.setdefault("teacher_dim", getattr(teacher, "dim", None))
        modules[label] = components.objective.build(name, dim=backbone.encoder.dim, tokenizer=backbone.tokenizer, **node)
        weights[label] = weight
    return modules, weights


def stage_objectives(folder: RunFolder, components: Any, backbone: Backbone, name: str, stage: Any) -> Optional[nn.ModuleDict]:
    """A finished stage's objectives with their trained weights (heads, decoders, text towers)."""
    final = folder.final(name)
    if not final.is_file():
        return None
    teacher = build_teacher(stage, components, backbone, folder)
    objectives, _ = build_objectives(stage, components, backbone, teacher)
    load_model_state(objectives, load_checkpoint(final)["objectives"], f"{final} (objectives)")
    return objectives.to(next(backbone.parameters()).device).eval()
