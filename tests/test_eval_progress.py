"""`anymodal eval` says what it is doing, stops on SIGTERM with what to do next, and names a bad
exported backbone; `anymodal doctor` gives install commands that fit how anymodal was installed."""

import fcntl
import logging
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from anymodal.plugins.environment import install_command, source_checkout
from anymodal.core.evaluate import EvalInterrupted, evaluate_run
from anymodal.plugins.manager import load_components
from helpers import anymodal, spawn

REPO = Path(__file__).resolve().parent.parent
# a small eval: its phases take a second or two, so a test sees them without waiting minutes
SMALL_EVAL = ["eval.max_train=300", "eval.max_test=100", "eval.probe_iters=10", "eval.pictures=false"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=2", "run.progress=true", *SMALL_EVAL)
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_eval_logs_every_phase_with_its_counts(finished_run, caplog):
    with caplog.at_level(logging.INFO, logger="anymodal.eval"):
        evaluate_run(finished_run, load_components(autoload=False))
    lines = [r.getMessage() for r in caplog.records if r.name == "anymodal.eval"]
    assert "300 train and 100 test samples (eval.max_train=300, eval.max_test=100)" in lines, lines
    for model in ("pre-trained (mae)", "random init"):
        assert f"{model}: features of the train split, 300 samples in batches of 256" in lines, lines
        assert f"{model}: features of the test split, 100 samples in batches of 256" in lines, lines
        assert f"{model}: linear probe of label on 300 x 64 features (10 L-BFGS iterations), tested on 100" in lines, lines
        assert f"{model}: k-NN of label (k=20), 100 queries against 300" in lines, lines
    assert lines[-1].startswith(f"eval of {finished_run} done in ") and lines[-1].endswith("results.json, table.md")


def _stopped(proc, first_line_with, read_line):
    """Read until a line holds ``first_line_with``, then SIGTERM the process and return its exit status."""
    seen = []
    while not any(first_line_with in line for line in seen):
        line = read_line()
        assert line, f"eval ended before printing {first_line_with!r}:\n{''.join(seen)}"
        seen.append(line)
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60), "".join(seen)


def test_sigterm_during_eval_says_what_was_written_and_how_to_rerun(finished_run):
    proc = spawn("eval", finished_run, "--no-pictures")
    code, before = _stopped(proc, "features of the train split", proc.stderr.readline)
    rest = proc.stderr.read()
    assert code == 128 + signal.SIGTERM, before + rest
    assert "Traceback" not in rest and rest.strip().splitlines() == [
        f"anymodal eval: stopped by SIGTERM; nothing was written yet; run it again with: "
        f"anymodal eval {finished_run} --no-pictures"], rest
    assert not list((finished_run / "eval").glob(".*.tmp"))


def test_an_interruption_lists_what_was_written(tmp_path):
    written = [tmp_path / "eval" / "results.json", tmp_path / "eval" / "table.md"]
    stop = EvalInterrupted(signal.SIGINT, written)
    assert stop.code == 130 and str(stop) == f"stopped by SIGINT; wrote {written[0]}, {written[1]}"


def test_eval_on_a_terminal_shows_progress_bars(finished_run):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a fresh pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "anymodal", "eval", str(finished_run), "--no-pictures"],
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    with os.fdopen(leader, "rb", buffering=0) as terminal:
        def read_line():  # tqdm redraws with carriage returns: a drawn bar counts as a line
            chunk = b""
            while not chunk.endswith((b"\n", b"\r")):
                try:
                    byte = terminal.read(1)
                except OSError:  # the process closed the terminal
                    byte = b""
                if not byte:
                    break
                chunk += byte
            return chunk.decode(errors="replace")

        code, seen = _stopped(proc, "pre-trained (mae) train:", read_line)
    assert code == 128 + signal.SIGTERM and "0/2 [" in seen and "batch/s]" in seen, seen


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_exported_backbone_is_one_named_error(run_copy, damage):
    weights = run_copy / "export" / "backbone.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    proc = anymodal("eval", run_copy, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"anymodal eval: error: exported backbone {weights} is corrupt or truncated (") and \
        line.endswith(f"; write it from the run's last checkpoint with: anymodal export {run_copy}"), line


def test_a_missing_exported_backbone_says_how_to_write_it(run_copy):
    (run_copy / "export" / "backbone.safetensors").unlink()
    proc = anymodal("eval", run_copy, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"anymodal eval: error: exported backbone {run_copy / 'export' / 'backbone.safetensors'} does not exist; "
        f"write it from the run's last checkpoint with: anymodal export {run_copy}"]


def test_install_commands_for_a_clone_and_for_an_installed_package(tmp_path):
    clone = tmp_path / "anymodal"
    clone.mkdir()
    assert install_command("video", clone, clone) == 'pip install -e ".[video]"'
    assert install_command("video", clone, tmp_path) == f'pip install -e "{clone}[video]"'
    assert install_command("video", None, tmp_path) == 'pip install "anymodal[video]"'
    assert source_checkout() == REPO  # these tests run from a clone


def test_doctor_in_a_clone_suggests_editable_installs():
    out = anymodal("doctor", cwd=REPO).stdout
    missing = [line for line in out.splitlines() if " missing " in line and "pip install" in line]
    assert not any("pip install anymodal[" in line or 'pip install "anymodal[' in line for line in missing), out
    for line in missing:
        assert 'pip install -e ".[' in line or "pip install --no-deps" in line or "pip install submitit" in line, line
