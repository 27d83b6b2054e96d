"""Generated street scenes (plugins/scenes): one world seen by a calibrated camera and lidar. The key
check projects every lidar point through the sample's own calibration into the camera and finds the
class the camera rendered there is the point's label."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anymodal.core.errors import DataError
from anymodal.core.geometry import project_points, to_ego
from anymodal.plugins.scenes.data import CLASSES, StreetScenesDataset, caption, save_overlay


@pytest.fixture(scope="module")
def train():
    return StreetScenesDataset("train", size=24)


def test_sample_contract(train) -> None:
    s = train[0]
    assert s["cam_front"].shape == (3, 128, 256) and s["cam_front"].dtype == torch.float32
    assert 0.0 <= s["cam_front"].min() and s["cam_front"].max() <= 1.0
    for key in ("cam_front/extrinsics", "lidar_top/extrinsics", "ego_pose"):
        assert s[key].shape == (4, 4) and s[key].dtype == torch.float32
        rotation = s[key][:3, :3].double()
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert s["cam_front/intrinsics"].shape == (3, 3)
    n = s["lidar_top"].shape[0]
    assert s["lidar_top"].shape == (n, 4) and 5000 < n < 30000
    assert s["lidar_top/labels"].shape == (n,) and s["lidar_top/labels"].dtype == torch.int64
    assert abs(s["lidar_top/timestamp"] - s["cam_front/timestamp"]) < 0.05
    assert s["frame"] == "train/000000" and isinstance(s["text"], str) and s["label"] in (0, 1, 2)


def test_deterministic_and_splits_differ(train) -> None:
    a, b = train[5], StreetScenesDataset("train", size=24)[5]
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key
    test = StreetScenesDataset("test", size=24)[5]
    assert not torch.equal(a["cam_front"], test["cam_front"])
    assert a["lidar_top"].shape != test["lidar_top"].shape or not torch.equal(a["lidar_top"], test["lidar_top"])


def test_every_class_appears(train) -> None:
    seen = torch.cat([train[i]["lidar_top/labels"] for i in range(0, 24, 2)]).bincount(minlength=len(CLASSES))
    assert (seen > 0).sum() >= 7, dict(zip(CLASSES, seen.tolist()))
    assert {train[i]["label"] for i in range(24)} == {0, 1, 2}


def test_camera_and_lidar_see_one_world(train) -> None:
    agree = inside = total = 0
    for index in (0, 7, 13, 21):
        s, classes = train.frame(index)
        xyz = to_ego(s["lidar_top"][None, :, :3].double(), s["lidar_top/extrinsics"][None].double())
        proj = project_points(xyz, s["cam_front/intrinsics"][None, None].double(), s["cam_front/extrinsics"][None, None].double(),
                              (128, 256))
        valid = proj.valid[0, 0]
        uv = proj.uv[0, 0][valid].long()
        pixel_class = torch.from_numpy(classes)[uv[:, 1], uv[:, 0]]
        agree += (pixel_class == s["lidar_top/labels"][valid]).sum().item()
        inside += valid.sum().item()
        total += valid.numel()
    # the lidar sits 0.3 m above and behind the camera: parallax at object edges costs a few points
    assert agree / inside >= 0.9, agree / inside
    assert inside / total >= 0.15


def test_captions_name_what_is_seen() -> None:
    assert caption(0, {"car": 2, "pedestrian": 1, "tree": 1}) == "a city street with two cars, a pedestrian and a tree"
    assert caption(1, {}) == "a highway"
    assert caption(2, {"pedestrian": 3}) == "a park road with three pedestrians"


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        StreetScenesDataset("val")
    with pytest.raises(DataError, match="multiple of 16"):
        StreetScenesDataset("train", image_size=(100, 256))
    with pytest.raises(DataError, match="size must be"):
        StreetScenesDataset("train", size=0)
    with pytest.raises(IndexError, match="has 24 frames"):
        StreetScenesDataset("train", size=24)[24]


def test_overlay_is_written(train, tmp_path) -> None:
    path = save_overlay(train[3], tmp_path / "overlay.png")
    picture = np.asarray(Image.open(path))
    assert picture.shape == (128, 512, 3)
    assert (picture[:, :256] != picture[:, 256:]).any()  # the points are drawn on the right half


def test_radar_sees_the_same_world_with_doppler_and_leaves_the_other_sensors_unchanged(train) -> None:
    from anymodal.plugins.scenes.data import EGO_SPEED

    radar = StreetScenesDataset("train", size=16, radar=True)
    car, building = CLASSES.index("car"), CLASSES.index("building")
    moving_seen, rcs, classes = False, [], []
    for i in (0, 2, 5, 9):
        s, plain = radar[i], train[i]
        assert torch.equal(s["lidar_top"], plain["lidar_top"]) and torch.equal(s["cam_front"], plain["cam_front"])
        points, labels = s["radar_front"], s["radar_front/labels"]
        assert points.shape[1] == 5 and len(points) == len(labels) > 20 and points.dtype == torch.float32
        assert torch.equal(points, radar[i]["radar_front"])  # deterministic
        assert (labels > CLASSES.index("sidewalk")).all()  # ground returns filtered, as radars do
        assert (points[:, 0] > 0).all() and s["radar_front/timestamp"] - s["cam_front/timestamp"] < 0.05
        # a standing surface's Doppler is the ego's own motion seen along the ray: -speed * cos(angle)
        ego_dirs = F.normalize(to_ego(points[None, :, :3], s["radar_front/extrinsics"][None])[0]
                               - s["radar_front/extrinsics"][:3, 3], dim=-1)
        standing = labels != car
        expected = -EGO_SPEED * ego_dirs[:, 0]
        assert (points[standing, 3] - expected[standing]).abs().median() < 0.3
        moving_seen |= bool(((points[~standing, 3] - expected[~standing]).abs() > 5).any())
        rcs.append(points[:, 4]), classes.append(labels)
    rcs, classes = torch.cat(rcs), torch.cat(classes)
    assert rcs[classes == building].mean() > rcs[classes == car].mean() + 5  # a facade reflects more than a car
    assert moving_seen  # some car drives in its lane: its Doppler differs from the standing world's
    cached = StreetScenesDataset("train", size=16, radar=True, cache=True)
    first = cached[2]
    first["radar_front"] = None  # what a transform does to its copy
    assert torch.equal(cached[2]["radar_front"], radar[2]["radar_front"]) and 2 in cached.cache
    with pytest.raises(DataError, match="radar must be true or false"):
        StreetScenesDataset("train", size=4, radar="yes")
