"""The image modality: the ``image_patch`` tokenizer, MNIST, generated digits and image folders, and
image transforms; ``modality=image`` and ``modality=digits`` are its configs (``configs/modality/``)."""

from ...tokenizers.image import ImagePatchTokenizer
from .. import hookimpl
from . import data, transforms


@hookimpl
def register_tokenizers():
    return {"image_patch": ImagePatchTokenizer}


@hookimpl
def register_datasets():
    return {"mnist": data.MnistDataset, "digits": data.DigitsDataset, "image_folder": data.ImageFolderDataset}


@hookimpl
def register_transforms():
    return {"random_resized_crop": transforms.RandomResizedCrop, "random_horizontal_flip": transforms.RandomHorizontalFlip,
            "resize": transforms.Resize, "normalize": transforms.Normalize, "random_translate": transforms.RandomTranslate}
