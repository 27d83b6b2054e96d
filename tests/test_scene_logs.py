"""Real AV log formats as scene data: ROS 2 MCAP recordings (written by mcap-ros2-support's writer)
and the nuScenes layout, both exported from the generated streets, so each round trip is checked
against what the simulator put there; then the ways such files go wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mcap_ros2")

from anymodal.core.errors import CorruptFileError, DataError  # noqa: E402
from anymodal.core.geometry import project_points  # noqa: E402
from anymodal.plugins.scenes.data import StreetScenesDataset  # noqa: E402
from anymodal.plugins.scenes.export import export_mcap, export_nuscenes  # noqa: E402
from anymodal.plugins.scenes.mcap_data import McapScenesDataset  # noqa: E402
from anymodal.plugins.scenes.nuscenes import MINI_TRAIN, NuScenesDataset  # noqa: E402
from anymodal.plugins.scenes.ros import MSGDEFS, cloud_message, ros_time  # noqa: E402

GEOMETRY = ("lidar_top", "lidar_top/labels", "lidar_top/extrinsics", "cam_front/intrinsics", "cam_front/extrinsics", "ego_pose")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mcap")
    export_mcap(out, "train", streets=2, frames_per_street=3)
    export_mcap(out, "test", streets=1, frames_per_street=3)
    export_mcap(out / "variant", "test", streets=1, frames_per_street=3, image="raw", radar=True, padding=4)
    return out


@pytest.fixture(scope="module")
def nuscenes(tmp_path_factory) -> Path:
    return export_nuscenes(tmp_path_factory.mktemp("nuscenes") / "mini", frames_per_street=2)


def _pixels(sample: dict, intrinsics: torch.Tensor, extrinsics: torch.Tensor) -> torch.Tensor:
    """Where the sample's lidar points land in its camera, by the given calibration (ego frame via the lidar's extrinsics)."""
    lidar = sample["lidar_top/extrinsics"].double()
    ego = sample["lidar_top"][:, :3].double() @ lidar[:3, :3].T + lidar[:3, 3]
    projection = project_points(ego[None].float(), intrinsics[None, None], extrinsics[None, None], (128, 256))
    return torch.where(projection.valid[..., None], projection.uv, torch.zeros_like(projection.uv))[0, 0]


def _same_geometry(read: dict, made: dict) -> None:
    for key in GEOMETRY:
        torch.testing.assert_close(read[key].double(), made[key].double(), atol=1e-4, rtol=0, msg=key)
    # a point projected through the recovered calibration lands where the simulator's put it
    torch.testing.assert_close(_pixels(read, read["cam_front/intrinsics"], read["cam_front/extrinsics"]),
                               _pixels(made, made["cam_front/intrinsics"], made["cam_front/extrinsics"]), atol=1e-3, rtol=0)
    assert read["text"] == made["text"] and read["label"] == made["label"]


class _Msg:
    """A decoded ROS message as mcap-ros2-support gives it: attributes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _field(name, offset, datatype, count=1):
    return _Msg(name=name, offset=offset, datatype=datatype, count=count)


def test_pointcloud2_layouts_read_by_offset() -> None:
    from anymodal.plugins.scenes.ros import cloud_arrays

    # an organised 2x3 cloud, big-endian, fields out of order with a gap (ring uint16 at 0, x y z
    # float32 at 4.., intensity float64 at 20, time float32 at 28), 4 bytes of point padding and 8 of row padding
    dtype = np.dtype({"names": ["ring", "x", "y", "z", "intensity", "t"], "formats": [">u2", ">f4", ">f4", ">f4", ">f8", ">f4"],
                      "offsets": [0, 4, 8, 12, 20, 28], "itemsize": 36})
    points = np.zeros((2, 3), dtype)
    points["x"] = [[0, 1, np.nan], [3, 4, 5]]
    points["y"], points["z"], points["ring"] = 1.5, -2.0, [[0, 0, 0], [1, 1, 1]]
    points["intensity"], points["t"] = 0.25, [[0.0, 0.1, 0.2], [0.3, 0.4, 0.5]]
    rows = b"".join(points[r].tobytes() + b"\xff" * 8 for r in range(2))
    fields = [_field("ring", 0, 4), _field("x", 4, 7), _field("y", 8, 7), _field("z", 12, 7), _field("intensity", 20, 8),
              _field("t", 28, 7)]
    msg = _Msg(fields=fields, is_bigendian=True, point_step=36, row_step=36 * 3 + 8, height=2, width=3, data=rows)
    cols = cloud_arrays(msg, "here")
    np.testing.assert_array_equal(cols["x"], [0, 1, 3, 4, 5])  # the NaN hole of the organised cloud is dropped
    np.testing.assert_array_equal(cols["ring"], [0, 0, 1, 1, 1])
    np.testing.assert_allclose(cols["t"], [0.0, 0.1, 0.3, 0.4, 0.5], atol=1e-7)
    assert cols["intensity"].dtype == np.float64 and (cols["intensity"] == 0.25).all()
    with pytest.raises(DataError, match=r"here: PointCloud2 of 2x3 points of 36 bytes \(row_step 116\) needs 232 bytes, it holds 200"):
        cloud_arrays(_Msg(**{**msg.__dict__, "data": rows[:200]}), "here")
    with pytest.raises(DataError, match="field 'x' has datatype 9"):
        cloud_arrays(_Msg(**{**msg.__dict__, "fields": [_field("x", 4, 9), *fields[2:]]}), "here")


def test_image_encodings() -> None:
    from anymodal.plugins.scenes.ros import compressed_image_message, image_array

    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 5)).astype(np.float32) / 255
    bgr = (rgb[::-1].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    padded = b"".join(row.tobytes() + b"\0\0" for row in bgr)
    got = image_array(_Msg(encoding="bgr8", height=4, width=5, step=17, data=padded), "sensor_msgs/msg/Image", "here")
    np.testing.assert_allclose(got, rgb, atol=1e-6)
    png = compressed_image_message(rgb, "cam", 0, "png")
    np.testing.assert_allclose(image_array(_Msg(**png), "sensor_msgs/msg/CompressedImage", "here"), rgb, atol=1e-6)
    with pytest.raises(DataError, match="Image encoding '16UC1' is not read"):
        image_array(_Msg(encoding="16UC1", height=4, width=5, step=10, data=b""), "sensor_msgs/Image", "here")
    with pytest.raises(DataError, match=r"here: CompressedImage \(jpeg\) does not decode"):
        image_array(_Msg(format="jpeg", data=b"\xff\xd8 not a jpeg"), "sensor_msgs/msg/CompressedImage", "here")


def test_quaternions_and_pose_interpolation() -> None:
    from anymodal.plugins.scenes.data import _rigid
    from anymodal.plugins.scenes.rotations import interpolate_rigid, quaternion_from_rotation, rigid_from_quaternion

    for yaw, pitch in [(0.3, 0.1), (3.1, -0.2), (-2.0, 1.4), (np.pi, 0.0)]:
        m = _rigid(yaw, pitch, (1, 2, 3))
        np.testing.assert_allclose(rigid_from_quaternion(m[:3, 3], quaternion_from_rotation(m[:3, :3])), m, atol=1e-12)
    a, b = _rigid(0.0, 0.0, (0, 0, 0)), _rigid(0.4, 0.0, (2, 0, 0))
    np.testing.assert_allclose(interpolate_rigid(a, b, 0.5), _rigid(0.2, 0.0, (1, 0, 0)), atol=1e-12)
    with pytest.raises(ValueError, match="finite and non-zero"):
        rigid_from_quaternion([0, 0, 0], [0, 0, 0, 0])


def test_mcap_round_trip_is_the_simulator(recordings) -> None:
    data = McapScenesDataset(recordings, "train")
    made = StreetScenesDataset("train", size=6, frames_per_street=3)
    assert len(data) == 6 and data.skipped == []
    for i in range(6):
        read = data[i]
        _same_geometry(read, made[i])
        # the JPEG camera image is close, not equal; the stamps are the recording's, from its start
        assert (read["cam_front"] - made[i]["cam_front"]).abs().mean() < 0.02
        assert read["lidar_top/timestamp"] - read["cam_front/timestamp"] == pytest.approx(0.01, abs=1e-6)
    assert data[3]["frame"].startswith("street-0001/")


def test_mcap_raw_images_padded_clouds_and_radar(recordings) -> None:
    sensors = {"lidar_top": {"points": "/lidar_top/points", "labels": "label"},
               "cam_front": {"image": "/cam_front/image", "camera_info": "/cam_front/camera_info"},
               "radar_front": {"points": "/radar_front/points", "fields": ["x", "y", "z", "doppler", "rcs"], "labels": "label"}}
    data = McapScenesDataset(recordings / "variant", "test", sensors=sensors)
    made = StreetScenesDataset("test", size=3, frames_per_street=3, radar=True)
    for i in range(3):
        read = data[i]
        _same_geometry(read, made[i])
        assert (read["cam_front"] - made[i]["cam_front"]).abs().max() <= 0.5 / 255 + 1e-6  # rgb8: rounding only
        for key in ("radar_front", "radar_front/labels"):
            torch.testing.assert_close(read[key].double(), made[i][key].double(), atol=1e-5, rtol=0)
        # the radar's extrinsics: its stamp is 20 ms after the camera's; the ego holds still within a frame
        torch.testing.assert_close(read["radar_front/extrinsics"], made[i]["radar_front/extrinsics"], atol=1e-4, rtol=0)


def test_images_resized_on_read_keep_their_calibration(recordings, nuscenes) -> None:
    """image_size on either reader: the picture is resized and the intrinsics scale with it, so the
    lidar points still land on the same part of the image."""
    sensors = {"lidar_top": {"points": "/lidar_top/points", "labels": "label"},
               "cam_front": {"image": "/cam_front/image/compressed", "camera_info": "/cam_front/camera_info",
                             "image_size": [64, 96]}}
    for small, full in ((McapScenesDataset(recordings, "train", sensors=sensors)[0], McapScenesDataset(recordings, "train")[0]),
                        (NuScenesDataset(nuscenes, "train", image_size=[64, 96])[0], NuScenesDataset(nuscenes, "train")[0])):
        assert small["cam_front"].shape == (3, 64, 96)
        k = full["cam_front/intrinsics"].double()
        torch.testing.assert_close(small["cam_front/intrinsics"].double(), torch.diag(k.new_tensor([96 / 256, 64 / 128, 1.0])) @ k)
        # the mean colour of a resized image is that of the full one (antialiased)
        assert (small["cam_front"].mean((1, 2)) - full["cam_front"].mean((1, 2))).abs().max() < 0.01


def test_mcap_index_is_cached_beside_the_recording_and_rebuilt_when_it_changes(recordings, tmp_path) -> None:
    recording = tmp_path / "a.mcap"
    shutil.copy(recordings / "train" / "street-0000.mcap", recording)
    McapScenesDataset(recording)
    cache = tmp_path / "a.mcap.anymodal-index.npz"
    first = cache.stat().st_mtime_ns
    McapScenesDataset(recording)
    assert cache.stat().st_mtime_ns == first  # read, not rebuilt
    os.utime(recording, ns=(first + 10**9, first + 10**9))
    McapScenesDataset(recording)
    assert cache.stat().st_mtime_ns != first  # the recording changed: indexed again
    cache.write_bytes(b"not an index")  # a damaged cache is rebuilt, not trusted
    assert len(McapScenesDataset(recording)) == 3
    with np.load(cache, allow_pickle=False) as z:
        assert z["messages"].shape[1] == 6


def test_mcap_frames_in_loader_workers_are_the_same(recordings) -> None:
    from anymodal.core.data import AugmentedDataset, make_loader

    data = McapScenesDataset(recordings, "train")
    alone = {data[i]["frame"]: data[i]["lidar_top"] for i in range(len(data))}
    loader = make_loader(AugmentedDataset(data, [], "lidar_top", 0), len(data), seed=0, num_workers=2)
    batch = next(iter(loader))  # each worker opens the recordings itself
    for j, frame in enumerate(batch["frame"]):
        n = int((~batch["lidar_top_padding"][j]).sum())
        torch.testing.assert_close(batch["lidar_top"][j, :n], alone[frame])
    assert sorted(batch["frame"]) == sorted(alone)


def _cut(path: Path, fraction: float, out: Path) -> Path:
    data = path.read_bytes()
    out.write_bytes(data[:int(len(data) * fraction)])
    return out


def test_truncated_recording_keeps_its_readable_prefix_and_reports_the_loss(recordings, tmp_path, caplog) -> None:
    whole = recordings / "train" / "street-0000.mcap"
    cut = _cut(whole, 0.7, tmp_path / "cut.mcap")
    data = McapScenesDataset(cut)
    assert 0 < len(data) < 3
    (where, reason), = data.skipped[:1]
    assert where == str(cut) and "unreadable from byte" in reason and f"of {cut.stat().st_size:,}" in reason
    assert "using the readable prefix" in caplog.text
    _same_geometry(data[0], StreetScenesDataset("train", size=1, frames_per_street=3)[0])
    with pytest.raises(CorruptFileError, match="unreadable from byte"):
        McapScenesDataset(cut, strict=True)
    with pytest.raises(CorruptFileError, match="not a readable MCAP recording"):
        McapScenesDataset(_cut(whole, 0.001, tmp_path / "stub.mcap"))


def _write(path: Path, fields=("x", "y", "z", "intensity"), tf_static: bool = True, caption_on_points: bool = False,
           ego=((0, 0.0),), lidar_at: int = 0) -> Path:
    """A one-frame recording made by hand: a lidar cloud (with these fields) ``lidar_at`` ns after the
    camera, tf (map -> base_link at x metres for each (ns after the camera, x) of ``ego``)."""
    from mcap_ros2.writer import Writer

    from anymodal.plugins.scenes.ros import compressed_image_message

    t = 1_000_000_000
    with open(path, "wb") as f:
        w = Writer(f)
        schemas = {n.split("/")[-1]: w.register_msgdef(n, d) for n, d in MSGDEFS.items()}
        identity = {"translation": {"x": 0.0, "y": 0.0, "z": 0.0}, "rotation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}}
        if tf_static:
            w.write_message("/tf_static", schemas["TFMessage"], {"transforms": [
                {"header": {"stamp": ros_time(t), "frame_id": "base_link"}, "child_frame_id": c, "transform": identity}
                for c in ("lidar_top", "cam_front")]}, log_time=t)
        for dt, x in ego:
            moved = {**identity, "translation": {"x": x, "y": 0.0, "z": 0.0}}
            w.write_message("/tf", schemas["TFMessage"], {"transforms": [
                {"header": {"stamp": ros_time(t + dt), "frame_id": "map"}, "child_frame_id": "base_link", "transform": moved}]},
                log_time=t + dt)
        cloud = {name: np.arange(4, dtype=np.float32) for name in fields}
        if caption_on_points:
            w.write_message("/lidar_top/points", schemas["String"], {"data": "not a cloud"}, log_time=t)
        else:
            w.write_message("/lidar_top/points", schemas["PointCloud2"], cloud_message(cloud, "lidar_top", t + lidar_at),
                            log_time=t + lidar_at)
        w.write_message("/cam_front/image/compressed", schemas["CompressedImage"],
                        compressed_image_message(np.zeros((3, 16, 32)), "cam_front", t), log_time=t)
        w.write_message("/cam_front/camera_info", schemas["CameraInfo"], {
            "header": {"stamp": ros_time(t), "frame_id": "cam_front"}, "height": 16, "width": 32, "distortion_model": "",
            "d": [], "k": [20.0, 0, 16, 0, 20.0, 8, 0, 0, 1], "r": [1.0, 0, 0, 0, 1, 0, 0, 0, 1], "p": [0.0] * 12}, log_time=t)
        w.finish()
    return path


def test_mcap_input_mistakes_name_file_topic_and_frame(tmp_path) -> None:
    plain = dict(text_topic=None, label_topic=None, sensors={"lidar_top": {"points": "/lidar_top/points"},
                                                             "cam_front": {"image": "/cam_front/image/compressed",
                                                                           "camera_info": "/cam_front/camera_info"}})
    sample = McapScenesDataset(_write(tmp_path / "ok.mcap"), **plain)[0]
    assert sample["lidar_top"].shape == (4, 4) and sample["cam_front"].shape == (3, 16, 32)
    assert sample["cam_front/intrinsics"][0, 2] == 16.5  # ROS centres pixels on integers; anymodal on halves
    with pytest.raises(DataError, match=r"no\.mcap: topic '/lidar_top/points' \(lidar_top\) carries std_msgs/msg/String"):
        McapScenesDataset(_write(tmp_path / "no.mcap", caption_on_points=True), **plain)
    with pytest.raises(DataError, match=r"xy\.mcap: topic /lidar_top/points: PointCloud2 has no z field \(its fields: x, y, intensity\)"):
        McapScenesDataset(_write(tmp_path / "xy.mcap", fields=("x", "y", "intensity")), **plain)[0]
    with pytest.raises(DataError, match=r"PointCloud2 has no field 'intensity' that sensor 'lidar_top' reads \(its fields: x, y, z\)"):
        McapScenesDataset(_write(tmp_path / "xyz.mcap", fields=("x", "y", "z")), **plain)[0]
    with pytest.raises(DataError, match=r"notf\.mcap: no transform from 'lidar_top' \(the frame_id of /lidar_top/points\) "
                                        r"to ego frame 'base_link' in /tf_static or /tf .*frames there: base_link, map"):
        McapScenesDataset(_write(tmp_path / "notf.mcap", tf_static=False), **plain)
    with pytest.raises(DataError, match=r"no topic '/caption' \(text\)"):
        McapScenesDataset(tmp_path / "ok.mcap", sensors=plain["sensors"])
    with pytest.raises(DataError, match="unknown key 'camera_inf'; did you mean 'camera_info'"):
        McapScenesDataset(tmp_path / "ok.mcap", sensors={"cam_front": {"image": "/x", "camera_inf": "/y"}})
    with pytest.raises(DataError, match="does not exist"):
        McapScenesDataset(tmp_path / "absent.mcap")


def test_mcap_extrinsics_carry_the_ego_motion_between_sensor_stamps(tmp_path) -> None:
    # the ego drives 1 m in 100 ms; the lidar fires 50 ms after the camera
    path = _write(tmp_path / "moving.mcap", ego=((0, 0.0), (100_000_000, 1.0)), lidar_at=50_000_000)
    sample = McapScenesDataset(path, text_topic=None, label_topic=None, sensors={
        "lidar_top": {"points": "/lidar_top/points"},
        "cam_front": {"image": "/cam_front/image/compressed", "camera_info": "/cam_front/camera_info"}})[0]
    assert sample["ego_pose"][0, 3].item() == pytest.approx(0.5)  # interpolated at the lidar's stamp
    assert sample["lidar_top/extrinsics"][0, 3].item() == pytest.approx(0.0, abs=1e-6)
    # the camera saw the world from 0.5 m behind where the ego is at the lidar's stamp
    assert sample["cam_front/extrinsics"][0, 3].item() == pytest.approx(-0.5)
    assert sample["cam_front/timestamp"] == 0.0 and sample["lidar_top/timestamp"] == pytest.approx(0.05)


def test_mcap_frames_without_a_partner_are_counted_or_refused(recordings) -> None:
    # 5 ms: the lidar (10 ms after the camera) has no camera partner in any frame
    with pytest.raises(DataError, match=r"no complete frame .*no cam_front message within 0.005 s \(nearest 0.010 s away\)"):
        McapScenesDataset(recordings, "train", tolerance=0.005)
    with pytest.raises(DataError, match=r"street-0000\.mcap at 0\.010 s: no cam_front message within 0\.005 s.*missing: skip"):
        McapScenesDataset(recordings, "train", tolerance=0.005, missing="error")


def test_nuscenes_round_trip_is_the_simulator(nuscenes) -> None:
    names = json.loads((nuscenes / "v1.0-mini" / "scene.json").read_text())
    assert [s["name"] for s in names][:8] == list(MINI_TRAIN)
    for split, streets in (("train", 8), ("test", 2)):
        data = NuScenesDataset(nuscenes, split)
        made = StreetScenesDataset(split, size=2 * streets, frames_per_street=2)
        assert len(data) == 2 * streets and data.classes == list(made.classes)
        for i in (0, 1, len(data) - 1):
            read, truth = data[i], made[i]
            truth = dict(truth, text=made[i - i % 2]["text"])  # a scene's description is its first frame's caption
            truth["label"] = data.locations.index(("city street", "highway", "park road")[truth["label"]])
            _same_geometry(read, truth)
            assert (read["cam_front"] - truth["cam_front"]).abs().mean() < 0.02


def test_nuscenes_sweeps_move_earlier_points_into_the_key_frame(nuscenes) -> None:
    data = NuScenesDataset(nuscenes, "train", sweeps=2)
    made = StreetScenesDataset("train", size=2, frames_per_street=2)
    read, now, before = data[1], made[1], made[0]
    n = now["lidar_top"].shape[0]
    assert read["lidar_top"].shape[0] == n + before["lidar_top"].shape[0]
    assert (read["lidar_top/labels"][n:] == -1).all() and (read["lidar_top/labels"][:n] >= 0).all()
    # the earlier sweep, put in the world through the key frame's poses, is where the simulator had it
    world = lambda pts, s: pts.double() @ (s["ego_pose"].double() @ s["lidar_top/extrinsics"].double())[:3, :3].T + \
        (s["ego_pose"].double() @ s["lidar_top/extrinsics"].double())[:3, 3]  # noqa: E731
    torch.testing.assert_close(world(read["lidar_top"][n:, :3], now), world(before["lidar_top"][:, :3], before), atol=1e-3, rtol=0)
    assert len(data[0]["lidar_top"]) == len(made[0]["lidar_top"])  # the first sample has no earlier sweep


def test_nuscenes_mistakes_name_table_token_and_file(nuscenes, tmp_path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(nuscenes, root)
    rows = json.loads((root / "v1.0-mini" / "sample_data.json").read_text())
    lost = root / rows[0]["filename"]
    lost.unlink()
    with pytest.raises(DataError, match=re.escape(f"sample_data {rows[0]['token']} (LIDAR_TOP) references {rows[0]['filename']}, which is not under")):
        NuScenesDataset(root, "train", strict=True)
    data = NuScenesDataset(root, "train")
    assert len(data) == 15 and len(data.skipped) == 1
    shutil.copy(nuscenes / rows[0]["filename"], lost)
    bad = root / rows[2]["filename"]
    bad.write_bytes(b"\0" * 7)
    with pytest.raises(CorruptFileError, match="5 float32 per point; 7 bytes"):
        NuScenesDataset(root, "train", strict=True)
    assert len(NuScenesDataset(root, "train")) == 15
    with pytest.raises(CorruptFileError, match="5 float32 per point"):  # damaged after the scan: named when read
        data[[i for i, (sample, _) in enumerate(data.samples) if sample["token"] == rows[2]["sample_token"]][0]]
    rows[4]["calibrated_sensor_token"] = "feedfacefeedfacefeedfacefeedface"
    (root / "v1.0-mini" / "sample_data.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="references calibrated_sensor token 'feedfacefeedfacefeedfacefeedface'"):
        NuScenesDataset(root, "train")
    (root / "v1.0-mini" / "sample_data.json").write_text("[{")
    with pytest.raises(CorruptFileError, match="sample_data.json.*not a JSON table"):
        NuScenesDataset(root, "train")
    with pytest.raises(DataError, match="versions there: v1.0-mini"):
        NuScenesDataset(root, "train", version="v1.0-trainval")
    with pytest.raises(DataError, match="channel 'CAM_BACK' is not in .*channels: CAM_FRONT, LIDAR_TOP"):
        NuScenesDataset(nuscenes, "train", cameras=["CAM_BACK"])
    with pytest.raises(DataError, match=r"scenes \['scene-9999'\] are not in"):
        NuScenesDataset(nuscenes, "train", scenes=["scene-9999"])


# ---- the scene recipes on both formats, by changing the dataset node only ------------------------

SCENE = ["modality=street_scenes", "data.batch_size=4", "eval.max_train=16", "eval.max_test=8", "eval.point_samples=256"]


# docs/scene-logs.md's runnable sections train scene_two_stage on MCAP (and evaluate it) and
# image_to_lidar on nuScenes; these are the other pairings
@pytest.mark.parametrize("recipe,source", [("image_to_lidar", "mcap"), ("camera_lidar_contrastive", "nuscenes")])
def test_scene_recipes_train_on_log_formats(recipe, source, recordings, nuscenes, tmp_path) -> None:
    from helpers import anymodal

    node = f"{{name: mcap_scenes, path: '{recordings}'}}" if source == "mcap" else f"{{name: nuscenes, root: '{nuscenes}'}}"
    run = tmp_path / "run"
    anymodal("train", "tiny-test", *SCENE, f"recipe={recipe}", "recipe.stages.*.steps=2", f"data.train={node}",
             f"data.test={node}", "--run-dir", run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 if recipe != "camera_lidar_contrastive" else len(rows) == 2
    if recipe == "image_to_lidar":  # the segmentation probe reads the per-point labels (a PointCloud2 field)
        out = anymodal("eval", run, "--no-pictures").stdout
        assert "| encoder | mIoU | road | sidewalk |" in out


def test_a_cut_recording_is_one_error_line_when_refused(recordings, tmp_path) -> None:
    from helpers import anymodal

    cut = _cut(recordings / "train" / "street-0001.mcap", 0.5, tmp_path / "cut.mcap")
    proc = anymodal("train", "tiny-test", *SCENE, "recipe=camera_lidar_contrastive", "recipe.stages.*.steps=1",
                    f"data.train={{name: mcap_scenes, path: '{cut}'}}", "data.strict=true", "--run-dir", tmp_path / "run",
                    check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"anymodal train: error: corrupt or unreadable file '{cut}': unreadable from byte")
    assert "Traceback" not in proc.stderr


# ---- a real ROS 2 recording (written by rosbag2, not by us) -----------------------------------------

def test_real_ros2_recording_tf_agrees_with_its_odometry() -> None:
    """The nav2 TurtleBot 4 log that evo's source ships (scripts/install.sh fetches it): every /odom
    pose is the odom -> base_link transform that /tf published for the same stamp, and the robot's
    sensors hang off base_link through /tf_static the way its URDF mounts them."""
    from anymodal.core.data import cache_dir
    from anymodal.plugins.scenes.recording import STAMP, MessageReader, TransformTree, index_recording

    path = Path(cache_dir("scenes", "nav2_turtlebot.mcap"))
    if not path.is_file():
        pytest.skip(f"{path} is not there (scripts/install.sh fetches it from the evo 1.38.1 sdist)")
    index = index_recording(path, index_dir=None)
    assert index.lost is None and index.topics() == ["/amcl_pose", "/odom", "/tf", "/tf_static"]
    tree, reader = TransformTree(index, 0), MessageReader(index)
    rows = index.topic_rows("/odom")
    assert len(rows) == 2639
    worst = 0.0
    for row in rows[::25]:
        _, odom = reader.read(int(row))
        m = tree.lookup("odom", "base_link", int(index.messages[row, STAMP]))
        p = odom.pose.pose.position
        worst = max(worst, float(np.abs(m[:3, 3] - [p.x, p.y, p.z]).max()))
    assert worst < 1e-3, worst
    lidar, camera = tree.lookup("base_link", "rplidar_link", 0), tree.lookup("base_link", "oakd_rgb_camera_optical_frame", 0)
    assert np.allclose(lidar[:3, :3] @ lidar[:3, :3].T, np.eye(3), atol=1e-6) and 0.05 < lidar[2, 3] < 0.5
    assert camera[:3, 2] @ [1.0, 0.0, 0.0] > 0.95  # an optical frame looks along +z: the robot's forward
