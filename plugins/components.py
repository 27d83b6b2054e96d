"""The modality-free components: maskers, objectives and teachers. A plugin like the modalities'
(the ``components`` entry point), so every name has one way in."""

from ..core.masking import BlockMasker, MultiBlockMasker, RandomMasker, TubeMasker
from ..core.teachers import EmaTeacher, StageTeacher, TimmTeacher
from ..objectives.contrastive import Contrastive
from ..objectives.distill import MaskedDistill, UnmaskedTokenDistill
from ..objectives.image_to_lidar import ImageToLidar
from ..objectives.jepa import Jepa
from ..objectives.masked_pixel import MaskedPixel
from ..core.shards import ShardDataset
from . import hookimpl


@hookimpl
def register_datasets():
    return {"shards": ShardDataset}


@hookimpl
def register_maskers():
    return {"random": RandomMasker, "block": BlockMasker, "tube": TubeMasker, "multiblock": MultiBlockMasker}


@hookimpl
def register_objectives():
    return {"masked_pixel": MaskedPixel, "contrastive": Contrastive, "jepa": Jepa, "distill": UnmaskedTokenDistill,
            "masked_distill": MaskedDistill, "image_to_lidar": ImageToLidar}


@hookimpl
def register_teachers():
    return {"ema": EmaTeacher, "stage": StageTeacher, "timm": TimmTeacher}
