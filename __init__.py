"""anymodal: self-supervised pre-training for any sensor."""

__version__ = "0.1.0"
