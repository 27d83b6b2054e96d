"""Run folders at an s3:// URL, for real: a moto S3 server on localhost (tests/s3_server.py), real
subprocesses, kill -9 and a resume from the URL alone, one run per remote folder, one-line errors,
and the secret key in nothing a run writes or prints."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anymodal.core.checkpoint import load_checkpoint
from anymodal.core.remote_run import RemoteRun
from helpers import anymodal, losses, spawn
from s3_server import CREDENTIALS, make_bucket

SECRET = CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
KILLED = ["recipe.stages.pretrain.steps=8", "run.checkpoint_every=2"]
EVAL = ["eval.max_train=100", "eval.max_test=50", "eval.probe_iters=5"]


def _fs():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def _remote_files(url: str) -> dict[str, bytes]:
    fs, root = _fs(), url[len("s3://"):]
    return {name[len(root) + 1:]: fs.cat_file(name) for name in fs.find(root)}


def _remote_losses(url: str) -> list:
    lines = _fs().cat_file(url[len("s3://"):] + "/metrics.jsonl").decode().splitlines()
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, lines)]


def _remote_checkpoint(url: str, tmp: Path) -> dict:
    local = tmp / "downloaded-last.pt"
    _fs().get_file(url[len("s3://"):] + "/checkpoints/last.pt", str(local))
    return load_checkpoint(local)  # weights_only=True


def _error_lines(proc: subprocess.CompletedProcess, command: str = "train") -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith(f"anymodal {command}: error:")]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"condition not reached in {timeout} s")


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, tmp_path_factory):
    """A short run trained at s3:// (with -v: debug logs too), exported and evaluated from the URL with
    an empty working-copy cache; the commands' output and the working copies."""
    url = make_bucket("anymodal-runs-layout") + "/team/tiny"
    work = tmp_path_factory.mktemp("s3run")
    caches = [work / "cache-train", work / "cache-eval"]
    trained = anymodal("-v", "train", "tiny-test", "--run-dir", url, "recipe.stages.pretrain.steps=4",
                       "run.checkpoint_every=2", *EVAL, env_extra={"ANYMODAL_CACHE": str(caches[0])})
    exported = anymodal("export", url, env_extra={"ANYMODAL_CACHE": str(caches[1])})
    evaluated = anymodal("eval", url, "--no-pictures", env_extra={"ANYMODAL_CACHE": str(caches[1])})
    return {"url": url, "procs": [trained, exported, evaluated], "caches": caches, "tmp": work}


def test_a_run_at_an_s3_url_holds_the_run_folder_and_eval_and_export_read_it(s3_run):
    url = s3_run["url"]
    trained, exported, evaluated = s3_run["procs"]
    assert f"finished: {url}" in trained.stdout
    files = _remote_files(url)
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/pretrain-final.pt",
                 "export/backbone.safetensors", "export/config.yaml", "logs/anymodal.log",
                 "eval/results.json", "eval/table.md"):
        assert name in files, sorted(files)
    assert ".lock" not in files  # released at the end
    assert not [name for name in files if name.endswith(".tmp") or name == ".remote.json"]
    assert [s for _, s, _ in _remote_losses(url)] == [1, 2, 3, 4]
    state = _remote_checkpoint(url, s3_run["tmp"])
    assert state["stage"] == "pretrain" and state["step"] == 4
    assert f"exported {url}/export/backbone.safetensors" in exported.stdout
    assert "pre-trained (mae)" in evaluated.stdout and "random init" in evaluated.stdout
    assert json.loads(files["eval/results.json"])["results"]


def test_the_secret_key_is_in_nothing_the_run_writes_or_prints(s3_run):
    for proc in s3_run["procs"]:
        assert SECRET not in proc.stdout and SECRET not in proc.stderr
    for name, data in _remote_files(s3_run["url"]).items():
        assert SECRET.encode() not in data, name
    for cache in s3_run["caches"]:
        for path in (p for p in cache.rglob("*") if p.is_file()):
            assert SECRET.encode() not in path.read_bytes(), path
    log = _remote_files(s3_run["url"])["logs/anymodal.log"].decode()
    assert "run folder s3://" in log  # the log is there, and it is the run's


def test_kill_9_then_resume_from_the_url_alone_reproduces_losses(s3_endpoint, tmp_path):
    """Killed after a checkpoint reached the URL, the run resumes on a machine with no working copy
    (an empty cache) to the losses of an uninterrupted local run; while it ran, a second run into the
    same URL (from another working copy, so only the remote lock stands in its way) was refused."""
    reference = tmp_path / "reference"
    anymodal("train", "tiny-test", "--run-dir", reference, *KILLED)
    url = make_bucket("anymodal-runs-kill") + "/kill"
    fs, root = _fs(), url[len("s3://"):]
    proc = spawn("train", "tiny-test", "--run-dir", url, *KILLED, env_extra={"ANYMODAL_CACHE": str(tmp_path / "a")})
    try:
        _wait_for(lambda: fs.exists(root + "/.lock"), proc)
        second = anymodal("train", "tiny-test", "--run-dir", url, *KILLED, check=False,
                          env_extra={"ANYMODAL_CACHE": str(tmp_path / "b")})
        errors = _error_lines(second)
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-2000:]
        assert f"run folder {url} is in use by pid {proc.pid} on {socket.gethostname()}" in errors[0]
        assert "--take-over" in errors[0]

        def uploaded() -> bool:
            fs.invalidate_cache()
            return fs.exists(root + "/checkpoints/last.pt")

        _wait_for(uploaded, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _remote_checkpoint(url, tmp_path)["step"] < 8
    fs.invalidate_cache()
    assert fs.exists(root + "/.lock")  # a kill leaves its lock; its process is gone, so the resume takes it
    resumed = anymodal("train", "--resume", "--run-dir", url, env_extra={"ANYMODAL_CACHE": str(tmp_path / "c")})
    assert "took over the lock" in resumed.stderr and "is gone" in resumed.stderr
    assert _remote_losses(url) == losses(reference)
    fs.invalidate_cache()
    assert not fs.exists(root + "/.lock")


def test_another_machines_lock_refuses_the_folder_until_it_is_stale(s3_endpoint, tmp_path):
    url = make_bucket("anymodal-runs-lock") + "/shared"
    fs, lock = _fs(), url[len("s3://"):] + "/.lock"
    holder = {"host": "gpu-node-7", "pid": 4242, "started": "2026-01-01 00:00:00", "token": "theirs"}
    fs.pipe_file(lock, json.dumps({**holder, "heartbeat": time.time()}).encode())
    args = ["train", "tiny-test", "--run-dir", url, "recipe.stages.pretrain.steps=1"]
    env = {"ANYMODAL_CACHE": str(tmp_path / "cache")}
    refused = anymodal(*args, check=False, env_extra=env)
    errors = _error_lines(refused)
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-2000:]
    assert "in use by pid 4242 on gpu-node-7" in errors[0] and "--take-over" in errors[0]
    assert json.loads(fs.cat_file(lock))["token"] == "theirs"  # left alone
    fs.pipe_file(lock, json.dumps({**holder, "heartbeat": time.time() - 3600}).encode())  # not refreshed for an hour
    taken = anymodal(*args, env_extra=env)
    assert "took over the lock" in taken.stderr and "60 min ago" in taken.stderr
    fs.invalidate_cache()
    assert not fs.exists(lock) and fs.exists(url[len("s3://"):] + "/checkpoints/last.pt")


def test_a_run_whose_lock_is_taken_over_stops_before_its_next_upload(s3_endpoint, tmp_path, monkeypatch):
    """Two runs never interleave their uploads: a run that finds its lock in another's hands (taken
    over as stale, or with --take-over) stops with one line at its next checkpoint, uploading nothing."""
    url = make_bucket("anymodal-runs-lost") + "/lost"
    fs, root = _fs(), url[len("s3://"):]
    monkeypatch.setenv("ANYMODAL_CACHE", str(tmp_path / "cache"))
    fetched = RemoteRun(url).local / ".remote.json"  # the run has its lock and has fetched the folder
    proc = spawn("train", "tiny-test", "--run-dir", url, *KILLED)
    try:
        _wait_for(fetched.is_file, proc)
        theirs = {"host": "gpu-node-7", "pid": 4242, "started": "2026-01-01 00:00:00", "heartbeat": time.time(),
                  "token": "theirs"}
        fs.pipe_file(root + "/.lock", json.dumps(theirs).encode())
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("anymodal train: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert f"run folder {url} was taken over by pid 4242 on gpu-node-7" in errors[0]
    fs.invalidate_cache()
    assert not fs.exists(root + "/checkpoints/last.pt")  # nothing of the stopped run was uploaded
    assert json.loads(fs.cat_file(root + "/.lock"))["token"] == "theirs"  # nor the new holder's lock removed


def test_a_working_copy_ahead_of_the_url_is_kept_and_one_behind_is_replaced(s3_endpoint, tmp_path, monkeypatch):
    """The sync rules on their own (no training): uploads replace and remove what changed, last.pt
    last; a copy killed between a checkpoint and its upload keeps its newer files; a copy the URL
    has moved past (another machine resumed) is made the URL's."""
    url = make_bucket("anymodal-runs-sync") + "/run"
    fs, root = _fs(), url[len("s3://"):]

    def copy(cache: str) -> RemoteRun:
        monkeypatch.setenv("ANYMODAL_CACHE", str(tmp_path / cache))
        return RemoteRun(url)

    def write(run: RemoteRun, files: dict) -> None:
        for name, text in files.items():
            (run.local / name).parent.mkdir(parents=True, exist_ok=True)
            (run.local / name).write_text(text)

    a = copy("a")
    a.pull()  # nothing there yet
    write(a, {"config.yaml": "c", "metrics.jsonl": "1\n", "checkpoints/shards-1/x": "s1", "checkpoints/last.pt": "1"})
    assert a.push() == 4
    (a.local / "checkpoints/shards-1/x").unlink()
    write(a, {"checkpoints/shards-2/x": "s2", "checkpoints/last.pt": "2"})
    assert a.push() == 2
    fs.invalidate_cache()
    assert sorted(fs.find(root)) == [f"{root}/{n}" for n in ("checkpoints/last.pt", "checkpoints/shards-2/x",
                                                             "config.yaml", "metrics.jsonl")]
    write(a, {"checkpoints/last.pt": "3", "metrics.jsonl": "1\n2\n3\n"})  # killed before this upload
    b = copy("b")  # another machine: fetches step 2, writes an eval, resumes to step 4
    b.pull()
    assert (b.local / "checkpoints/last.pt").read_text() == "2"
    write(b, {"eval/table.md": "t"})
    b.push(only=["eval"])
    a = copy("a")
    a.pull()  # the URL holds what a uploaded, plus a new eval/: a is ahead; it keeps step 3 and fetches eval/
    assert (a.local / "checkpoints/last.pt").read_text() == "3" and (a.local / "eval/table.md").read_text() == "t"
    write(b, {"checkpoints/last.pt": "4", "metrics.jsonl": "1\n2\n3\n4\n"})
    b.push()
    a = copy("a")
    a.pull()  # now the URL has moved past a's copy: a's step 3 was another attempt's
    assert (a.local / "checkpoints/last.pt").read_text() == "4"
    assert (a.local / "metrics.jsonl").read_text() == "1\n2\n3\n4\n"
    assert not (a.local / "checkpoints/shards-1").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint", "no credentials", "eval of a missing bucket"])
def test_storage_that_cannot_be_used_is_one_error_line(s3_endpoint, tmp_path, case):
    env = dict(os.environ, ANYMODAL_CACHE=str(tmp_path / "cache"), AWS_MAX_ATTEMPTS="1")
    url = "s3://anymodal-no-such-bucket/run"
    command = ["train", "tiny-test", "--run-dir"]
    if case == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_closed_port()}"
        url = make_bucket("anymodal-runs-unreachable") + "/run"
    elif case == "no credentials":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.pop(key, None)
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                   AWS_EC2_METADATA_DISABLED="true")
        url = make_bucket("anymodal-runs-nocreds") + "/run"
    elif case == "eval of a missing bucket":
        command = ["eval"]
    proc = subprocess.run([sys.executable, "-m", "anymodal", *command, url], capture_output=True, text=True,
                          env=env, timeout=120)
    errors = _error_lines(proc, command[0])
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert url in errors[0]
    expected = {"missing bucket": "bucket does not exist", "unreachable endpoint": "Could not connect",
                "no credentials": "AWS_ACCESS_KEY_ID", "eval of a missing bucket": "bucket does not exist"}[case]
    assert expected in errors[0], errors[0]
    assert SECRET not in proc.stderr
