"""The video modality: the ``tubelet`` tokenizer; video files, frame folders, ``.npy`` clips and the
generated moving digits; ``modality=video`` is its config (``configs/modality/``)."""

from ...tokenizers.video import TubeletTokenizer
from .. import hookimpl
from ..environment import package_status
from . import data, moving_digits


@hookimpl
def register_tokenizers():
    return {"tubelet": TubeletTokenizer}


@hookimpl
def register_datasets():
    return {"moving_digits": moving_digits.MovingDigitsDataset, "video_folder": data.VideoFileDataset,
            "frame_folder": data.FrameFolderDataset, "npy_video": data.NpyVideoDataset}


@hookimpl
def report_environment():
    return {"av": package_status("av", "av")}
