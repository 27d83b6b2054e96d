"""The lidar modality: ``point_patch`` (objects) and ``pillar`` (sweeps) tokenizers; point-cloud files,
the real aerial tile, generated shapes and street sweeps; point transforms; ``modality=lidar`` and
``modality=lidar_sweep`` are its configs (``configs/modality/``)."""

from ...tokenizers.pillars import PillarTokenizer
from ...tokenizers.points import PointPatchTokenizer
from .. import hookimpl
from ..environment import package_status
from . import data, scenes, transforms


@hookimpl
def register_tokenizers():
    return {"point_patch": PointPatchTokenizer, "pillar": PillarTokenizer}


@hookimpl
def register_datasets():
    return {"point_folder": data.PointFolderDataset, "aerial_tile": data.AerialTileDataset,
            "shapes": scenes.ShapesDataset, "lidar_sweeps": scenes.LidarSweepsDataset}


@hookimpl
def register_transforms():
    return {"range_crop": transforms.RangeCrop, "rotate_z": transforms.RotateZ, "random_flip": transforms.RandomFlip,
            "point_dropout": transforms.PointDropout, "jitter": transforms.Jitter, "subsample": transforms.Subsample}


@hookimpl
def report_environment():
    return {"laspy": package_status("laspy", "laspy")}
