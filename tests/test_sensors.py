"""A backbone over several sensors of one scene sample: each sensor's tokenizer, one shared encoder,
a learned sensor embedding and each sensor's own positional encoding; one-sensor backbones unchanged."""

import pytest
import torch

from anymodal.core.backbone import Backbone, SensorInput
from anymodal.core.data import collate
from anymodal.core.encoder import Encoder
from anymodal.core.posenc import build_posenc
from anymodal.tokenizers.image import ImagePatchTokenizer
from anymodal.tokenizers.pillars import PillarTokenizer

DIM = 32


def scene_backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    lidar = PillarTokenizer(DIM, point_range=(-16, -16, -3, 16, 16, 3), pillar_size=4.0)
    encoder = Encoder(DIM, 1, 2, build_posenc("sincos", DIM, lidar.pos_axes))
    camera = ImagePatchTokenizer(DIM, image_size=32, patch_size=8)
    # the camera's positions get a learned encoding of its own, unlike the lidar's sincos
    others = {"cam_front": SensorInput(camera, build_posenc("learned", DIM, 2, (4, 8)))}
    return Backbone(lidar, encoder, sensor="lidar_top", others=others)


def scene_batch(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    points = (torch.rand(b, 300, 4, generator=g) - 0.5) * 30
    padding = torch.zeros(b, 300, dtype=torch.bool)
    padding[1, 250:] = True
    return {"lidar_top": points, "lidar_top_padding": padding, "cam_front": torch.rand(b, 3, 32, 64, generator=g)}


def test_one_sensor_backbone_has_no_sensor_weights() -> None:
    tokenizer = ImagePatchTokenizer(DIM, image_size=32, patch_size=8)
    backbone = Backbone(tokenizer, Encoder(DIM, 1, 2, build_posenc("sincos", DIM, 2)))
    assert backbone.sensors == ["image"] and backbone.sensor_embed is None
    assert not [k for k in backbone.state_dict() if k.startswith(("others", "sensor_embed"))]
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(backbone.tokenize({"image": images}).x, tokenizer(images).x)


def test_each_sensor_tokenized_with_its_embedding_and_source() -> None:
    backbone, batch = scene_backbone(), scene_batch()
    assert backbone.sensors == ["lidar_top", "cam_front"]
    lidar = backbone.tokenize(batch)
    camera = backbone.tokenize(batch, "cam_front")
    assert (lidar.sensor, camera.sensor) == ("", "cam_front")
    plain_lidar = backbone.tokenizer(batch["lidar_top"], padding=batch["lidar_top_padding"])
    plain_camera = backbone.others["cam_front"].tokenizer(batch["cam_front"])
    torch.testing.assert_close(lidar.x - plain_lidar.x, backbone.sensor_embed[0].expand_as(lidar.x))
    torch.testing.assert_close(camera.x - plain_camera.x, backbone.sensor_embed[1].expand_as(camera.x))
    # every real point names a real token of its own cloud; padding names none
    assert lidar.source.shape == (2, 300) and (lidar.source[1, 250:] == -1).all()
    real = lidar.source >= 0
    token_is_real = torch.gather(~lidar.padding, 1, lidar.source.clamp_min(0))
    assert token_is_real[real].all()


def test_encode_uses_the_sensors_positional_encoding() -> None:
    backbone, batch = scene_backbone(), scene_batch()
    camera = backbone.tokenize(batch, "cam_front")
    ours = backbone.encode(camera).tokens.x
    theirs = backbone.encoder(camera, posenc=backbone.others["cam_front"].posenc).tokens.x
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, backbone.encoder(camera).tokens.x)  # the lidar's encoding would differ


def test_gradients_reach_every_sensor_and_the_embeddings() -> None:
    backbone, batch = scene_backbone(), scene_batch()
    loss = backbone.embed(batch).square().mean() + backbone.embed(batch, "cam_front").square().mean()
    loss.backward()
    assert backbone.sensor_embed.grad.abs().sum(1).gt(0).all()
    assert backbone.others["cam_front"].tokenizer.proj.weight.grad.abs().sum() > 0
    assert backbone.tokenizer.proj.weight.grad.abs().sum() > 0


def test_unknown_sensor_is_a_clear_error() -> None:
    backbone, batch = scene_backbone(), scene_batch()
    with pytest.raises(KeyError, match="no sensor 'cam_back'; sensors: lidar_top, cam_front"):
        backbone.tokenize(batch, "cam_back")
    with pytest.raises(ValueError, match="given twice"):
        Backbone(backbone.tokenizer, backbone.encoder, sensor="cam_front", others=dict(backbone.others))


# ---- scene configs: validation and a two-stage run through the command line ------------------------

SCENE = ["modality=street_scenes", "data.batch_size=4", "data.train.size=16", "data.test.size=8",
         "eval.max_train=16", "eval.max_test=8", "eval.point_samples=256"]


def _problems(*overrides: str) -> str:
    from anymodal.core.config import ConfigError, compose, validate
    from anymodal.plugins.manager import load_components

    with pytest.raises(ConfigError) as caught:
        validate(compose("tiny-test", [*SCENE, *overrides]), load_components())
    return str(caught.value)


def test_scene_config_mistakes_are_named() -> None:
    from anymodal.core.config import compose, validate
    from anymodal.plugins.manager import load_components

    validate(compose("tiny-test", [*SCENE, "recipe=scene_two_stage"]), load_components())
    assert ("recipe.stages.lidar.sensor (from command line) names sensor 'lidar_tpo', which modality 'street_scenes' "
            "does not have (sensors: lidar_top, cam_front); did you mean 'lidar_top'?") in _problems(
        "recipe=scene_two_stage", "recipe.stages.lidar.sensor=lidar_tpo")
    assert ("recipe.stages.distill.objectives.image_to_lidar.camera (from command line) names sensor 'cam_frnt', which "
            "modality 'street_scenes' does not have (sensors: lidar_top, cam_front); did you mean 'cam_front'?") in _problems(
        "recipe=image_to_lidar", "recipe.stages.distill.objectives.image_to_lidar.camera=cam_frnt")
    assert "recipe.stages.contrastive.objectives.contrastive.other_sensor (from command line) names sensor 'lidar'" in _problems(
        "recipe=camera_lidar_contrastive", "recipe.stages.contrastive.objectives.contrastive.other_sensor=lidar")
    # on a one-sensor modality the one sensor is named by its tokenizer's field
    from anymodal.core.config import ConfigError, compose, validate
    from anymodal.plugins.manager import load_components

    with pytest.raises(ConfigError, match=r"names sensor 'lidar_top', which modality 'image' does not have \(sensors: image\)"):
        validate(compose("tiny-test", ["recipe=image_to_lidar"]), load_components())
    assert "modality.sensor (from command line) must name one of modality.sensors (lidar_top, cam_front)" in _problems(
        "modality.sensor=cam_back")
    assert "unknown key 'modality.sensors.cam_front.transform'" in _problems("modality.sensors.cam_front.transform=[]")
    assert "modality.sensors.cam_front.tokenizer.name: unknown tokenizer 'image_pach'" in _problems(
        "modality.sensors.cam_front.tokenizer.name=image_pach")


def test_scene_two_stage_trains_and_evaluates(tmp_path) -> None:
    import json

    from helpers import anymodal

    run = tmp_path / "run"
    anymodal("train", "tiny-test", *SCENE, "recipe=scene_two_stage", "recipe.stages.*.steps=3", "--run-dir", run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["camera"] * 3 + ["lidar"] * 3
    assert all(0 < r["image_to_lidar/coverage"] < 1 and r["masked_pixel/recon"] > 0 for r in rows[3:])
    out = anymodal("eval", run, "--no-pictures").stdout
    assert "| encoder | mIoU | road | sidewalk | building | car | guard_rail | pole | tree | pedestrian |" in out
    assert "camera/contrastive" in out  # camera-to-caption retrieval of stage 1
    summary = json.loads((run / "eval" / "results.json").read_text())
    assert set(summary["segmentation"]) == {"pre-trained (scene_two_stage)", "random init"}


def test_each_sensor_takes_its_own_transforms_and_none_that_moves_geometry() -> None:
    from anymodal.core.build import build_dataset, build_sensor_transforms, build_transforms
    from anymodal.core.config import compose, validate
    from anymodal.core.data import AugmentedDataset
    from anymodal.plugins.manager import load_components

    components = load_components()
    dropout = "modality.sensors.lidar_top.transforms=[{name: point_dropout, fraction: 0.5}]"
    composed = compose("tiny-test", [*SCENE, dropout, "modality.sensors.cam_front.transforms=[{name: normalize, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}]"])
    validate(composed, components)
    cfg = composed.cfg
    data = build_dataset(cfg, "train", components)
    # a stage on the camera: data.transforms and the camera's own on its field, the lidar's on the lidar
    own, others = build_transforms(cfg, components, "cam_front"), build_sensor_transforms(cfg, components, skip="cam_front")
    assert [type(t).__name__ for t in own] == ["Normalize"] and list(others) == ["lidar_top"]
    augmented = AugmentedDataset(data, own, "cam_front", seed=0, others=others)
    sample, raw = augmented[(3, 0)], data[3]
    assert len(sample["lidar_top"]) == round(len(raw["lidar_top"]) * 0.5)
    assert not torch.equal(sample["cam_front"], raw["cam_front"])  # normalized
    assert torch.equal(sample["lidar_top"], augmented[(3, 0)]["lidar_top"])  # seeded by (index, epoch)
    assert not torch.equal(sample["lidar_top"], augmented[(3, 1)]["lidar_top"])
    assert torch.equal(sample["lidar_top/extrinsics"], raw["lidar_top/extrinsics"])
    flip = _problems("modality.sensors.cam_front.transforms=[{name: random_horizontal_flip}]")
    assert ("modality.sensors.cam_front.transforms.0 (random_horizontal_flip, from command line) moves pixels or points, "
            "which the scene's calibration would then no longer describe") in flip
    assert "data.transforms.0 (rotate_z, from command line) moves pixels or points" in _problems("data.transforms=[{name: rotate_z}]")
    assert "modality.sensors.lidar_top.transforms.0.name: unknown transform 'point_dropuot'" in _problems(
        "modality.sensors.lidar_top.transforms=[{name: point_dropuot}]")


def test_separate_sensor_encoders_on_request(tmp_path) -> None:
    import json

    from anymodal.core.build import build_backbone
    from anymodal.core.config import compose
    from anymodal.plugins.manager import load_components
    from anymodal.plugins.scenes.data import StreetScenesDataset
    from helpers import anymodal

    components = load_components()
    raw = collate([StreetScenesDataset("train", size=2)[i] for i in range(2)])
    torch.manual_seed(0)
    shared = build_backbone(compose("tiny-test", SCENE).cfg, components)
    torch.manual_seed(0)
    separate = build_backbone(compose("tiny-test", [*SCENE, "model.sensor_encoders=separate"]).cfg, components)
    assert shared.others["cam_front"].encoder is None
    own = separate.others["cam_front"].encoder
    assert own is not None and own is not separate.encoder
    # the shared part is built first, so it is the same in both; the camera's encoder is extra
    assert all(torch.equal(a, b) for a, b in zip(shared.encoder.state_dict().values(), separate.encoder.state_dict().values()))
    separate.embed(raw, "cam_front").sum().backward()
    assert own.blocks[0].attn.qkv.weight.grad is not None and separate.encoder.blocks[0].attn.qkv.weight.grad is None
    separate.zero_grad(set_to_none=True)
    separate.embed(raw).sum().backward()  # the lidar, the first sensor, through the shared encoder
    assert separate.encoder.blocks[0].attn.qkv.weight.grad is not None and own.blocks[0].attn.qkv.weight.grad is None
    # through the command line: a camera-lidar contrastive run with an encoder per sensor, then eval
    run = tmp_path / "run"
    anymodal("train", "tiny-test", *SCENE, "recipe=camera_lidar_contrastive", "recipe.stages.*.steps=2",
             "model.sensor_encoders=separate", "--run-dir", run)
    anymodal("eval", run, "--no-pictures")
    assert "contrastive/contrastive" in json.loads((run / "eval" / "results.json").read_text())["retrieval"]
    assert ("model.sensor_encoders must be one of shared, separate, got 'seperate' (from command line); did you mean "
            "'separate'?") in _problems("model.sensor_encoders=seperate")


def test_two_views_of_a_scene_sensor_pair_on_its_field(tmp_path) -> None:
    # pair=views on a camera stage of a scene reads cam_front and cam_front_view2, not the image
    # tokenizer's default field
    import json

    from helpers import anymodal

    run = tmp_path / "run"
    anymodal("train", "tiny-test", *SCENE, "recipe=clip", "recipe.stages.*.sensor=cam_front", "data.views=2",
             "recipe.stages.*.steps=2", "recipe.stages.*.objectives.contrastive={_replace_: true, pair: views, embed_dim: 16}",
             "modality.sensors.cam_front.transforms=[{name: normalize, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}]",
             "--run-dir", run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["contrastive/acc"] <= 1 for r in rows)
    # without data.views=2 there is no second view: one line naming the field, before the first step
    proc = anymodal("train", "tiny-test", *SCENE, "recipe=clip", "recipe.stages.*.sensor=cam_front", "recipe.stages.*.steps=2",
                    "recipe.stages.*.objectives.contrastive={_replace_: true, pair: views, embed_dim: 16}",
                    "--run-dir", tmp_path / "one_view", check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("anymodal train: error: stage 'contrastive': contrastive pair=views needs batch field "
                                "'cam_front_view2'; the batch has: cam_front,"), errors[0]
