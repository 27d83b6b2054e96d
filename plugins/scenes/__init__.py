"""Multi-sensor scenes: generated streets seen by a calibrated front camera and roof lidar at once
(``street_scenes``); ``modality=street_scenes`` is its config (``configs/modality/``), whose
backbone tokenizes both sensors. The geometry that links them is in `anymodal.core.geometry`."""

from .. import hookimpl
from ..environment import package_status
from . import data, mcap_data, nuscenes


@hookimpl
def register_datasets():
    return {"street_scenes": data.StreetScenesDataset, "mcap_scenes": mcap_data.McapScenesDataset,
            "nuscenes": nuscenes.NuScenesDataset}


@hookimpl
def report_environment():
    return {"mcap": package_status("mcap", "mcap"), "mcap-ros2-support": package_status("mcap_ros2", "mcap-ros2-support")}
