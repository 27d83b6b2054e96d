"""Image-to-lidar distillation and the per-point segmentation probe: the pooled targets against a loop
over points, both losses against references, gradients reaching the lidar side only, and mIoU
against known answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from anymodal.core.backbone import Backbone, SensorInput
from anymodal.core.dense_probe import confusion, iou_from_confusion, segmentation_probe
from anymodal.core.encoder import Encoder
from anymodal.core.objective import Batch
from anymodal.core.posenc import build_posenc
from anymodal.core.teachers import BackboneTeacher
from anymodal.objectives.image_to_lidar import ImageToLidar
from anymodal.core.data import collate
from anymodal.plugins.scenes.data import StreetScenesDataset
from anymodal.tokenizers.image import ImagePatchTokenizer
from anymodal.tokenizers.pillars import PillarTokenizer

DIM = 32


def backbone(seed: int) -> Backbone:
    torch.manual_seed(seed)
    lidar = PillarTokenizer(DIM, point_range=(-32, -32, -3, 32, 32, 5), pillar_size=4.0)
    camera = ImagePatchTokenizer(DIM, image_size=128, patch_size=16)
    return Backbone(lidar, Encoder(DIM, 1, 2, build_posenc("sincos", DIM, 2)), sensor="lidar_top",
                    others={"cam_front": SensorInput(camera, build_posenc("sincos", DIM, 2))})


@pytest.fixture(scope="module")
def raw():
    data = StreetScenesDataset("train", size=8)
    return collate([data[i] for i in (0, 3)])


def test_targets_are_the_mean_patch_feature_of_each_tokens_points(raw) -> None:
    student, teacher = backbone(0), BackboneTeacher(backbone(1))
    objective = ImageToLidar(DIM, student.tokenizer, teacher_dim=DIM, sensor="lidar_top")
    batch = Batch(raw, student.tokenize(raw), None, torch.Generator().manual_seed(0))
    target, covered = objective.targets(batch, teacher, "lidar_top")
    patches = teacher(batch, sensor="cam_front").tokens.x  # [B, 8 * 16, D]
    # the reference: every point by itself, through the calibration in float64
    for b in range(2):
        n = int((~raw["lidar_top_padding"][b]).sum())
        pts = raw["lidar_top"][b, :n, :3].double()
        lidar_to_ego, cam_to_ego = raw["lidar_top/extrinsics"][b].double(), raw["cam_front/extrinsics"][b].double()
        ego = pts @ lidar_to_ego[:3, :3].T + lidar_to_ego[:3, 3]
        cam = (ego - cam_to_ego[:3, 3]) @ cam_to_ego[:3, :3]
        uvw = cam @ raw["cam_front/intrinsics"][b].double().T
        sums, counts = {}, {}
        for i in range(n):
            token = int(batch.tokens.source[b, i])
            if cam[i, 2] <= 0.1 or token < 0:
                continue
            u, v = (uvw[i, :2] / uvw[i, 2]).tolist()
            if 0 <= u < 256 and 0 <= v < 128:
                patch = int(v // 16) * 16 + int(u // 16)
                sums[token] = sums.get(token, 0) + patches[b, patch].double()
                counts[token] = counts.get(token, 0) + 1
        assert sorted(sums) == covered[b].nonzero().squeeze(1).tolist()
        for token, total in sums.items():
            torch.testing.assert_close(target[b, token].double(), total / counts[token], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", ["cosine", "infonce"])
def test_loss_and_gradients(raw, loss) -> None:
    student, teacher = backbone(0), BackboneTeacher(backbone(1))
    objective = ImageToLidar(DIM, student.tokenizer, teacher_dim=DIM, sensor="lidar_top", loss=loss, temperature=0.1)
    batch = Batch(raw, student.tokenize(raw), None, torch.Generator().manual_seed(0))
    out = objective(batch, student, teacher)
    target, covered = objective.targets(batch, teacher, "lidar_top")
    pred = F.normalize(objective.head(student.encode(batch.tokens).tokens.x)[covered].float(), dim=-1)
    t = F.normalize(target[covered], dim=-1)
    if loss == "cosine":
        expected = (1 - (pred * t).sum(-1)).mean()
    else:
        logits = pred @ t.T / 0.1
        expected = -torch.log_softmax(logits, 1).diagonal().mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert 0.1 < out.metrics["coverage"].item() < 0.6
    out.loss.backward()
    assert student.tokenizer.proj.weight.grad.abs().sum() > 0 and objective.head.weight.grad.abs().sum() > 0
    # the camera side of the student is not in this loss; the frozen teacher gets nothing
    assert student.others["cam_front"].tokenizer.proj.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_arguments() -> None:
    tokenizer = PillarTokenizer(DIM)
    with pytest.raises(ValueError, match="loss must be one of cosine, infonce"):
        ImageToLidar(DIM, tokenizer, loss="l2")
    with pytest.raises(ValueError, match="is the stage's own sensor"):
        ImageToLidar(DIM, tokenizer, camera="lidar_top", sensor="lidar_top")


def test_iou_known_answer() -> None:
    # 3 classes; truth [0 0 0 1 1 2], prediction [0 0 1 1 1 1]: class 0 IoU 2/3, class 1 2/4, class 2 0/2
    m = confusion(torch.tensor([0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 2]), 4)
    iou = iou_from_confusion(m)
    assert iou[:3].tolist() == pytest.approx([2 / 3, 2 / 4, 0.0]) and math.isnan(iou[3])


def test_segmentation_probe_separable_and_random() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (3000,), generator=g)
    centres = torch.randn(5, 8, generator=g) * 4
    x = centres[y] + torch.randn(3000, 8, generator=g) * 0.1
    good = segmentation_probe(x[:2000], y[:2000], x[2000:], y[2000:], classes=6)
    assert good["miou"] == pytest.approx(1.0) and good["iou"][5] is None  # class 5 never occurs
    noise = torch.randn(3000, 8, generator=g)
    chance = segmentation_probe(noise[:2000], y[:2000], noise[2000:], y[2000:], classes=5)
    assert chance["miou"] < 0.2


# ---- bad frames ----------------------------------------------------------------------------------


def _run(raw):
    student, teacher = backbone(0), BackboneTeacher(backbone(1))
    objective = ImageToLidar(DIM, student.tokenizer, teacher_dim=DIM, sensor="lidar_top", max_time_offset=0.05)
    objective.check_batch(raw)  # as the trainer does, on the host
    return objective(Batch(raw, student.tokenize(raw), None, torch.Generator().manual_seed(0)), student, teacher)


def test_singular_calibration_names_frame_and_sensor(raw) -> None:
    from anymodal.core.errors import DataError

    bad = dict(raw, **{"cam_front/extrinsics": raw["cam_front/extrinsics"].clone()})
    bad["cam_front/extrinsics"][1, :3, :3] = 0.0
    with pytest.raises(DataError, match="frame train/000003, cam_front: extrinsics' rotation is not orthonormal"):
        _run(bad)
    bad = dict(raw, **{"lidar_top/extrinsics": raw["lidar_top/extrinsics"].clone()})
    bad["lidar_top/extrinsics"][0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="frame train/000000, lidar_top: extrinsics are not finite"):
        _run(bad)


def test_sensors_recorded_apart_are_refused(raw) -> None:
    from anymodal.core.errors import DataError

    late = dict(raw, **{"lidar_top/timestamp": raw["lidar_top/timestamp"] + torch.tensor([0.0, 0.5], dtype=torch.float64)})
    with pytest.raises(DataError, match=r"frame train/000003: cam_front and lidar_top were recorded 0\.5\d* s apart"):
        _run(late)


def test_points_behind_the_camera_are_counted_not_fatal(raw) -> None:
    behind = dict(raw, lidar_top=raw["lidar_top"].clone())
    behind["lidar_top"][0, :, 0] = -behind["lidar_top"][0, :, 0].abs() - 5.0  # frame 0: every point behind the camera
    out = _run(behind)
    assert out.metrics["uncovered_frames"].item() == 1.0 and torch.isfinite(out.loss)
    assert out.metrics["coverage"].item() > 0  # frame 1 still gives targets


def test_a_frame_missing_a_sensor_is_named() -> None:
    from anymodal.core.errors import DataError

    data = StreetScenesDataset("train", size=8)
    frames = [data[0], data[1]]
    del frames[1]["cam_front"]
    with pytest.raises(DataError, match="frame 'train/000001' has other fields than the batch's first sample: missing cam_front"):
        collate(frames)


def test_the_stage_checks_calibration_on_the_host_copy_of_each_batch(raw) -> None:
    # what the trainer runs before moving a batch to the device (and in its dry run): the objective
    # built from the recipe, with the stage's sensor injected, refuses the bad frame by name
    from anymodal.core.build import build_backbone, build_objectives
    from anymodal.core.config import compose
    from anymodal.core.errors import DataError
    from anymodal.core.stage import StepForward
    from anymodal.plugins.manager import load_components

    components = load_components()
    cfg = compose("tiny-test", ["modality=street_scenes", "recipe=image_to_lidar"]).cfg
    student = build_backbone(cfg, components)
    stage = cfg.recipe.stages.distill
    objectives, weights = build_objectives(stage, components, student, BackboneTeacher(build_backbone(cfg, components)))
    model = StepForward(student, objectives, weights, stage.sensor)
    model.check_batch(raw)
    bad = dict(raw, **{"lidar_top/extrinsics": raw["lidar_top/extrinsics"].clone()})
    bad["lidar_top/extrinsics"][1, 3, 0] = 1.0
    with pytest.raises(DataError, match=r"frame train/000003, lidar_top: extrinsics' last row must be \[0, 0, 0, 1\]"):
        model.check_batch(bad)
    with pytest.raises(DataError, match="image_to_lidar needs the scene fields cam_front/intrinsics"):
        model.check_batch({k: v for k, v in raw.items() if k != "cam_front/intrinsics"})
