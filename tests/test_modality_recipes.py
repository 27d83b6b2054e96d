"""`modality=lidar` (point groups), `modality=lidar_sweep` (pillars, ragged) and `modality=audio`
(spectrogram patches, ragged clips) run the same recipe files as images and video, unchanged,
through the real command line."""

import json

import pytest
from omegaconf import OmegaConf

from anymodal.plugins.audio.data import SMALL_SPOKEN_DIGITS
from helpers import anymodal

TINY = ["recipe.stages.*.steps=2", "run.log_every=1", "data.batch_size=8"]
SMALL_SETS = ["data.train.size=48", "data.test.size=24"]
# the copy shipped in the package, so the test reads the same clips with or without a full build
SMALL_AUDIO = [f"data.train.root={SMALL_SPOKEN_DIGITS}", f"data.test.root={SMALL_SPOKEN_DIGITS}"]
JEPA_TINY = ["recipe.stages.pretrain.objectives.jepa.target_layers=2"]  # tiny-test has 2 blocks


@pytest.mark.parametrize("modality, recipe, extra", [
    ("lidar", "mae", SMALL_SETS),
    ("lidar", "jepa", SMALL_SETS + JEPA_TINY),
    ("lidar", "videoprism", SMALL_SETS),
    ("lidar_sweep", "mae", ["data.train.size=4", "data.test.size=4", "data.batch_size=2"]),
    ("audio", "mae", SMALL_AUDIO),
    ("audio", "jepa", SMALL_AUDIO + JEPA_TINY),
    ("audio", "videoprism", SMALL_AUDIO),
])
def test_recipe_trains_on_modality(tmp_path, modality, recipe, extra):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", f"modality={modality}", f"recipe={recipe}", "--run-dir", run, *TINY, *extra,
             env_extra={"ANYMODAL_CACHE": str(tmp_path / "cache")}, timeout=600)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["loss"] == r["loss"] and r["loss"] >= 0 for r in records)  # finite; set distances >= 0
    assert {r["stage"] for r in records} == set(OmegaConf.load(run / "config.yaml").recipe.stages)  # every stage ran
