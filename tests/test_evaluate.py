"""Probes against direct references, and `anymodal eval` on a real run folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from anymodal.core.evaluate import knn_accuracy, linear_probe
from helpers import anymodal


def knn_reference(xtr, ytr, xte, yte, k, t):
    """Direct float64 loop: cosine similarities, top-k, exp(sim/t) votes."""
    xtr = xtr.double().numpy()
    xte = xte.double().numpy()
    xtr /= np.linalg.norm(xtr, axis=1, keepdims=True)
    xte /= np.linalg.norm(xte, axis=1, keepdims=True)
    correct = 0
    for x, y in zip(xte, yte.numpy()):
        sims = xtr @ x
        top = np.argsort(-sims, kind="stable")[:k]
        votes = {}
        for i in top:
            votes[int(ytr[i])] = votes.get(int(ytr[i]), 0.0) + np.exp(sims[i] / t)
        correct += max(votes, key=votes.get) == y
    return correct / len(xte)


def test_knn_matches_reference():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2
    ytr, yte = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (120,), generator=g)
    xtr = centers[ytr] + torch.randn(300, 16, generator=g) * 2
    xte = centers[yte] + torch.randn(120, 16, generator=g) * 2
    for k in (1, 5, 20):
        assert knn_accuracy(xtr, ytr, xte, yte, k, 0.07) == pytest.approx(knn_reference(xtr, ytr, xte, yte, k, 0.07))


def test_linear_probe_separable_and_chance():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 5, generator=g)
    x = torch.randn(1200, 32, generator=g)
    y = (x @ w).argmax(1)
    assert linear_probe(x[:1000], y[:1000], x[1000:], y[1000:]) > 0.9
    noise = torch.randint(0, 5, (1200,), generator=g)
    assert linear_probe(x[:1000], noise[:1000], x[1000:], noise[1000:]) < 0.35


def test_eval_command_writes_table_and_pictures(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=10")
    out = anymodal("eval", run).stdout
    assert "| pre-trained (mae) |" in out and "| random init |" in out
    results = json.loads((run / "eval" / "results.json").read_text())["results"]
    for r in results.values():
        assert 0.0 <= r["linear_probe"] <= 1.0 and 0.0 <= r["knn"] <= 1.0
    for png in ("loss_curve.png", "reconstruction_pretrain_masked_pixel.png"):
        with Image.open(run / "eval" / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_eval_of_a_folder_that_is_not_a_run(tmp_path):
    proc = anymodal("eval", tmp_path, check=False)
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


@pytest.mark.parametrize("data", [["modality=lidar", "data.train.size=64", "data.test.size=16"],
                                  ["modality=lidar_sweep", "data.train.size=16", "data.test.size=8", "data.batch_size=4"]],
                         ids=["point groups", "pillar sweeps"])
def test_lidar_eval_draws_bird_eye_reconstructions(tmp_path, data):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", *data, "--run-dir", run, "recipe.stages.pretrain.steps=2")
    anymodal("eval", run)
    with Image.open(run / "eval" / "reconstruction_pretrain_masked_pixel.png") as im:
        assert im.size[0] > 500 and im.size[1] > 200


def test_audio_eval_draws_log_mel_reconstructions(tmp_path):
    from anymodal.plugins.audio.data import SMALL_SPOKEN_DIGITS

    run = tmp_path / "run"
    anymodal("train", "tiny-test", "modality=audio", f"data.train.root={SMALL_SPOKEN_DIGITS}",
             f"data.test.root={SMALL_SPOKEN_DIGITS}", "--run-dir", run, "recipe.stages.pretrain.steps=4")
    anymodal("eval", run)
    with Image.open(run / "eval" / "reconstruction_pretrain_masked_pixel.png") as im:
        assert im.size[0] > 500 and im.size[1] > 200


def test_contrastive_eval_draws_a_retrieval_grid_unless_told_not_to(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "recipe=clip", "recipe.stages.contrastive.steps=6", "--run-dir", run)
    anymodal("eval", run, "--no-pictures")
    assert not (run / "eval" / "retrieval_contrastive_contrastive.png").exists()
    anymodal("eval", run)
    with Image.open(run / "eval" / "retrieval_contrastive_contrastive.png") as im:
        assert im.size[0] > 600 and im.size[1] > 600  # 6 queries x (query + top 5)


def test_camera_lidar_contrastive_eval_draws_pillar_queries_and_camera_partners(tmp_path):
    run = tmp_path / "run"
    scenes = ["modality=street_scenes", "data.train.size=8", "data.test.size=4", "data.train.beams=8", "data.test.beams=8",
              "data.train.azimuth_steps=64", "data.test.azimuth_steps=64", "data.batch_size=4"]
    anymodal("train", "tiny-test", *scenes, "recipe=camera_lidar_contrastive", "recipe.stages.*.steps=2", "--run-dir", run)
    anymodal("eval", run)  # the pillar tokenizer's preview needs the Tokens: the grid tokenizes for it
    with Image.open(run / "eval" / "retrieval_contrastive_contrastive.png") as im:
        assert im.size[0] > 400 and im.size[1] > 400
