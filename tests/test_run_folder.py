"""A run folder holds one run and never loses it: stage boundaries, restarts, two runs, resume changes, full disks."""

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from anymodal.core.checkpoint import load_checkpoint
from anymodal.core.config import load_run_config
from anymodal.core.runfolder import RunFolder
from helpers import anymodal, losses, spawn

TWO_STAGE = ["train", "tiny-two-stage", "recipe.stages.contrastive.steps=8", "recipe.stages.distill.steps=8",
             "run.checkpoint_every=3"]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError(f"condition not reached in {timeout} s")


def _lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    anymodal(*TWO_STAGE, "--run-dir", run)
    return run


def _same_run(run: Path, reference: Path) -> None:
    assert losses(run) == losses(reference)  # every step once, in order, with the same loss
    for stage in ("contrastive", "distill"):
        final = load_checkpoint(run / "checkpoints" / f"{stage}-final.pt")["backbone"]
        ref = load_checkpoint(reference / "checkpoints" / f"{stage}-final.pt")["backbone"]
        assert all(torch.equal(final[k], ref[k]) for k in ref), stage


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_at_the_stage_boundary_resumes_exactly(two_stage, tmp_path, sig):
    """The signal lands as stage 1's final weights appear: while they are written, between the stages,
    or as stage 2 sets up; every case resumes to the uninterrupted run."""
    run = tmp_path / "run"
    proc = spawn(*TWO_STAGE, "--run-dir", run)
    _wait_for(lambda: (run / "checkpoints" / ".contrastive-final.pt.{}.tmp".format(proc.pid)).exists()
              or (run / "checkpoints" / "contrastive-final.pt").exists(), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + sig, err
        assert "resume with: anymodal train --resume --run-dir" in err and "Traceback" not in err, err
    anymodal("train", "--resume", "--run-dir", run)
    _same_run(run, two_stage)


def test_checkpoint_that_ends_a_stage_without_its_final_file_resumes(two_stage, tmp_path):
    """A folder whose last.pt says stage 1 ended but whose final file is missing (an older version wrote
    them in that order): the final weights are rebuilt from the checkpoint."""
    run = tmp_path / "run"
    proc = spawn(*TWO_STAGE, "--run-dir", run)
    _wait_for(lambda: _lines(run) >= 9, proc)  # inside stage 2, before its first checkpoint
    proc.kill()
    proc.wait()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["stage"] == "contrastive"
    (run / "checkpoints" / "contrastive-final.pt").unlink()
    anymodal("train", "--resume", "--run-dir", run)
    _same_run(run, two_stage)


@pytest.mark.parametrize("again", [[], ["--resume"]])
def test_restart_before_the_first_checkpoint_logs_each_step_once(tmp_path, again):
    run = tmp_path / "run"
    args = ["train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=8", "run.checkpoint_every=100"]
    proc = spawn(*args)
    _wait_for(lambda: _lines(run) >= 3, proc)
    proc.kill()
    proc.wait()
    assert not (run / "checkpoints" / "last.pt").exists()
    anymodal(*args, *again)
    assert [s for _, s, _ in losses(run)] == list(range(1, 9))


def test_two_runs_in_one_folder_are_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    args = ["train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=400", "run.checkpoint_every=2"]
    first = spawn(*args)
    try:
        _wait_for(lambda: (run / "checkpoints" / "last.pt").exists(), first)
        for extra in ([], ["--resume"]):
            proc = anymodal(*args, *extra, check=False)
            assert proc.returncode == 2, proc.stderr
            assert f"is in use by pid {first.pid}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    finally:
        first.kill()
        first.wait()
    steps = [s for _, s, _ in losses(run)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved lines
    with RunFolder(run).lock():  # the lock died with its holder
        pass


def test_resume_uses_the_saved_config_and_refuses_changes(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=6")
    saved = (run / "config.yaml").read_text()
    # the command line's config is not the run's: the saved one (6 steps) wins; harmless overrides are taken
    proc = anymodal("train", "tiny-test", "--resume", "--run-dir", run, "run.threads=1", "eval.knn_k=5")
    assert [s for _, s, _ in losses(run)] == list(range(1, 7)), proc.stderr
    # ones that change the weights are refused, naming them
    proc = anymodal("train", "--resume", "--run-dir", run, "run.seed=1", "recipe.stages.pretrain.optim.lr=0.5", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "run.seed: 0 -> 1" in proc.stderr and "--allow-changes" in proc.stderr, proc.stderr
    assert (run / "config.yaml").read_text() == saved
    # allowed: recorded beside the original config, and carried into later resumes
    anymodal("train", "--resume", "--run-dir", run, "recipe.stages.pretrain.steps=9", "--allow-changes")
    assert [s for _, s, _ in losses(run)] == list(range(1, 10))
    assert (run / "config.yaml").read_text() == saved
    records = [json.loads(line) for line in (run / "config-changes.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["changes"]["recipe.stages.pretrain.steps"] == {"before": 6, "after": 9}
    assert load_run_config(run).recipe.stages.pretrain.steps == 9  # what resume, eval and export read


def test_orphan_temp_files_are_removed_on_start(tmp_path):
    run = tmp_path / "run"
    args = ["train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=2"]
    anymodal(*args)
    orphans = [run / "checkpoints" / ".last.pt.999999.tmp", run / "checkpoints" / ".pretrain-final.pt.4242.tmp",
               run / "config.tmp", run / "export" / ".backbone.safetensors.tmp"]
    for path in orphans:
        path.write_bytes(b"partial")
    anymodal(*args, "--resume")
    assert not any(p.exists() for p in orphans)


def test_full_disk_names_the_file_and_the_last_good_checkpoint(tmp_path):
    """On a tmpfs with room for one checkpoint but not for writing the next beside it."""
    probe = tmp_path / "probe"
    args = ["train", "tiny-test", "recipe.stages.pretrain.steps=4", "run.checkpoint_every=2"]
    anymodal(*args, "--run-dir", probe)
    size = (probe / "checkpoints" / "last.pt").stat().st_size
    mount = tmp_path / "small"
    mount.mkdir()
    kib = (size + (probe / "config.yaml").stat().st_size) * 3 // 2 // 1024 + 64
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = mount / "run"
        proc = anymodal(*args, "--run-dir", run, check=False)
        assert proc.returncode == 2, proc.stderr
        last = run / "checkpoints" / "last.pt"
        assert f"no space left on device while writing {last}; the last good checkpoint is {last}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not list((run / "checkpoints").glob(".*.tmp"))  # the partial file is gone
        assert load_checkpoint(last)["step"] == 2
    finally:
        subprocess.run(["umount", str(mount)])


def test_values_only_a_component_can_check_are_one_error_line(tmp_path):
    """Objective arguments are checked when the stage builds them (a stage teacher needs the earlier
    stage's weights first); a value they reject is a config error naming the key, not a traceback."""
    for override, message in [("recipe.stages.pretrain.objectives.masked_pixel.decoder_heads=5",
                               "recipe.stages.pretrain.objectives: dim 96 is not divisible by num_heads 5"),
                              ("run.device=cuda", "run.device=cuda but torch sees no CUDA device")]:
        if override == "run.device=cuda" and torch.cuda.is_available():
            continue
        proc = anymodal("train", "tiny-test", "--run-dir", tmp_path / "run", override, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
