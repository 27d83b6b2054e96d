"""The objective and teacher contracts the trainer relies on (core.objective.Objective, core.teachers):
metrics come back as detached 0-d tensors read once per step, never synchronized inside a forward;
the trainer reads tensor and float metrics alike; the attributes it reads are declared."""

import math

import pytest
import torch

from anymodal.core.data import collate
from anymodal.core.masking import RandomMasker
from anymodal.core.objective import Batch, ObjectiveOutput, TargetSwitch, reads_targets
from anymodal.core.teachers import BackboneTeacher, MovingTeacher
from anymodal.core.trainer import _floats
from anymodal.plugins.manager import load_components
from anymodal.plugins.scenes.data import StreetScenesDataset
from test_image_to_lidar import backbone as scene_backbone
from test_jepa_distill import DIM, images, tiny_backbone

COMPONENTS = load_components()
# contrastive's metrics become tensors in its own change; until then it returns floats, which the
# trainer accepts too: its values are checked to be numbers, not tensors
FLOAT_METRICS_FOR_NOW = {"contrastive"}
KWARGS = {"contrastive": {"pair": "views", "embed_dim": 16},
          "image_to_lidar": {"sensor": "lidar_top", "teacher_dim": DIM}}
# objectives that read a scene (several calibrated sensors) are checked on a street scene
SCENE_OBJECTIVES = {"image_to_lidar"}


def _batch(student, name):
    if name in SCENE_OBJECTIVES:
        raw = collate([StreetScenesDataset("train", size=4)[i] for i in (0, 1)])
        return Batch(raw, student.tokenize(raw), None, torch.Generator().manual_seed(0))
    raw = {"image": images()}
    if name == "contrastive":
        raw["image_view2"] = images(seed=1)
    generator = torch.Generator().manual_seed(0)
    tokens = student.tokenize(raw)
    return Batch(raw, tokens, RandomMasker(0.5)(tokens, generator), generator)


def _no_host_sync(*args, **kwargs):
    raise AssertionError("a host sync (.item(), .tolist(), float/int/bool of a tensor) inside an objective's forward")


@pytest.mark.parametrize("name", COMPONENTS.objective.names())
def test_objective_forward_returns_detached_tensor_metrics_without_a_host_sync(name, monkeypatch):
    student = scene_backbone(0) if name in SCENE_OBJECTIVES else tiny_backbone()
    factory = COMPONENTS.objective.entry(name).factory
    if name in SCENE_OBJECTIVES:
        teacher = BackboneTeacher(scene_backbone(1))
    elif getattr(factory, "needs_teacher", False):
        teacher = COMPONENTS.teacher.build("ema", student=student)
    else:
        teacher = None
    objective = COMPONENTS.objective.build(name, dim=DIM, tokenizer=student.tokenizer, **KWARGS.get(name, {}))
    batch = _batch(student, name)
    if name not in FLOAT_METRICS_FOR_NOW:
        for method in ("item", "tolist", "__float__", "__int__", "__bool__"):
            monkeypatch.setattr(torch.Tensor, method, _no_host_sync)
    out = objective(batch, student, teacher)
    monkeypatch.undo()
    assert isinstance(out, ObjectiveOutput) and out.loss.requires_grad and out.metrics
    for key, value in out.metrics.items():
        if name in FLOAT_METRICS_FOR_NOW and not isinstance(value, torch.Tensor):
            assert isinstance(value, float) and math.isfinite(value), (key, value)
            continue
        assert isinstance(value, torch.Tensor), (name, key, type(value))
        assert value.dim() == 0 and not value.requires_grad and value.grad_fn is None, (name, key)
        assert torch.isfinite(value), (name, key, value)
    out.loss.backward()  # the detached metrics leave the graph whole


def test_trainer_reads_tensor_and_float_metrics_alike_in_order():
    metrics = {"loss": 1.5, "grad_norm": torch.tensor(0.25), "a/x": torch.tensor(2.0, dtype=torch.bfloat16),
               "b/y": 3.0, "c/z": torch.tensor([4.0])}
    out = _floats(metrics)
    assert out == {"loss": 1.5, "grad_norm": 0.25, "a/x": 2.0, "b/y": 3.0, "c/z": 4.0}
    assert list(out) == list(metrics) and all(type(v) is float for v in out.values())
    assert _floats({"loss": 1.0, "grad_norm": float("nan")})["loss"] == 1.0  # no tensors: nothing read


def test_declared_attributes_of_the_built_in_objectives_and_teachers():
    objective = COMPONENTS.objective
    for name in objective.names():
        for attr in ("needs_mask", "needs_teacher", "needs_targets"):
            assert isinstance(getattr(objective.entry(name).factory, attr, False), bool), (name, attr)
    assert reads_targets([objective.entry("masked_pixel").factory])
    assert not reads_targets([objective.entry(n).factory for n in ("contrastive", "jepa", "distill", "masked_distill")])
    student = tiny_backbone()
    assert isinstance(student.tokenizer, TargetSwitch)
    assert isinstance(COMPONENTS.teacher.build("ema", student=student), MovingTeacher)
    assert not isinstance(None, MovingTeacher)
