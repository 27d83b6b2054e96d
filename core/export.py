"""Export a pre-trained backbone as safetensors plus the config that rebuilds it."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Backbone
from .checkpoint import CheckpointError, load_model_state
from .runfolder import RunFolder

__all__ = ["export_backbone", "load_exported", "read_exported"]

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
    load_model_state(backbone, read_exported(path), f"exported backbone {path}")
    return backbone


def read_exported(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an exported ``backbone.safetensors``.

    Raises:
        CheckpointError: the file is missing, or corrupt or truncated (the message says how to write it again).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported backbone {path} does not exist; {_export_again(path.parent)}")
    try:
        return load_file(str(path))
    except SafetensorError as e:  # the header or the tensors it lists do not fit the file
        raise CheckpointError(f"exported backbone {path} is corrupt or truncated ({e}); {_export_again(path.parent)}") from e


def _export_again(folder: Path) -> str:
    if folder.name == "export" and RunFolder(folder.parent).config.is_file():  # a run folder's export/
        return f"write it from the run's last checkpoint with: anymodal export {folder.parent}"
    return f"write it from a run's checkpoint with: anymodal export RUN_DIR --out {folder}"
