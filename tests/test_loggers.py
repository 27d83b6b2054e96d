"""run.wandb and run.mlflow: the same scalars as metrics.jsonl and the resolved config, read back from
what the real libraries wrote in their offline modes (W&B's run file, MLflow's SQLite store); a
resumed run continues the same W&B and MLflow runs; a missing package is one error line."""

import glob
import json
import signal
import struct
import time

import pytest

from helpers import anymodal, spawn

wandb_proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")
mlflow_tracking = pytest.importorskip("mlflow.tracking")

OFFLINE = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "MLFLOW_TRACKING_URI": "", "WANDB_SILENT": "true"}


def wandb_records(path):
    """The protobuf records of a W&B run file: a 7-byte header, then LevelDB-log blocks of 32 KiB,
    each record a (crc32, length, type) header and its bytes, split over blocks as FIRST/MIDDLE/LAST."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, out, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            record = wandb_proto.Record()
            record.ParseFromString(part)
            out.append(record)
    return out


def wandb_history(run_dir):
    """(run ids of the offline run folders, every logged row, the config of the first)."""
    files = sorted(glob.glob(str(run_dir / "logs" / "wandb" / "offline-run-*" / "run-*.wandb")))
    rows, ids, config = [], [], None
    for f in files:
        records = wandb_records(f)
        ids.append(next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run"))
        config = config or {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
                            for i in r.run.config.update}
        rows += [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                 for r in records if r.WhichOneof("record_type") == "history"]
    return ids, rows, config


def mlflow_run(run_dir):
    client = mlflow_tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'logs' / 'mlflow.db'}")
    return client, (run_dir / "logs" / "mlflow-run-id").read_text().strip()


def jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_wandb_and_mlflow_log_the_same_scalars_and_config(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=8", "run.log_every=2",
             "run.wandb=true", "run.mlflow=true", env_extra=OFFLINE, cwd=tmp_path)
    assert not (tmp_path / "mlruns").exists()  # nothing written outside the run folder
    assert list((run / "logs" / "mlartifacts").rglob("config.yaml"))
    lines = jsonl(run)
    ids, rows, config = wandb_history(run)
    assert len(ids) == 1 and config["recipe"]["stages"]["pretrain"]["steps"] == 8
    assert [(r["pretrain/step"], r["pretrain/loss"]) for r in rows] == [(r["step"], r["loss"]) for r in lines]
    assert all(r["pretrain/grad_norm"] == line["grad_norm"] for r, line in zip(rows, lines))
    client, run_id = mlflow_run(run)
    history = client.get_metric_history(run_id, "pretrain/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in lines]
    params = client.get_run(run_id).data.params
    assert params["recipe.stages.pretrain.steps"] == "8" and params["model.size"] == str(config["model"]["size"])
    # fine-tuning the run logs where the run's config says, into its own folder
    anymodal("finetune", run, "finetune.steps=4", "finetune.eval_every=2", "finetune.batch_size=16", "run.wandb=false",
             env_extra=OFFLINE)
    tuned = run / "finetune"
    client, run_id = mlflow_run(tuned)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "finetune/loss")] == \
        [(r["step"], pytest.approx(r["loss"])) for r in jsonl(tuned)]
    assert [m.step for m in client.get_metric_history(run_id, "finetune/val/accuracy")] == [2, 4]


def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(tmp_path):
    run = tmp_path / "run"
    args = ["train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=300", "run.log_every=2",
            "run.checkpoint_every=2", "run.wandb=true", "run.mlflow=true", "run.progress=false"]
    proc = spawn(*args, env_extra=OFFLINE)
    metrics, deadline = run / "metrics.jsonl", time.time() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=180)
    assert proc.returncode != 0 and len(jsonl(run)) < 150
    first_mlflow = (run / "logs" / "mlflow-run-id").read_text()
    anymodal("train", "--resume", "--run-dir", run, env_extra=OFFLINE)
    ids, rows, _ = wandb_history(run)
    assert len(ids) == 2 and len(set(ids)) == 1  # two offline folders of one W&B run
    assert {r["pretrain/step"] for r in rows} >= {r["step"] for r in jsonl(run)}
    client, run_id = mlflow_run(run)
    assert run_id == first_mlflow
    assert max(m.step for m in client.get_metric_history(run_id, "pretrain/loss")) == 300


def test_a_missing_logger_package_is_one_error_line(tmp_path):
    broken = tmp_path / "site"
    broken.mkdir()
    (broken / "mlflow.py").write_text("raise ImportError('No module named mlflow (broken on purpose)')\n")
    proc = anymodal("train", "tiny-test", "--run-dir", tmp_path / "run", "run.mlflow=true", check=False,
                    env_extra={"PYTHONPATH": f"{broken}:{__import__('os').environ.get('PYTHONPATH', '')}"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1] == ("anymodal train: error: run.mlflow=true needs the mlflow package: "
                                                  "pip install 'anymodal[mlflow]'"), proc.stderr
