"""The built-in plugin: maskers, the image modality and the objectives shipped with anymodal.

Registered through the same hooks as any outside plugin, so there is one way in.
"""

from __future__ import annotations

from ...core.masking import BlockMasker, MultiBlockMasker, RandomMasker, TubeMasker
from ...objectives.masked_pixel import MaskedPixel
from ...tokenizers.image import ImagePatchTokenizer
from .. import hookimpl
from . import image_data


@hookimpl
def register_tokenizers():
    return {"image_patch": ImagePatchTokenizer}


@hookimpl
def register_datasets():
    return {
        "mnist": image_data.MnistDataset,
        "digits": image_data.DigitsDataset,
        "image_folder": image_data.ImageFolderDataset,
    }


@hookimpl
def register_transforms():
    return {
        "random_resized_crop": image_data.RandomResizedCrop,
        "random_horizontal_flip": image_data.RandomHorizontalFlip,
        "resize": image_data.Resize,
        "normalize": image_data.Normalize,
        "random_translate": image_data.RandomTranslate,
    }


@hookimpl
def register_maskers():
    return {"random": RandomMasker, "block": BlockMasker, "tube": TubeMasker, "multiblock": MultiBlockMasker}


@hookimpl
def register_objectives():
    return {"masked_pixel": MaskedPixel}
