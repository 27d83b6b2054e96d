"""Where a run's scalars go besides ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow.

Each is an optional extra, switched on by its ``run.*`` key; each gets the same numeric values of
every record, under ``<stage>/<name>`` at the record's step, and the resolved config. A resumed run
continues the same W&B / MLflow run: its id is kept in the run folder's ``logs/``.

W&B runs offline (files under ``logs/wandb``, ``wandb sync`` uploads them) unless ``WANDB_MODE``
says otherwise or ``WANDB_API_KEY`` is set; MLflow writes to ``MLFLOW_TRACKING_URI``, else to an SQLite
store, ``logs/mlflow.db``, with its artifacts in ``logs/mlartifacts``. Credentials stay in the environment and are never logged.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

__all__ = ["MetricLoggers", "scalars"]

log = logging.getLogger("anymodal.train")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers under ``<stage>/<name>`` (``step`` and non-numbers left out)."""
    prefix = f"{record['stage']}/" if "stage" in record else ""
    return {prefix + k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _flat(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: str(node)[:500]}  # MLflow keeps at most 500 characters of a parameter


def _need(module: str, key: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{key}=true needs the {module} package: pip install 'anymodal[{module}]'") from None


class MetricLoggers:
    """The loggers ``cfg.run`` switches on, writing into ``logs``; `log` fans a record out to each."""

    def __init__(self, cfg: DictConfig, logs: Path) -> None:
        self.cfg, self.logs = cfg, Path(logs)
        self._tensorboard: Any = None
        self._wandb: Any = None
        self._mlflow: Any = None
        self._axes: set[str] = set()
        if cfg.run.get("wandb"):
            _need("wandb", "run.wandb")
        if cfg.run.get("mlflow"):
            _need("mlflow", "run.mlflow")

    def log(self, record: dict[str, Any]) -> None:
        values, step = scalars(record), int(record["step"])
        if self.cfg.run.tensorboard and self._tensorboard is not False:
            writer = self._tensorboard or self._start_tensorboard()
            if writer:
                for k, v in values.items():
                    writer.add_scalar(k, v, step)
        if self.cfg.run.get("wandb"):
            run = self._wandb or self._start_wandb()
            # each stage's steps start at 1 again: W&B plots them on an axis of their own
            axis = f"{record.get('stage', 'train')}/step"
            if axis not in self._axes:
                run.define_metric(axis)
                run.define_metric(axis.replace("/step", "/*"), step_metric=axis)
                self._axes.add(axis)
            run.log({**values, axis: step})
        if self.cfg.run.get("mlflow"):
            (self._mlflow or self._start_mlflow()).log_metrics(values, step=step)

    def _start_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            self._tensorboard = False
            return None
        self._tensorboard = SummaryWriter(str(self.logs / "tensorboard"))
        return self._tensorboard

    def _start_wandb(self) -> Any:
        import wandb

        self.logs.mkdir(parents=True, exist_ok=True)
        id_file = self.logs / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "anymodal"), name=str(self.cfg.run.name),
                                 id=run_id, resume="allow", dir=str(self.logs), mode=mode,
                                 config=OmegaConf.to_container(self.cfg, resolve=True))
        log.info("logging to W&B run %s (%s, %s)", run_id, mode, self.logs / "wandb")
        return self._wandb

    def _start_mlflow(self) -> Any:
        import mlflow

        self.logs.mkdir(parents=True, exist_ok=True)
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        if local:
            mlflow.set_tracking_uri(f"sqlite:///{(self.logs / 'mlflow.db').resolve()}")  # MLflow's local store
        id_file = self.logs / "mlflow-run-id"
        if id_file.is_file():
            mlflow.start_run(run_id=id_file.read_text().strip())
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "anymodal")
            if local and mlflow.get_experiment_by_name(name) is None:
                # artifacts beside the store: MLflow's default is ./mlruns in whatever folder the run started from
                mlflow.create_experiment(name, artifact_location=(self.logs / "mlartifacts").resolve().as_uri())
            mlflow.set_experiment(name)
            run = mlflow.start_run(run_name=str(self.cfg.run.name))
            id_file.write_text(run.info.run_id)
            config = OmegaConf.to_container(self.cfg, resolve=True)
            params = _flat(config)
            keys = sorted(params)
            for start in range(0, len(keys), 100):  # MLflow takes at most 100 parameters a call
                mlflow.log_params({k: params[k] for k in keys[start:start + 100]})
            mlflow.log_dict(config, "config.yaml")
        self._mlflow = mlflow
        log.info("logging to MLflow run %s (%s)", id_file.read_text().strip(), mlflow.get_tracking_uri())
        return mlflow

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None
