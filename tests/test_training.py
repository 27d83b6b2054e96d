"""The trainer for real: subprocess runs, kill -9 and --resume, SIGTERM, NaN guard, torn writes."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anymodal.core.checkpoint import CheckpointError, load_checkpoint
from helpers import anymodal, losses, spawn

# augmentation, drop-path and a loader worker: every source of randomness a resume must restore
RANDOM = ["model.drop_path=0.1", "data.transforms=[{name: random_translate, max_shift: 1}]"]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"run did not reach step {step} in {timeout} s")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=30", *RANDOM)
    return run


def test_run_folder_layout(reference_run):
    assert (reference_run / "config.yaml").is_file()
    assert (reference_run / "checkpoints" / "last.pt").is_file()
    assert (reference_run / "checkpoints" / "pretrain-final.pt").is_file()
    assert (reference_run / "export" / "backbone.safetensors").is_file()
    assert [s for _, s, _ in losses(reference_run)] == list(range(1, 31))
    state = load_checkpoint(reference_run / "checkpoints" / "last.pt")  # weights_only=True
    assert state["step"] == 30 and state["stage"] == "pretrain"


def test_kill_9_then_resume_reproduces_losses(reference_run, tmp_path):
    run = tmp_path / "run"
    args = ["train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=30", "data.num_workers=1", *RANDOM]
    proc = spawn(*args)
    wait_for_step(run, 13, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] < 30
    anymodal(*args, "--resume")
    assert losses(run) == losses(reference_run)


def test_micro_batches_give_the_losses_of_the_whole_batch(tmp_path):
    """optim.accumulate_steps: the batch in 4 micro-batches of 8 (one backward each, one optimizer
    step) trains like the batch of 32 in one pass (MAE: a mean over samples of equal token counts;
    masks and augmentations drawn in the same order), and resumes exactly after kill -9."""
    run = tmp_path / "micro"
    args = ["train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=16", "data.num_workers=1",
            "recipe.stages.pretrain.optim.accumulate_steps=4", "data.transforms=[{name: random_translate, max_shift: 1}]"]
    proc = spawn(*args)
    wait_for_step(run, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    anymodal(*args, "--resume")
    whole = tmp_path / "whole"
    anymodal("train", "tiny-test", "--run-dir", whole, "recipe.stages.pretrain.steps=16", "data.num_workers=1",
             "data.transforms=[{name: random_translate, max_shift: 1}]")
    assert [s for _, s, _ in losses(run)] == list(range(1, 17))
    for (_, _, a), (_, _, b) in zip(losses(run), losses(whole)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_sigterm_checkpoints_and_resume_continues(reference_run, tmp_path):
    run = tmp_path / "run"
    args = ["train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=30", "run.checkpoint_every=1000", *RANDOM]
    proc = spawn(*args)
    wait_for_step(run, 7, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    last = run / "checkpoints" / "last.pt"
    assert f"checkpoint {last}; resume with: anymodal train --resume --run-dir {run}" in proc.stderr.read()
    saved = load_checkpoint(last)["step"]
    assert saved == losses(run)[-1][1]  # nothing done after the last checkpoint is lost
    anymodal(*args, "--resume")
    assert losses(run) == losses(reference_run)


def test_existing_run_needs_resume(reference_run):
    proc = anymodal("train", "tiny-test", "--run-dir", reference_run, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_checkpoint_from_another_model_is_refused(reference_run, tmp_path):
    proc = anymodal("train", "tiny-test", "--run-dir", reference_run, "--resume", "model.dim=32",
                    "recipe.stages.pretrain.steps=40", "--allow-changes", check=False)
    assert proc.returncode == 2
    assert "do not fit this model" in proc.stderr and "shape" in proc.stderr and "Traceback" not in proc.stderr


NAN_PLUGIN = '''
import torch
from torch import nn
from anymodal.plugins import hookimpl
from anymodal.core.objective import ObjectiveOutput


class NanAfter(nn.Module):
    """Contributes zero loss until `after` calls, then NaN (a diverging run)."""

    def __init__(self, dim, tokenizer, after=7):
        super().__init__()
        self.after = after
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, batch, student, teacher=None):
        self.calls += 1
        value = float("nan") if int(self.calls) > self.after else 0.0
        return ObjectiveOutput(torch.tensor(value), {})


@hookimpl
def register_objectives():
    return {"nan_after": NanAfter}
'''


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
    (tmp_path / "nanplug.py").write_text(NAN_PLUGIN)
    run = tmp_path / "run"
    proc = anymodal("train", "tiny-test", "--run-dir", run, "plugins=[nanplug]",
                    "recipe.stages.pretrain.objectives.nan_after={after: 7}", check=False,
                    env_extra={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 3, proc.stderr
    assert "loss is nan at stage 'pretrain' step 8" in proc.stderr
    assert str(run / "checkpoints" / "last.pt") in proc.stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 5  # checkpoint_every=5: the last good one
    assert all(torch.isfinite(v).all() for v in state["backbone"].values())


WRITER = '''
import sys, torch
from anymodal.core.checkpoint import save_atomic
path = sys.argv[1]
step = 0
while True:
    step += 1
    save_atomic({"step": step, "weights": torch.full((4_000_000,), float(step))}, path)
    print(step, flush=True)
'''


def test_kill_mid_write_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for delay in (0.6, 0.75, 0.9, 1.05):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint exists
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = load_checkpoint(path)
        assert torch.equal(state["weights"], torch.full((4_000_000,), float(state["step"])))


def test_torn_file_gives_clear_error(tmp_path):
    path = tmp_path / "torn.pt"
    torch.save({"format": 1, "x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_export_round_trip(reference_run):
    from anymodal.core.build import build_backbone
    from anymodal.core.config import load_run_config
    from anymodal.core.export import load_exported
    from anymodal.plugins import load_components

    cfg = load_run_config(reference_run)
    backbone = load_exported(build_backbone(cfg, load_components(autoload=False)), reference_run / "export")
    final = load_checkpoint(reference_run / "checkpoints" / "pretrain-final.pt")["backbone"]
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, final[k]), k
    exported_cfg = (reference_run / "export" / "config.yaml").read_text()
    assert "image_patch" in exported_cfg


def test_collate_pads_variable_length_sets_and_marks_the_padding():
    from anymodal.core.data import collate

    clouds = [torch.arange(12.0).reshape(4, 3), torch.ones(2, 3), torch.full((3, 3), 2.0)]
    batch = collate([{"points": c, "label": i} for i, c in enumerate(clouds)])
    assert batch["points"].shape == (3, 4, 3)
    assert batch["points_padding"].tolist() == [[False] * 4, [False, False, True, True], [False, False, False, True]]
    for i, c in enumerate(clouds):
        assert torch.equal(batch["points"][i, :len(c)], c) and not batch["points"][i, len(c):].any()
    # images of different sizes are a mistake, not a set
    with pytest.raises(ValueError, match="different shapes"):
        collate([{"image": torch.zeros(1, 4, 4)}, {"image": torch.zeros(1, 5, 4)}])
