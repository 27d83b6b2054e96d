"""Export a pre-trained backbone as safetensors plus the config that rebuilds it."""

from __future__ import annotations

from pathlib import Path
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from .backbone import Backbone
from .checkpoint import load_model_state

__all__ = ["export_backbone", "load_exported"]

WEIGHTS = "backbone.safetensors"
CONFIG = "config.yaml"


def export_backbone(backbone: Backbone, cfg: DictConfig, folder: Path) -> Path:
    """Write ``backbone.safetensors`` and ``config.yaml`` (model, modality, plugins) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "anymodal-backbone", "modality": str(cfg.modality.name)})
    tmp.replace(folder / WEIGHTS)
    part = OmegaConf.create({"plugins": cfg.plugins, "model": cfg.model, "modality": cfg.modality})
    (folder / CONFIG).write_text(OmegaConf.to_yaml(part, resolve=True))
    return folder / WEIGHTS


def load_exported(backbone: Backbone, folder: Path) -> Backbone:
    """Load exported weights into a backbone built from the same model and modality config."""
    path = Path(folder) / WEIGHTS
    load_model_state(backbone, load_file(str(path)), f"exported backbone {path}")
    return backbone
