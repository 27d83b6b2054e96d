"""`modality=lidar` (point groups) and `modality=lidar_sweep` (pillars, ragged) run the same
recipe files as images and video, unchanged, through the real command line."""

import json

import pytest

from helpers import anymodal

TINY = ["recipe.stages.*.steps=2", "run.log_every=1", "data.train.size=48", "data.test.size=24", "data.batch_size=8"]


@pytest.mark.parametrize("modality, recipe, extra", [
    ("lidar", "mae", []),
    ("lidar", "jepa", ["recipe.stages.pretrain.objectives.jepa.target_layers=2"]),  # tiny-test has 2 blocks
    ("lidar", "videoprism", []),
    ("lidar_sweep", "mae", ["data.train.size=4", "data.test.size=4", "data.batch_size=2"]),
])
def test_lidar_recipes_train(tmp_path, modality, recipe, extra):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", f"modality={modality}", f"recipe={recipe}", "--run-dir", run, *TINY, *extra,
             env_extra={"ANYMODAL_CACHE": str(tmp_path / "cache")}, timeout=600)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["loss"] == r["loss"] and r["loss"] >= 0 for r in records)  # finite, set distances >= 0
