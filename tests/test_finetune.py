"""`anymodal finetune`: layer-wise lr decay, learning, early stopping, exact resume after SIGTERM,
the dense head, and one error line for each bad input."""

import json
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from anymodal.core.build import build_backbone
from anymodal.core.config import compose
from anymodal.core.finetune import Finetuned, layer_groups, split_validation
from anymodal.plugins.manager import load_components
from helpers import anymodal, spawn

FAST = ["finetune.batch_size=32", "finetune.eval_every=10"]
SCENES = ["modality=street_scenes", "data.train.size=12", "data.test.size=4", "data.train.beams=8", "data.test.beams=8",
          "data.train.azimuth_steps=64", "data.test.azimuth_steps=64", "data.batch_size=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune") / "run"
    anymodal("train", "tiny-test", "--run-dir", folder, "run.progress=false")
    return folder


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def test_layer_decay_scales_each_block_and_exempts_norms():
    cfg = compose("tiny-test").cfg
    backbone = build_backbone(cfg, load_components(cfg.plugins))
    model = Finetuned(backbone, "cls", 10, "label")
    depth = len(backbone.encoder.blocks)
    ft = cfg.finetune
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in layer_groups(model, ft) for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale) == len(named)  # every parameter in exactly one group
    assert scale[id(named["head.1.weight"])] == (1.0, ft.weight_decay)
    assert scale[id(named["backbone.encoder.norm.weight"])] == (1.0, 0.0)
    block0 = next(n for n in named if n.startswith("backbone.encoder.blocks.0.") and n.endswith("weight") and named[n].ndim == 2)
    assert scale[id(named[block0])] == pytest.approx((ft.layer_decay ** depth, ft.weight_decay))
    last = block0.replace("blocks.0.", f"blocks.{depth - 1}.")
    assert scale[id(named[last])][0] == pytest.approx(ft.layer_decay)
    tokenizer = next(n for n in named if n.startswith("backbone.tokenizer.") and named[n].ndim >= 2)
    assert scale[id(named[tokenizer])][0] == pytest.approx(ft.layer_decay ** (depth + 1))


def test_validation_split_is_seeded_and_disjoint():
    train, val = split_validation(100, 0.1, 0)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert split_validation(100, 0.1, 0) == (train, val) and split_validation(100, 0.1, 1) != (train, val)


def test_finetuning_learns_digits_and_writes_its_folder(run):
    proc = anymodal("finetune", run, "finetune.steps=200", "finetune.lr=3e-3", *FAST)
    folder = run / "finetune"
    result = _results(folder)
    assert result["steps"] == 200 and not result["stopped_early"]
    assert result["test"]["accuracy"] > 0.2, result  # 10 classes: chance is 0.1
    assert f"test accuracy {100 * result['test']['accuracy']:.1f}%" in proc.stdout
    best = load_file(str(folder / "best.safetensors"))
    assert "head.1.weight" in best and any(k.startswith("backbone.encoder.blocks.") for k in best)
    lrs = [json.loads(line)["lr"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] < lrs[19] and lrs[-1] < lrs[19] / 10  # warm-up, then the cosine's tail


def test_early_stopping_keeps_the_best_weights(run, tmp_path):
    # a learning rate too small to change a prediction: the validation score never improves
    anymodal("finetune", run, "--out", tmp_path, "finetune.steps=100", "finetune.lr=1e-12", "finetune.min_lr=0",
             "finetune.patience=2", *FAST)
    result = _results(tmp_path)
    assert result["stopped_early"] and result["steps"] == 30 and result["best_step"] == 10, result


def test_sigterm_mid_run_then_resume_gives_the_uninterrupted_run(run, tmp_path):
    args = ["finetune.steps=150", "finetune.checkpoint_every=1000", *FAST]
    anymodal("finetune", run, "--out", tmp_path / "whole", *args)
    proc = spawn("finetune", run, "--out", tmp_path / "cut", *args)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resume with: anymodal finetune" in err and "--resume" in err.splitlines()[-1]
    stopped = len(metrics.read_text().splitlines())
    assert 5 <= stopped < 150
    anymodal("finetune", run, "--out", tmp_path / "cut", *args, "--resume")
    whole, cut = _results(tmp_path / "whole"), _results(tmp_path / "cut")
    assert cut == whole
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    a, b = load_file(str(tmp_path / "whole" / "best.safetensors")), load_file(str(tmp_path / "cut" / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scratch_starts_from_other_weights_in_its_own_folder(run):
    anymodal("finetune", run, "finetune.init=scratch", "finetune.steps=10", *FAST)
    scratch = load_file(str(run / "finetune-scratch" / "best.safetensors"))
    exported = load_file(str(run / "export" / "backbone.safetensors"))
    key = next(k for k in exported if k.startswith("encoder.blocks.0.") and exported[k].ndim == 2)
    assert not torch.allclose(scratch["backbone." + key], exported[key], atol=1e-3)


def test_dense_head_segments_scene_points(tmp_path):
    folder = tmp_path / "scenes"
    anymodal("train", "tiny-test", *SCENES, "--run-dir", folder, "recipe.stages.pretrain.steps=2", "run.progress=false")
    anymodal("finetune", folder, "finetune.head=dense", "finetune.steps=6", "finetune.eval_every=3",
             "finetune.batch_size=4", "finetune.val_fraction=0.25")
    result = _results(folder / "finetune")
    assert result["head"] == "dense" and 0 <= result["test"]["miou"] <= 1 and result["test"]["accuracy"] > 0
    assert load_file(str(folder / "finetune" / "best.safetensors"))["head.1.weight"].shape[0] == 8  # eval.point_classes


@pytest.mark.parametrize("args, says", [
    (["finetune.lrr=1"], "unknown key 'finetune.lrr'"),
    (["model.dim=64"], "model.dim: fine-tuning keeps the run's config"),
    (["finetune.layer_decay=0"], "finetune.layer_decay must be in (0, 1]"),
    (["finetune.head=dense"], "eval.point_labels, which is not set"),
    (["--resume"], "has no fine-tuning checkpoint"),
])
def test_bad_input_is_one_error_line(run, tmp_path, args, says):
    proc = anymodal("finetune", run, "--out", tmp_path, *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("anymodal finetune: error:") and says in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_run_resume_with_other_settings_and_a_torn_checkpoint_are_refused(run, tmp_path):
    anymodal("finetune", run, "--out", tmp_path, "finetune.steps=10", *FAST)
    again = anymodal("finetune", run, "--out", tmp_path, "finetune.steps=10", *FAST, check=False)
    assert again.returncode == 2 and "holds a fine-tuning run already" in again.stderr
    other = anymodal("finetune", run, "--out", tmp_path, "finetune.steps=20", *FAST, "--resume", check=False)
    assert other.returncode == 2 and "the config differs" in other.stderr
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    torn = anymodal("finetune", run, "--out", tmp_path, "finetune.steps=10", *FAST, "--resume", check=False)
    assert torn.returncode == 2 and "cannot be read" in torn.stderr and "Traceback" not in torn.stderr, torn.stderr
