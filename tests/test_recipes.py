"""Multi-stage recipes for real: stage hand-over, frozen stage teachers, EMA arithmetic, resume
inside stage 2, YAML-only objective mixes, epochs, online monitors."""

import copy
import json
import signal

import pytest
import torch

from anymodal.core.build import build_backbone
from anymodal.core.checkpoint import load_checkpoint
from anymodal.core.config import compose
from anymodal.core.monitor import feature_std, rankme
from anymodal.core.teachers import EmaTeacher
from anymodal.plugins import load_components
from helpers import anymodal, losses, spawn
from test_training import wait_for_step


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    anymodal("train", "tiny-two-stage", "--run-dir", run)
    return run


def test_two_stage_runs_both_stages_in_order(two_stage):
    stages = [s for s, _, _ in losses(two_stage)]
    assert stages == ["contrastive"] * 12 + ["distill"] * 12
    assert (two_stage / "checkpoints" / "contrastive-final.pt").is_file()
    assert (two_stage / "checkpoints" / "distill-final.pt").is_file()


def test_stage_teacher_is_the_frozen_stage_one_model(two_stage):
    """Stage 2 trains the student away from stage 1 while the teacher keeps stage 1's weights."""
    first = load_checkpoint(two_stage / "checkpoints" / "contrastive-final.pt")["backbone"]
    second = load_checkpoint(two_stage / "checkpoints" / "distill-final.pt")["backbone"]
    assert any(not torch.equal(first[k], second[k]) for k in first)
    cfg = compose("tiny-two-stage").cfg
    components = load_components(autoload=False)
    from anymodal.core.runfolder import RunFolder
    from anymodal.core.teachers import StageTeacher

    student = build_backbone(cfg, components)
    teacher = StageTeacher(student, RunFolder(two_stage), "contrastive")
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(v, first[k])
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not teacher.train().training


def test_stage_teacher_gets_no_gradient_and_does_not_move(two_stage):
    from anymodal.core.build import build_masker, build_objectives
    from anymodal.core.objective import Batch
    from anymodal.core.runfolder import RunFolder
    from anymodal.core.teachers import StageTeacher
    from anymodal.plugins.image.data import DigitsDataset
    from anymodal.core.data import collate

    cfg = compose("tiny-two-stage").cfg
    components = load_components(autoload=False)
    student = build_backbone(cfg, components)
    stage = cfg.recipe.stages.distill
    teacher = StageTeacher(student, RunFolder(two_stage), "contrastive")
    before = copy.deepcopy(teacher.state_dict())
    objectives, _ = build_objectives(stage, components, student, teacher)
    masker = build_masker(stage, components)
    opt = torch.optim.AdamW(list(student.parameters()) + list(objectives.parameters()), lr=1e-2)
    data = DigitsDataset("train", size=16)
    raw = collate([data[i] for i in range(16)])
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        tokens = student.tokenize(raw)
        batch = Batch(raw, tokens, masker(tokens, g), g)
        loss = sum(o(batch, student, teacher).loss for o in objectives.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_kill_in_stage_two_resumes_in_stage_two(two_stage, tmp_path):
    run = tmp_path / "run"
    proc = spawn("train", "tiny-two-stage", "--run-dir", run)
    wait_for_step(run, 12 + 8, proc)  # inside stage 2, after its first checkpoint (step 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["stage"] == "distill" and 5 <= state["step"] < 12
    anymodal("train", "tiny-two-stage", "--run-dir", run, "--resume")
    assert losses(run) == losses(two_stage)


def test_ema_update_arithmetic():
    cfg = compose("tiny-test").cfg
    student = build_backbone(cfg, load_components(autoload=False))
    teacher = EmaTeacher(student, momentum=[0.9, 1.0])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    old = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    new = student.state_dict()
    teacher.update(student, step=5, total=10)  # momentum 0.95 halfway
    assert teacher.momentum_at(5, 10) == pytest.approx(0.95)
    for k, v in teacher.backbone.state_dict().items():
        assert torch.allclose(v, 0.95 * old[k] + 0.05 * new[k], atol=1e-6), k
    teacher.update(student, step=10, total=10)  # momentum 1.0: no change
    for k, v in teacher.backbone.state_dict().items():
        assert torch.allclose(v, 0.95 * old[k] + 0.05 * new[k], atol=1e-6), k


def test_objective_mix_in_yaml_only(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe=jepa_contrastive",
             "recipe.stages.pretrain.steps=4", "recipe.stages.pretrain.objectives.jepa.predictor_dim=32", "recipe.stages.pretrain.objectives.jepa.predictor_heads=2",
             "recipe.stages.pretrain.objectives.contrastive={weight: 0.5, pair: text, embed_dim: 16, text: {dim: 32, depth: 1, num_heads: 2}}")
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 4
    assert any(k.startswith("jepa/") for k in rec[-1]) and any(k.startswith("contrastive/") for k in rec[-1])


def test_epochs_set_the_stage_length(tmp_path):
    run = tmp_path / "run"
    # digits train split: 1347 samples; batch 32 -> 42 full batches per epoch, 0.1 epoch -> 5 steps
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.epochs=0.1")
    assert [s for _, s, _ in losses(run)] == [1, 2, 3, 4, 5]


def test_init_from_restarts_from_an_earlier_stage(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "tiny-two-stage", "--run-dir", run, "recipe.stages.distill.steps=1",
             "recipe.stages.distill.init_from=contrastive", "recipe.stages.distill.optim.lr=0.0",
             "recipe.stages.distill.optim.warmup_steps=0")
    first = load_checkpoint(run / "checkpoints" / "contrastive-final.pt")["backbone"]
    second = load_checkpoint(run / "checkpoints" / "distill-final.pt")["backbone"]
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_init_from_scratch_restarts_from_the_initial_random_weights(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "tiny-two-stage", "--run-dir", run, "recipe.stages.distill.steps=1",
             "recipe.stages.distill.init_from=scratch", "recipe.stages.distill.optim.lr=0.0",
             "recipe.stages.distill.optim.warmup_steps=0")
    cfg = compose("tiny-two-stage").cfg
    torch.manual_seed(cfg.run.seed)
    initial = build_backbone(cfg, load_components()).state_dict()
    first = load_checkpoint(run / "checkpoints" / "contrastive-final.pt")["backbone"]
    second = load_checkpoint(run / "checkpoints" / "distill-final.pt")["backbone"]
    assert any(not torch.equal(first[k], initial[k]) for k in first)  # stage 1 trained
    for k in initial:
        assert torch.equal(second[k], initial[k]), k


def test_distill_recipe_trains_a_student_from_scratch_against_a_stage_teacher(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe=distill", "recipe.stages.*.steps=6")
    stages = [s for s, _, _ in losses(run)]
    assert stages == ["teacher"] * 6 + ["student"] * 6
    student = [loss for s, _, loss in losses(run) if s == "student"]
    assert all(0 <= v <= 4 for v in student)  # normalized MSE of unit vectors


def test_scratch_is_not_a_stage_name(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("defaults:\n  model: cpu\n  modality: digits\nrecipe:\n  name: bad\n  stages:\n    scratch:\n"
                      "      steps: 2\n      masker: {name: random}\n      objectives: {masked_pixel: {}}\n")
    proc = anymodal("train", recipe, "--run-dir", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "'scratch' is reserved for init_from" in proc.stderr


def test_init_from_unknown_stage_is_a_config_error(tmp_path):
    proc = anymodal("train", "tiny-two-stage", "--run-dir", tmp_path / "r", "recipe.stages.distill.init_from=contrastiv",
                    check=False)
    assert proc.returncode == 2 and "not an earlier stage" in proc.stderr


def test_online_monitor_logs_knn_and_collapse_signals(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=6", "eval.monitor_every=3",
             "eval.monitor_samples=200")
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    watched = [r for r in rec if "monitor/knn" in r]
    assert [r["step"] for r in watched] == [3, 6]
    assert all(0 <= r["monitor/knn"] <= 1 and r["monitor/rankme"] > 1 for r in watched)
    assert all(0.2 < r["monitor/linear"] <= 1 for r in watched)  # digits: chance is 0.1, raw pixels probe far above


def test_online_linear_probe_reads_labels_that_are_there():
    """The monitor's probe separates classes that are linearly separable and is near chance on noise."""
    from anymodal.core.monitor import monitor_scores

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    centres = 3 * torch.randn(4, 16, generator=g)
    for feats, low, high in ((centres[labels] + torch.randn(400, 16, generator=g), 0.9, 1.0),
                             (torch.randn(400, 16, generator=g), 0.0, 0.4)):
        scores = monitor_scores(feats, labels, k=10, probe_iters=50)
        assert low <= scores["monitor/linear"] <= high and low <= scores["monitor/knn"] <= high, scores


def test_collapse_signals_separate_collapsed_from_spread_features():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 64, generator=g)
    collapsed = torch.ones(256, 64) + 1e-4 * torch.randn(256, 64, generator=g)
    assert rankme(spread) > 40 and rankme(collapsed) < 5
    assert feature_std(spread) > 0.1 and feature_std(collapsed) < 1e-3


def test_timm_teacher_tokens_layers_and_checkpoint(tmp_path, caplog):
    from safetensors.torch import save_file

    from anymodal.core.objective import Batch
    from anymodal.core.teachers import TimmTeacher
    from anymodal.core.data import collate
    from anymodal.plugins.image.data import DigitsDataset

    cfg = compose("tiny-test").cfg
    student = build_backbone(cfg, load_components(autoload=False))
    kwargs = {"img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 48, "num_heads": 2}
    with caplog.at_level("WARNING"):
        teacher = TimmTeacher(student, "vit_tiny_patch16_224", model_kwargs=kwargs)
    assert "randomly initialized" in caplog.text
    data = DigitsDataset("test", size=16)
    raw = collate([data[i] for i in range(4)])
    batch = Batch(raw, student.tokenize(raw), None, torch.Generator())
    out = teacher(batch, layers=2)
    assert out.tokens.x.shape == (4, 16, 48) and out.cls.shape == (4, 48) and len(out.layers) == 2
    assert torch.equal(out.tokens.pos, batch.tokens.pos)
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.net.state_dict().items()}, str(weights))
    again = TimmTeacher(student, "vit_tiny_patch16_224", checkpoint=str(weights), model_kwargs=kwargs)
    assert torch.equal(again(batch).tokens.x, teacher(batch).tokens.x)
    wrong = dict(kwargs, patch_size=8)
    with pytest.raises(ValueError, match="tokens per sample"):
        TimmTeacher(student, "vit_tiny_patch16_224", model_kwargs=dict(wrong, img_size=16))(batch)


def test_retrieval_is_evaluated_for_contrastive_stages(two_stage):
    proc = anymodal("eval", two_stage, "--no-pictures")
    results = json.loads((two_stage / "eval" / "results.json").read_text())
    r = results["retrieval"]["contrastive/contrastive"]
    assert set(r) == {"sample_to_partner_r1", "sample_to_partner_r5", "partner_to_sample_r1", "partner_to_sample_r5"}
    assert all(0.0 <= v <= 1.0 for v in r.values()) and r["sample_to_partner_r5"] >= r["sample_to_partner_r1"]
    assert "partner->sample R@1" in proc.stdout
