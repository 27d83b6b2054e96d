"""The radar plugin: registered through its entry point or by module name, tokenizer contract,
padding, and a short two-stage run."""

import subprocess
import sys

import torch

import anymodal_radar
from anymodal.core.data import collate
from anymodal.plugins import load_components


def test_loads_and_passes_the_contract_check():
    components = load_components(["anymodal_radar"])
    assert components.tokenizer.entry("radar_bev").plugin in ("radar", "anymodal_radar")
    assert "radar_objects" in components.dataset


def test_captions_and_ragged_batches():
    data = anymodal_radar.RadarObjects("train", size=8)
    batch = collate([data[i] for i in range(8)])
    assert batch["radar"].shape[-1] == 5 and batch["radar_padding"].any()
    assert batch["text"][1] == "a radar return of a cyclist" and batch["label"].tolist()[:4] == [0, 1, 2, 3]


def test_padding_does_not_change_tokens():
    data = anymodal_radar.RadarObjects("test", size=4)
    tok = anymodal_radar.RadarBev(dim=16)
    batch = collate([data[i] for i in range(4)])
    alone = tok(data[0]["radar"][None])
    padded = tok(batch["radar"], padding=batch["radar_padding"])
    assert torch.allclose(alone.x[0], padded.x[0], atol=1e-6) and torch.equal(alone.targets[0], padded.targets[0])


def test_two_stage_run(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "anymodal", "train", str(anymodal_radar.CONFIG),
                           "plugins=[anymodal_radar]", "recipe.stages.*.steps=2", "--run-dir", str(run)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
