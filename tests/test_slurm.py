"""`anymodal submit` against a real Slurm cluster (scripts/local_slurm.sh starts one on localhost).

Skipped with the reason when no Slurm answers here; CI sets ANYMODAL_REQUIRE_SLURM=1 so that a
cluster that failed to start is a failure, not a skip.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from anymodal.core.checkpoint import load_checkpoint
from helpers import anymodal, losses

# small jobs that fit the local node next to each other; one thread so they match a local run exactly
JOB = ["launcher.cpus_per_task=1", "launcher.mem_gb=1", "run.threads=1"]
LONG = ["tiny-test", "recipe.stages.pretrain.steps=150", "run.checkpoint_every=1000", *JOB]


def _slurm_state() -> str:
    if shutil.which("sinfo") is None:
        return "no `sinfo` on PATH (install Slurm: bash scripts/local_slurm.sh install && bash scripts/local_slurm.sh start)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not re.search(r"idle|mixed|alloc", proc.stdout):
        return f"Slurm does not answer ({(proc.stderr or proc.stdout).strip()[:200]}); start it: bash scripts/local_slurm.sh start"
    return ""


@pytest.fixture(scope="module", autouse=True)
def slurm():
    problem = _slurm_state()
    if problem:
        if os.environ.get("ANYMODAL_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


def job_id(stdout: str) -> str:
    return re.search(r"submitted job (\S+):", stdout).group(1)


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_until(condition, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.25)


def release(job: str) -> bool:
    """Ask Slurm to start a held job now; False, so that `wait_until` checks again."""
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
    time.sleep(1.0)
    return False


def steps_done(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def interrupted_job_finishes_like_an_uninterrupted_run(tmp_path: Path, interrupt) -> None:
    run = tmp_path / "run"
    job = job_id(anymodal("submit", *LONG, "--run-dir", run).stdout)
    wait_until(lambda: steps_done(run) >= 20, 180, "the job to reach step 20")
    interrupt(job)
    wait_until(lambda: job_field(job, "Restarts") not in ("", "0") and job_field(job, "JobState") == "PENDING", 90,
               "the job to be requeued")
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 20 <= saved < 150  # checkpointed on the signal, mid-run
    # Slurm holds a requeued job for two minutes before it may start again; release it, again while it
    # stays pending (a release that lands before the requeue has set its hold is overwritten by it)
    wait_until(lambda: job_field(job, "JobState") != "PENDING" or release(job), 90, "the requeued job to start")
    wait_until(lambda: (run / "checkpoints" / "pretrain-final.pt").is_file() and job_field(job, "JobState") == "COMPLETED",
               240, "the requeued job to finish")
    reference = tmp_path / "reference"
    anymodal("train", *LONG, "--run-dir", reference)
    assert losses(run) == losses(reference)  # every step once, nothing lost or repeated
    mine = load_checkpoint(run / "checkpoints" / "pretrain-final.pt")["backbone"]
    theirs = load_checkpoint(reference / "checkpoints" / "pretrain-final.pt")["backbone"]
    assert all((mine[k] == theirs[k]).all() for k in theirs)


def test_scontrol_requeue_resumes_at_the_step_it_stopped(tmp_path):
    interrupted_job_finishes_like_an_uninterrupted_run(
        tmp_path, lambda job: subprocess.run(["scontrol", "requeue", job], check=True))


def test_preemption_signal_checkpoints_and_requeues(tmp_path):
    """USR2 is submitit's preemption/time-out signal: checkpoint, then submitit requeues the job."""
    interrupted_job_finishes_like_an_uninterrupted_run(
        tmp_path, lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True))


def test_sweep_runs_as_a_job_array(tmp_path):
    proc = anymodal("submit", "tiny-test", "recipe.stages.pretrain.steps=5", *JOB, "--sweep", "model.depth=1,2",
                    "--run-dir", tmp_path / "sweep", "--wait", timeout=300)
    ids = re.findall(r"submitted job (\S+):", proc.stdout)
    assert len(ids) == 2 and all(re.fullmatch(r"\d+_[01]", i) for i in ids)
    for depth in (1, 2):
        run = tmp_path / "sweep" / f"depth={depth}"
        assert (run / "checkpoints" / "pretrain-final.pt").is_file() and (run / "config.yaml").is_file()
        assert f"depth: {depth}" in (run / "config.yaml").read_text()
    assert len(list((tmp_path / "sweep" / "slurm").glob("*/*_log.out"))) == 2


def test_submit_refuses_a_typo_before_queueing(tmp_path):
    proc = anymodal("submit", "tiny-test", "run.nmae=x", *JOB, "--run-dir", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "nmae" in proc.stderr
    assert not (tmp_path / "r").exists()
