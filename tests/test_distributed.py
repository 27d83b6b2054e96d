"""torch.distributed for real: torchrun with two gloo processes on CPU, against one process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anymodal.core.checkpoint import load_checkpoint
from anymodal.core.data import StepBatchSampler
from helpers import anymodal, losses

TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "anymodal"]
# clip: its loss uses every rank's samples as negatives (all_gather with gradients), so the
# two-process run computes the same function as one process with the same global batch
CLIP = ["tiny-test", "recipe=clip", "recipe.stages.contrastive.steps=12", "run.threads=1"]


def torchrun(*args, check=True, **kwargs):
    proc = subprocess.run([*TWO_RANKS, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def start_and_wait(args, run: Path, steps: int) -> subprocess.Popen:
    """Start a two-rank run in the background; return once it has logged ``steps`` steps."""
    proc = subprocess.Popen([*TWO_RANKS, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    end = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.time() < end, f"run ended early: {proc.stderr.read()[-2000:]}"
        time.sleep(0.05)
    return proc


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_checkpoint(a)["backbone"], load_checkpoint(b)["backbone"]
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def test_ranks_split_each_global_batch():
    one = list(iter_batches(StepBatchSampler(100, 8, seed=3, start_step=2), 5))
    shares = [list(iter_batches(StepBatchSampler(100, 8, seed=3, start_step=2, rank=r, world=2), 5)) for r in (0, 1)]
    for step, batch in enumerate(one):
        assert sorted(shares[0][step] + shares[1][step]) == sorted(batch)
        assert len(shares[0][step]) == len(shares[1][step]) == 4
    with pytest.raises(ValueError, match="divide evenly over 3 processes"):
        StepBatchSampler(100, 8, seed=3, world=3)


def iter_batches(sampler, n):
    for i, batch in zip(range(n), sampler):
        yield batch


@pytest.fixture(scope="module")
def one_process_clip(tmp_path_factory):
    run = tmp_path_factory.mktemp("clip") / "one"
    anymodal("train", *CLIP, "--run-dir", run)
    return run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(one_process_clip, tmp_path, parallel):
    tmp_path.joinpath("one").symlink_to(one_process_clip)
    torchrun("train", *CLIP, f"run.parallel={parallel}", "--run-dir", tmp_path / "two")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for _, s, _ in two] == list(range(1, 13))  # rank 0 alone wrote the metrics
    for (_, _, a), (_, _, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    final = "checkpoints/contrastive-final.pt"  # whole weights under either parallelism
    assert max_weight_difference(tmp_path / "one" / final, tmp_path / "two" / final) < 1e-3


def test_online_monitors_under_fsdp_match_one_process(tmp_path):
    """Rank 0 probes the gathered whole backbone: the same k-NN and linear-probe scores as one process."""
    args = [*CLIP, "eval.monitor_every=6", "eval.monitor_samples=64"]
    anymodal("train", *args, "--run-dir", tmp_path / "one")
    torchrun("train", *args, "run.parallel=fsdp", "--run-dir", tmp_path / "two")

    def watched(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["monitor/knn"], r["monitor/linear"], r["monitor/rankme"]) for r in rows if "monitor/knn" in r}

    one, two = watched(tmp_path / "one"), watched(tmp_path / "two")
    assert sorted(one) == sorted(two) == [6, 12]
    for step in one:
        assert one[step][:2] == pytest.approx(two[step][:2], abs=0.05) and one[step][2] == pytest.approx(two[step][2], rel=1e-2)


def rank_pid(parent: int, rank: int) -> int:
    """The worker process of torchrun ``parent`` that holds ``rank`` (from its environment)."""
    for pid in map(int, subprocess.run(["pgrep", "-f", "anymodal train"], capture_output=True, text=True).stdout.split()):
        try:
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RUN_ID") is not None and _has_ancestor(pid, parent):
            return pid
    raise AssertionError(f"no rank-{rank} worker under torchrun {parent}")


def _has_ancestor(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False


def test_kill_9_of_a_rank_loses_only_steps_since_the_checkpoint(tmp_path):
    """MAE with masks drawn per rank; rank 1 is killed with SIGKILL mid-run, the job resumes."""
    mae = ["tiny-test", "recipe.stages.pretrain.steps=40", "run.checkpoint_every=5", "run.threads=1"]
    torchrun("train", *mae, "--run-dir", tmp_path / "whole")
    run = tmp_path / "killed"
    proc = start_and_wait(["train", *mae, "--run-dir", run], run, steps=17)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    done = losses(run)[-1][1]
    saved = load_checkpoint(run / "checkpoints/last.pt")["step"]
    assert done - saved < 5 and saved < 40  # lost no more than the steps since the last checkpoint
    torchrun("train", *mae, "--run-dir", run, "--resume")
    assert losses(run) == losses(tmp_path / "whole")
    assert max_weight_difference(run / "checkpoints/last.pt", tmp_path / "whole/checkpoints/last.pt") == 0.0


def test_two_stage_recipe_with_stage_teacher_runs_on_two_ranks(tmp_path):
    """Stage 2 reads stage 1's final weights (written by rank 0) as init and frozen teacher on every rank."""
    torchrun("train", "tiny-two-stage", "run.threads=1", "--run-dir", tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    stages = [p.name for p in sorted(folder.glob("*-final.pt"))]
    assert len(stages) == 2
    assert torch.isfinite(torch.tensor([l for _, _, l in losses(tmp_path / "run")])).all()


def test_scene_recipe_runs_on_two_ranks(tmp_path):
    """Each stage trains one sensor of a two-sensor backbone: the other sensor's tokenizer takes no part
    in the step, which DDP's static graph accepts on every rank alike."""
    torchrun("train", "tiny-test", "modality=street_scenes", "data.batch_size=4", "data.train.size=16",
             "recipe=scene_two_stage", "recipe.stages.*.steps=3", "run.threads=1", "--run-dir", tmp_path / "run")
    rows = losses(tmp_path / "run")
    assert [stage for stage, _, _ in rows] == ["camera"] * 3 + ["lidar"] * 3
    assert torch.isfinite(torch.tensor([l for _, _, l in rows])).all()


def test_fsdp_sigterm_writes_shards_and_resumes_exactly(tmp_path):
    """FSDP with an EMA teacher (sharded like the student): SIGTERM to torchrun reaches both ranks,
    each writes its shards; the resumed run repeats the uninterrupted one step for step, and the
    checkpoint also exports and resumes in one process."""
    jepa = ["tiny-test", "recipe=jepa", "model.depth=4", "recipe.stages.pretrain.steps=12",
            "run.checkpoint_every=1000", "run.threads=1", "run.parallel=fsdp"]
    torchrun("train", *jepa, "--run-dir", tmp_path / "whole")
    run = tmp_path / "stopped"
    proc = start_and_wait(["train", *jepa, "--run-dir", run], run, steps=5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    state = load_checkpoint(run / "checkpoints/last.pt")
    assert state["step"] == losses(run)[-1][1] < 12  # saved at the step it stopped: nothing lost
    shards = run / "checkpoints" / state["shards"]  # each rank wrote its own shards (torch.distributed.checkpoint)
    assert (shards / ".metadata").is_file() and len(list(shards.glob("*.distcp"))) == 2
    one_process = tmp_path / "one-process"  # the same checkpoint resharded onto one process
    shutil.copytree(run, one_process)
    anymodal("export", one_process, "--out", tmp_path / "export")
    anymodal("train", *jepa, "--run-dir", one_process, "--resume")
    torchrun("train", *jepa, "--run-dir", run, "--resume")
    assert losses(run) == losses(tmp_path / "whole")
    assert max_weight_difference(run / "checkpoints/pretrain-final.pt", tmp_path / "whole/checkpoints/pretrain-final.pt") == 0.0
    assert losses(one_process)[-1][1] == 12


def test_two_ranks_accumulating_micro_batches_match_the_whole_share(tmp_path):
    """optim.accumulate_steps under DDP: each rank's share in 2 micro-batches (every backward
    all-reduced) gives the losses and weights of the share in one pass."""
    mae = ["tiny-test", "recipe.stages.pretrain.steps=6", "run.threads=1"]
    torchrun("train", *mae, "--run-dir", tmp_path / "whole")
    torchrun("train", *mae, "recipe.stages.pretrain.optim.accumulate_steps=2", "--run-dir", tmp_path / "micro")
    for (_, _, a), (_, _, b) in zip(losses(tmp_path / "whole"), losses(tmp_path / "micro")):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    final = "checkpoints/pretrain-final.pt"
    assert max_weight_difference(tmp_path / "whole" / final, tmp_path / "micro" / final) < 1e-4
