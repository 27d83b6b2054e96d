"""The built-in plugin: maskers, the image modality and the objectives shipped with anymodal.

Registered through the same hooks as any outside plugin, so there is one way in.
"""

from __future__ import annotations

from ...core.masking import BlockMasker, MultiBlockMasker, RandomMasker, TubeMasker
from ...core.teachers import EmaTeacher, StageTeacher, TimmTeacher
from ...objectives.contrastive import Contrastive
from ...objectives.distill import MaskedDistill, UnmaskedTokenDistill
from ...objectives.jepa import Jepa
from ...objectives.masked_pixel import MaskedPixel
from ...tokenizers.audio import SpectrogramFrameTokenizer, SpectrogramPatchTokenizer
from ...tokenizers.image import ImagePatchTokenizer
from ...tokenizers.pillars import PillarTokenizer
from ...tokenizers.points import PointPatchTokenizer
from ...tokenizers.text import ByteTextTokenizer, ClipBpeTokenizer
from ...tokenizers.video import TubeletTokenizer
from .. import hookimpl
from . import (audio_data, image_data, image_transforms, lidar_data, lidar_scenes, moving_digits, point_transforms,
               real_speech, video_data)


@hookimpl
def register_tokenizers():
    return {"image_patch": ImagePatchTokenizer, "tubelet": TubeletTokenizer, "byte_text": ByteTextTokenizer,
            "clip_bpe": ClipBpeTokenizer, "point_patch": PointPatchTokenizer, "pillar": PillarTokenizer,
            "spectrogram_patch": SpectrogramPatchTokenizer, "spectrogram_frames": SpectrogramFrameTokenizer}


@hookimpl
def register_datasets():
    return {
        "mnist": image_data.MnistDataset,
        "digits": image_data.DigitsDataset,
        "image_folder": image_data.ImageFolderDataset,
        "moving_digits": moving_digits.MovingDigitsDataset,
        "video_folder": video_data.VideoFileDataset,
        "frame_folder": video_data.FrameFolderDataset,
        "npy_video": video_data.NpyVideoDataset,
        "point_folder": lidar_data.PointFolderDataset,
        "aerial_tile": lidar_data.AerialTileDataset,
        "shapes": lidar_scenes.ShapesDataset,
        "lidar_sweeps": lidar_scenes.LidarSweepsDataset,
        "audio_manifest": audio_data.AudioManifestDataset,
        "spoken_digits": audio_data.SpokenDigitsDataset,
        "speech_sample": real_speech.SpeechSampleDataset,
    }


@hookimpl
def register_transforms():
    return {
        "random_resized_crop": image_transforms.RandomResizedCrop,
        "random_horizontal_flip": image_transforms.RandomHorizontalFlip,
        "resize": image_transforms.Resize,
        "normalize": image_transforms.Normalize,
        "random_translate": image_transforms.RandomTranslate,
        "range_crop": point_transforms.RangeCrop,
        "rotate_z": point_transforms.RotateZ,
        "random_flip": point_transforms.RandomFlip,
        "point_dropout": point_transforms.PointDropout,
        "jitter": point_transforms.Jitter,
        "subsample": point_transforms.Subsample,
        "random_crop_audio": audio_data.RandomCropAudio,
        "random_gain": audio_data.RandomGain,
        "time_mask": audio_data.TimeMask,
        "freq_mask": audio_data.FreqMask,
        "add_noise": audio_data.AddNoise,
    }


@hookimpl
def register_maskers():
    return {"random": RandomMasker, "block": BlockMasker, "tube": TubeMasker, "multiblock": MultiBlockMasker}


@hookimpl
def register_objectives():
    return {"masked_pixel": MaskedPixel, "contrastive": Contrastive, "jepa": Jepa, "distill": UnmaskedTokenDistill, "masked_distill": MaskedDistill}


@hookimpl
def register_teachers():
    return {"ema": EmaTeacher, "stage": StageTeacher, "timm": TimmTeacher}
