"""A pre-trained encoder for the people who use it: raw modality input in, features out.

`load_backbone` reads a run folder, one of its checkpoints, or an export folder (``anymodal
export``) and returns a `PretrainedEncoder`: a plain ``nn.Module`` holding the tokenizer and the
encoder, with no trainer, objective or config machinery left in it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from .backbone import Backbone

__all__ = ["PretrainedEncoder", "load_backbone", "load_checkpoint_backbone", "backbone_config", "example_input"]


class PretrainedEncoder(nn.Module):
    """A pre-trained backbone on raw input of its modality.

    ``forward(x, padding=None)`` returns the encoded tokens ``[B, N, D]`` (the class token left
    out) and ``features(x, padding=None)`` one pooled vector per sample ``[B, D]`` (the run's
    ``model.pool``: the mean over real tokens, or the class token). ``x`` is what the modality's
    dataset gives under `input_key`, batched: images ``[B, C, H, W]``, clips ``[B, T, C, H, W]``,
    waveforms ``[B, T]``, point clouds ``[B, N, C]``. Ragged input (point clouds, waveforms of
    several lengths) is zero-padded to the longest with ``padding [B, N]``, True at padding.

    Attributes:
        backbone: the `Backbone` (its ``state_dict`` is the exported weights).
        input_key: the sample field ``x`` is.
        dim: the feature width ``D``.
        modality: the modality's name.
        ragged: whether the input may come with ``padding`` (its tokenizer takes ragged input).
    """

    def __init__(self, backbone: Backbone, modality: str, sensor: Optional[str] = None) -> None:
        super().__init__()
        self.backbone = backbone
        for module in backbone.modules():  # reconstruction targets are for training only
            if hasattr(module, "make_targets"):
                module.make_targets = False
        self.input_key = sensor or backbone.sensor
        backbone.tokenizer_of(self.input_key)  # KeyError naming the sensors when there is no such one
        self.dim = backbone.encoder.dim
        self.modality = modality
        self.ragged = "padding" in inspect.signature(backbone.tokenizer_of(self.input_key).forward).parameters

    def _encoded(self, x: Tensor, padding: Optional[Tensor]) -> Any:
        batch = {self.input_key: x} if padding is None else {self.input_key: x, f"{self.input_key}_padding": padding}
        sensor = None if self.input_key == self.backbone.sensor else self.input_key
        return self.backbone.encode(self.backbone.tokenize(batch, sensor))

    def forward(self, x: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        """Encoded tokens ``[B, N, D]``."""
        return self._encoded(x, padding).tokens.x

    def features(self, x: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        """Pooled features ``[B, D]``."""
        return self.backbone.pool(self._encoded(x, padding))

    def outputs(self, x: Tensor, padding: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens [B, N, D], token_padding [B, N], features [B, D])`` at once (what the ONNX and
        ``torch.export`` graphs return); ``token_padding`` is True at tokens that stand for no input
        (a ragged batch's shorter samples; a sweep's empty pillar slots)."""
        encoded = self._encoded(x, padding)
        tokens = encoded.tokens
        token_padding = tokens.padding if tokens.padding is not None else torch.zeros(
            tokens.x.shape[:2], dtype=torch.bool, device=tokens.x.device)
        return tokens.x, token_padding, self.backbone.pool(encoded)


def backbone_config(cfg: Any) -> DictConfig:
    """A full config from one holding at least ``plugins``, ``model`` and ``modality`` (an export's
    ``config.yaml``), the rest the schema's defaults."""
    from .schema import Config

    part = {k: cfg[k] for k in ("plugins", "model", "modality") if k in cfg}
    return OmegaConf.merge(OmegaConf.structured(Config), part)


def load_backbone(source: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None,
                  sensor: Optional[str] = None) -> PretrainedEncoder:
    """The pre-trained encoder of ``source``, in eval mode on the CPU.

    Args:
        source: a run folder (its ``export/`` when there is one, else its last checkpoint), an
            export folder (``backbone.safetensors`` and ``config.yaml``), or a checkpoint file of a run.
        checkpoint: a run folder's checkpoint to read instead of its export or last one.
        sensor: the sensor of a multi-sensor (scene) backbone to encode; default the first.

    Raises:
        anymodal.core.checkpoint.CheckpointError: a missing, corrupt or foreign weights file.
        FileNotFoundError: ``source`` is none of the above.
    """
    from .config import load_run_config
    from .export import CONFIG, WEIGHTS, load_exported
    from .runfolder import RunFolder
    from ..plugins.manager import load_components

    path = Path(source)
    if path.is_file():  # a checkpoint: its run folder is the one holding checkpoints/
        checkpoint, path = path, path.parent.parent if path.parent.name == "checkpoints" else path.parent
    folder = RunFolder(path)
    if (path / WEIGHTS).is_file() and (path / CONFIG).is_file() and not folder.checkpoints.is_dir():
        cfg = backbone_config(OmegaConf.load(path / CONFIG))
        backbone = load_exported(_build(cfg, load_components), path)
    elif folder.config.is_file():
        cfg = load_run_config(path)
        if checkpoint is None and (folder.export / WEIGHTS).is_file():
            backbone = load_exported(_build(cfg, load_components), folder.export)
        else:
            backbone = load_checkpoint_backbone(_build(cfg, load_components), Path(checkpoint) if checkpoint else folder.last)
    else:
        raise FileNotFoundError(f"{source} is neither a run folder, an export folder ({WEIGHTS} and {CONFIG}) "
                                "nor a checkpoint of a run")
    return PretrainedEncoder(backbone, str(cfg.modality.name), sensor).eval()


def _build(cfg: DictConfig, load_components: Any) -> Backbone:
    from .build import build_backbone

    return build_backbone(cfg, load_components(cfg.plugins))


def load_checkpoint_backbone(backbone: Backbone, ckpt: Path) -> Backbone:
    """``backbone`` with the weights of run checkpoint ``ckpt`` (or of the FSDP shard folder it names)."""
    from .checkpoint import checkpoint_part, load_checkpoint, load_model_state, shard_folder

    state = load_checkpoint(ckpt)
    shards = shard_folder(ckpt, state)
    if shards is not None:  # FSDP: the weights are in the shard folder it names
        from .parallel import load_backbone_from_shards

        load_backbone_from_shards(shards, backbone)
    else:
        load_model_state(backbone, checkpoint_part(state, "backbone", ckpt), f"checkpoint {ckpt}")
    return backbone


def example_input(cfg: DictConfig, encoder: PretrainedEncoder, samples: int = 2) -> tuple[Tensor, ...]:
    """A batch of ``samples`` real inputs from the config's test (else train) dataset, as the
    encoder takes them: ``(x,)`` or ``(x, padding)``; what graph exporters trace and check with."""
    from .build import build_dataset
    from .data import collate
    from ..plugins.manager import load_components

    components = load_components(cfg.plugins)
    split = "test" if cfg.data.get("test") else "train"
    dataset = build_dataset(cfg, split, components)
    batch = collate([dataset[i] for i in range(min(samples, len(dataset)))])
    key = encoder.input_key
    x = batch[key]
    if not encoder.ragged:
        return (x,)
    padding = batch.get(f"{key}_padding")  # absent when the samples are of one length
    return x, padding if padding is not None else torch.zeros(x.shape[:2], dtype=torch.bool)
