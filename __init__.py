"""anymodal: self-supervised pre-training for any sensor."""

__version__ = "0.1.0"


def load_backbone(source, checkpoint=None, sensor=None):  # noqa: ANN001, ANN201 (typed in core.pretrained)
    """A pre-trained encoder from a run folder, a checkpoint or an export folder: see
    `anymodal.core.pretrained.load_backbone` (imported on first use, so ``import anymodal`` stays light)."""
    from .core.pretrained import load_backbone as load

    return load(source, checkpoint, sensor)
