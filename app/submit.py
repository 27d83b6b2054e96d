"""`anymodal submit`: a config's recipe as a Slurm job (or a job array over overrides), through submitit.

The job runs `anymodal train` in its run folder with resume on, so a requeued job (preemption,
`scontrol requeue`, or USR2 before the time limit) continues at the stage and step of its last
checkpoint. The trainer turns the signal into a checkpoint between steps and then hands it to
submitit's handler, which calls `TrainJob.checkpoint` and requeues the job.
"""

from __future__ import annotations

import itertools
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.errors import UserError
from ..core.runfolder import RunFolder
from .train import load_config, resume_config, train

__all__ = ["TrainJob", "expand_sweep", "submit"]


@dataclass
class TrainJob:
    """The callable submitit pickles and runs on every task of the job."""

    config: str
    overrides: list[str]
    run_dir: str

    def __call__(self) -> str:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for the env:// process group
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return str(train(self.config, self.overrides, self.run_dir, resume=True))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on preemption/time-out; the trainer has saved by then: rerun the same run."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides, self.run_dir))


def expand_sweep(sweeps: Sequence[str]) -> list[list[str]]:
    """``["a=1,2", "b=x,y"]`` -> the cartesian product as override lists (``[["a=1", "b=x"], ...]``)."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--sweep {sweep!r}: expected key=value1,value2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _folder_name(overrides: Sequence[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(o.rsplit(".", 1)[-1] for o in overrides)) or "run"


def _executor(launcher: Any, folder: Path, name: str) -> Any:
    import submitit

    if shutil.which("sbatch") is None:
        raise RuntimeError("anymodal submit needs Slurm: `sbatch` is not on PATH (for one machine, run "
                           "`anymodal train`, or `torchrun --nproc_per_node N -m anymodal train`)")
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", slurm_max_num_timeout=launcher.max_requeues)
    params: dict[str, Any] = dict(
        name=name, nodes=launcher.nodes, tasks_per_node=launcher.tasks_per_node, cpus_per_task=launcher.cpus_per_task,
        timeout_min=launcher.timeout_min, slurm_signal_delay_s=launcher.signal_delay_s,
        slurm_array_parallelism=launcher.array_parallelism,
        slurm_additional_parameters=dict(launcher.sbatch_extra),
    )
    if launcher.gpus_per_node:
        params["gpus_per_node"] = launcher.gpus_per_node
    if launcher.mem_gb is not None:
        params["mem_gb"] = launcher.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if launcher[key]:
            params[f"slurm_{key}"] = launcher[key]
    executor.update_parameters(**params)
    return executor


def submit(config: str, overrides: Sequence[str], sweeps: Sequence[str] = (), run_dir: Optional[str] = None,
           resume: bool = False) -> list[tuple[Any, Path]]:
    """Submit one job, or a job array with one job per point of ``sweeps``; returns ``(job, run folder)`` pairs.

    Every variant's config is composed and validated here first, so a typo fails before anything
    is queued. Run folders: ``run_dir`` (default ``run.out_dir/run.name``), and one sub-folder per
    variant for a sweep; submitit's scripts and logs go to ``<folder>/slurm/<job id>_*``.
    """

    variants = expand_sweep(sweeps)
    jobs, launcher, root = [], None, None
    for extra in variants:
        cfg = load_config(config, [*overrides, *extra])[0].cfg
        if root is None:
            where = str(run_dir) if run_dir else str(cfg.run.out_dir)
            if "://" in where:  # Path() would fold the URL into a local folder name
                raise UserError(f"anymodal submit takes a local (shared) run folder, not {where}: submitit writes "
                                "its scripts and logs there; run `anymodal train --run-dir URL` in the job instead")
            root = Path(run_dir) if run_dir else Path(cfg.run.out_dir) / cfg.run.name
            launcher = cfg.launcher
        folder = (root / _folder_name(extra) if sweeps else root).resolve()
        if RunFolder(folder).last.is_file() and not resume:
            raise FileExistsError(f"{folder} already holds a run: continue it with --resume, or start a new run in "
                                  f"another folder with --run-dir DIR or run.name=NAME")
        if resume and RunFolder(folder).last.is_file():  # the job would refuse changed overrides: say so now
            resume_config(RunFolder(folder), [*overrides, *extra], allow_changes=False)
        jobs.append((TrainJob(config, [*overrides, *extra], str(folder)), folder))
    assert root is not None and launcher is not None
    executor = _executor(launcher, root.resolve() / "slurm", root.name)
    if len(jobs) == 1:
        return [(executor.submit(jobs[0][0]), jobs[0][1])]
    with executor.batch():  # one job array
        submitted = [executor.submit(job) for job, _ in jobs]
    return [(job, folder) for job, (_, folder) in zip(submitted, jobs)]
