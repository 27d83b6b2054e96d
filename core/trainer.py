"""One trainer for every recipe: stages run in order, each with its objectives, masker and schedule.

`Trainer.run` walks the recipe; for each stage `core.stage.StageSetup` builds a `StageRun` (the
model parts, optimizer, loader and resume point) and `Trainer._loop` consumes it, one `_step` per
batch. Per step: tokenize -> mask -> objectives (summed with weights) -> backward (once per micro-batch
with ``optim.accumulate_steps``) -> clip -> AdamW.
bf16/fp16 autocast where the device supports it, a NaN/Inf guard, metrics to JSONL (and
TensorBoard, W&B, MLflow: `core.loggers`), atomic checkpoints, and exact resume: the data order and
augmentations are functions of the step (`core.data`), masks draw from a generator seeded by the
step, and the global RNG state is saved with the weights.

Under torch.distributed (torchrun, or `anymodal submit` on Slurm) the step's forward runs inside
DistributedDataParallel, each rank takes its share of every global batch, metrics and the
preemption flag are averaged/ORed across ranks in one collective per step (the step's one host
sync; the gradient norm stays on the device until a logged step), and only rank 0 writes the
metrics, checkpoints and export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm import tqdm

from .backbone import Backbone
from .build import build_backbone
from .init_weights import init_backbone
from .loggers import MetricLoggers
from .checkpoint import CheckpointError, checkpoint_part, load_checkpoint, load_model_state, rng_state, save_atomic, shard_folder
from .config import save_config
from .data import mix_seed
from .device import autocast_for, resolve_device, sdpa_kernels
from .distributed import barrier, local_rank, mean_over_ranks, rank, world_size
from .mix import SOURCE_FIELD
from .parallel import full_optimizer_state, save_shards
from .runfolder import RunFolder
from .schedule import lr_at
from .stage import StageRun, StageSetup, StepForward, split_batch, to_device

__all__ = ["Trainer", "NonFiniteLossError", "Preempted"]

log = logging.getLogger("anymodal.train")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stops before the bad update is applied."""


class Preempted(SystemExit):
    """SIGTERM/SIGUSR1 arrived: the run checkpointed and exits so it can be resumed.

    Attributes:
        signum: the signal.
        checkpoint: the checkpoint to resume from (None when none was written yet).
    """

    def __init__(self, signum: int, checkpoint: Optional[Path]) -> None:
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint


class _Signals:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 into a flag checked between steps, so a save is never
    interrupted. After the checkpoint, `hand_over` calls the handler that was installed before (submitit's
    USR2 handler requeues the Slurm job), so a launcher's own protocol still runs.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def hand_over(self, signum: int) -> None:
        previous = self._old.get(signum)
        if callable(previous):
            previous(signum, None)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Throughput:
    """Samples per second since the last logged step."""

    def __init__(self, step: int, batch_size: int) -> None:
        self.time, self.step, self.batch_size = time.perf_counter(), step, batch_size

    def __call__(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.batch_size / max(now - self.time, 1e-9)
        self.time, self.step = now, step
        return rate


def _floats(metrics: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics as Python numbers, in their order: the tensors among them (one element each) are
    stacked as float32 and read in one device-to-host copy; plain numbers (an outside objective's
    floats, the monitor's) pass as they are."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, Tensor)}
    if not tensors:
        return dict(metrics)
    device = next(iter(tensors.values())).device
    read = dict(zip(tensors, torch.stack([v.detach().to(device, torch.float32).reshape(()) for v in tensors.values()]).tolist()))
    return {k: read.get(k, v) for k, v in metrics.items()}


class Trainer:
    """Runs a config's recipe in a run folder.

    Args:
        cfg: the composed, validated config.
        components: the loaded plugin components.
        run_dir: the run folder.
        resume: continue from ``checkpoints/last.pt`` if it exists.
        changes: config changes this resume makes (key -> (before, after)), recorded in the folder.
        after_save: called on rank 0 after each checkpoint is written (a run folder at a URL uploads it).
    """

    def __init__(self, cfg: DictConfig, components: Any, run_dir: Path, resume: bool = False,
                 changes: Optional[dict[str, tuple[Any, Any]]] = None,
                 after_save: Optional[Callable[[], Any]] = None) -> None:
        self.cfg, self.components = cfg, components
        self.after_save = after_save
        self.folder = RunFolder(Path(run_dir))
        self.resume, self.changes = resume, changes or {}
        self.rank, self.world = rank(), world_size()
        self.main = self.rank == 0  # the one process that writes to the run folder
        device = resolve_device(cfg.run.device)
        if self.world > 1 and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank())
        self.device = device
        self.autocast, self.amp_dtype = autocast_for(self.device, cfg.run.precision)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        self.backbone: Backbone = build_backbone(cfg, components).to(self.device)
        self.init_report = None
        if cfg.model.init and not (resume and self.folder.last.is_file()):  # a resumed run has its checkpoint
            self.init_report = init_backbone(self.backbone, str(cfg.model.init))
            log.info("%s", self.init_report.summary())
        self.setup = StageSetup(cfg, components, self.folder, self.device, self.autocast, self.amp_dtype, self.rank, self.world)
        self.loggers = MetricLoggers(cfg, self.folder.logs) if self.main else None  # a missing extra fails here
        self._monitored: Optional[Backbone] = None  # under FSDP: the whole backbone the monitor probes, on rank 0

    # ---- the recipe -------------------------------------------------------------------------
    def run(self) -> None:
        stages = list(self.cfg.recipe.stages.items())
        names = [n for n, _ in stages]
        state = None
        if self.main:
            self.folder.clean_orphans()
        if self.resume and self.folder.last.is_file():
            state = self._read_last(names)
            if self.main:
                self.folder.keep_metrics_until(names, state["stage"], int(state["step"]))
                if self.changes:
                    self.folder.record_changes(self.changes, state["stage"], int(state["step"]))
            log.info("resuming stage %s at step %d from %s", state["stage"], state["step"], self.folder.last)
        elif self.folder.last.is_file():
            raise FileExistsError(f"{self.folder.root} already holds a run (checkpoint {self.folder.last}): continue it "
                                  f"with --resume, or start a new run in another folder with --run-dir DIR or run.name=NAME")
        elif self.main:  # a fresh start: what an attempt killed before its first checkpoint wrote goes
            self.folder.keep_metrics_until(names, None, 0)
            self.folder.drop_shards_except(None)
            save_config(self.cfg, self.folder.config)
            if self.init_report is not None:
                self.init_report.write(self.folder.root / "init.json")
        started = state is None
        with _Signals() as self.signals, contextlib.ExitStack() as stack:  # one handler for the whole run
            if self.loggers is not None:
                stack.callback(self.loggers.close)
            for index, (name, stage) in enumerate(stages):
                if not started:
                    if name != state["stage"]:
                        continue  # finished before the checkpoint; its weights are in the checkpoint
                    started = True
                    self._train_stage(index, name, stage, state)
                else:
                    self._train_stage(index, name, stage, None)
            if self.main:
                self.export()

    def _read_last(self, names: list[str]) -> dict[str, Any]:
        """``last.pt``, checked to be a training checkpoint of this recipe and model before anything is touched."""
        path = self.folder.last
        state = load_checkpoint(path)
        for key in ("stage", "step", "scaler", "rng"):
            checkpoint_part(state, key, path)
        if state["stage"] not in names:
            raise CheckpointError(f"{path} is from stage {state['stage']!r}, which this recipe ({', '.join(names)}) "
                                  f"does not have")
        # a sharded checkpoint is checked when it is loaded into the sharded model
        if shard_folder(path, state) is None:
            for key in ("objectives", "optimizer"):
                checkpoint_part(state, key, path)
            load_model_state(self.backbone, checkpoint_part(state, "backbone", path), f"checkpoint {path} (backbone)")
        return state

    def _preempt(self, name: str, step: int) -> None:
        """Hand the signal to the launcher's handler (submitit requeues), then exit resumable."""
        barrier()  # no rank exits (and makes the launcher kill the rest) before rank 0's save
        signum = self.signals.received or signal.SIGTERM  # another rank may have seen it
        last = self.folder.last if self.folder.last.is_file() else None
        log.warning("stopped by signal %d at stage %s step %d; checkpoint: %s", signum, name, step, last or "none yet")
        self.signals.hand_over(signum)
        raise Preempted(signum, last)

    # ---- one stage --------------------------------------------------------------------------
    def _train_stage(self, index: int, name: str, stage: Any, state: Optional[dict[str, Any]]) -> None:
        run = self.setup.build(self.backbone, index, name, stage, state)
        if run is None:  # the checkpoint ends this stage; the backbone holds its final weights
            return
        final = self._loop(run)
        if self._sharded:  # the next stage starts from whole weights again
            self.backbone = build_backbone(self.cfg, self.components).to(self.device)
            load_model_state(self.backbone, final["backbone"], f"stage {name} (gathered)")
        barrier()  # the next stage's init_from and stage teacher read the final file on every rank
        if self.world == 1 and self.signals.received:
            self._preempt(name, run.step)

    def _loop(self, run: StageRun) -> dict[str, Any]:
        """Train ``run`` to its last step (or to a signal); returns the stage's final weights, whole."""
        cfg = self.cfg
        run.model.train()
        if self.world == 1 and self.signals.received:  # arrived between stages: the checkpoint is consistent
            self._preempt(run.name, run.step)
        bar = tqdm(total=run.total, initial=run.step, desc=run.name, disable=not (cfg.run.progress and self.main),
                   dynamic_ncols=True)
        rate = _Throughput(run.step, run.batch_size)
        final: dict[str, Any] = {}
        for raw in run.loader:
            lr = self._set_lr(run)
            metrics, stop = self._step(run, raw)
            run.step += 1
            if run.moving is not None:
                run.moving.update(self.backbone, run.step, run.total)
            bar.update(1)
            self._watch(run, metrics, bar)
            if self.main and (run.step % cfg.run.log_every == 0 or run.step == run.total):
                self._log_step(run, lr, metrics, rate, bar)
            if run.step == run.total:
                final = self._save_final(run)
            if run.step == run.total or run.step % cfg.run.checkpoint_every == 0 or stop:
                self._save(run)
                if self.main and self.after_save is not None:
                    self.after_save()
            if stop:
                bar.close()
                self._preempt(run.name, run.step)
            if run.step >= run.total:
                break
        bar.close()
        return final

    def _set_lr(self, run: StageRun) -> float:
        """The schedule's learning rate for the coming step, set on every parameter group."""
        optim = run.stage.optim
        lr = lr_at(run.step, run.total, optim.lr, optim.warmup_steps, optim.min_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _step(self, run: StageRun, raw: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """One optimizer step over ``optim.accumulate_steps`` micro-batches of the rank's share.
        Returns the step's metrics (the loss and the objectives' averaged over micro-batches and
        ranks, as floats; ``grad_norm`` as it came, read when the step is logged) and whether to stop
        for a signal."""
        run.model.check_batch(raw)
        parts = run.stage.optim.accumulate_steps
        # each rank masks its own share of the batch: the mask stream depends on the rank too; the
        # micro-batches draw from one stream in turn, as the whole share would
        seed_parts = (self.cfg.run.seed, run.index, run.step, 1) + ((self.rank,) if self.world > 1 else ())
        generator = torch.Generator().manual_seed(mix_seed(*seed_parts))
        run.optimizer.zero_grad(set_to_none=True)
        total: Optional[list[Tensor]] = None
        for micro in split_batch(raw, parts):
            loss, metrics = self._forward(run, to_device(micro, self.device), generator)
            # under DDP every micro-batch's backward all-reduces: no_sync is unsafe with static_graph
            run.scaler.scale(loss / parts).backward()
            values = [loss.detach(), *metrics.values()]
            total = values if total is None else [t + v for t, v in zip(total, values)]
        shares = self._mix_shares(run, raw)
        # the one host sync of a step: loss and metrics averaged over ranks, the signal flag ORed
        averaged, stop = mean_over_ranks([t / parts for t in total] + list(shares.values()), flag=self.signals.received)
        value, metrics = averaged[0], dict(zip([*metrics, *shares], averaged[1:]))
        if not math.isfinite(value):
            self._non_finite(run, value, metrics)
        grad_norm = self._update(run)
        return {"loss": value, "grad_norm": grad_norm, **metrics}, stop > 0

    def _mix_shares(self, run: StageRun, raw: dict[str, Any]) -> dict[str, Tensor]:
        """``data/mix/<source>``: each `data.mix` source's share of the step's batch (none without a mix)."""
        if not run.sources:
            return {}
        counts = torch.bincount(raw[SOURCE_FIELD], minlength=len(run.sources)).float() / len(raw[SOURCE_FIELD])
        return {f"data/mix/{label}": share for label, share in zip(run.sources, counts.to(self.device))}

    def _forward(self, run: StageRun, raw: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        """A micro-batch's loss and metrics, under autocast, masked from ``generator``."""
        if self.cfg.run.cuda_graphs:  # a new step: graph outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast(), sdpa_kernels(self.cfg.run.sdpa_kernel):
            return run.forward(raw, run.masker, generator, run.teacher)

    def _non_finite(self, run: StageRun, value: float, metrics: dict[str, float]) -> None:
        """Raises NonFiniteLossError for the coming step, naming the last good checkpoint."""
        last = self.folder.last if self.folder.last.is_file() else None
        raise NonFiniteLossError(
            f"loss is {value} at stage {run.name!r} step {run.step + 1} ({', '.join(f'{k}={v}' for k, v in metrics.items())}); "
            f"the update was not applied. Last good checkpoint: {last or 'none written yet'}"
            + (" (continue with --resume after fixing the cause)" if last else ""))

    def _update(self, run: StageRun) -> Union[Tensor, float]:
        """Clip (``optim.clip_grad``) and step on the accumulated gradients; their norm before
        clipping (NaN unclipped)."""
        grad_norm: Union[Tensor, float] = float("nan")
        if run.stage.optim.clip_grad:
            run.scaler.unscale_(run.optimizer)
            norm = nn.utils.clip_grad_norm_(run.forward.parameters(), run.stage.optim.clip_grad)
            grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor, gathered on every rank
        run.scaler.step(run.optimizer)
        run.scaler.update()
        return grad_norm

    def _watch(self, run: StageRun, metrics: dict[str, Any], bar: tqdm) -> None:
        """Every ``eval.monitor_every`` steps, the online monitor's ``monitor/*`` metrics join the step's."""
        every = self.cfg.eval.monitor_every
        if not every or run.step % every:
            return
        backbone = self.backbone
        if self._sharded:  # every rank takes part in gathering the shards; rank 0 probes a whole copy
            whole = self._gather_weights(run.model)["backbone"]
            if run.monitor is None:
                return
            if self._monitored is None:
                self._monitored = build_backbone(self.cfg, self.components).to(self.device)
            self._monitored.load_state_dict(whole)
            backbone = self._monitored
        if run.monitor is None:
            return
        watched = run.monitor(backbone)
        metrics.update(watched)
        bar.set_description(f"{run.name} knn={watched['monitor/knn']:.2f} rank={watched['monitor/rankme']:.1f}")

    def _log_step(self, run: StageRun, lr: float, metrics: dict[str, Any], rate: _Throughput, bar: tqdm) -> None:
        """One metrics.jsonl record (and the `core.loggers` scalars), the progress bar's figures."""
        samples_per_s = rate(run.step)
        values = _floats(metrics)
        extra = {"data/skipped": run.skipped} if run.skipped else {}
        self._log({"stage": run.name, "step": run.step, "lr": lr, "samples_per_s": samples_per_s, **values, **extra})
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", rate=f"{samples_per_s:.0f}/s")

    @property
    def _sharded(self) -> bool:
        return self.cfg.run.parallel == "fsdp" and self.world > 1

    def _gather_weights(self, model: StepForward) -> dict[str, Any]:
        """``{"backbone": ..., "objectives": ...}`` whole. Under FSDP every rank must call it (it
        gathers the shards) and every rank gets them."""
        if not self._sharded:
            return {"backbone": model.backbone.state_dict(), "objectives": model.objectives.state_dict()}
        # state_dict() of a sharded module holds DTensors; full_tensor() gathers each
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        parts: dict[str, Any] = {"backbone": {}, "objectives": {}}
        for key, value in full.items():
            part, _, rest = key.partition(".")
            parts[part][rest] = value
        return parts

    def _save_final(self, run: StageRun) -> dict[str, Any]:
        """The stage's final weights, gathered (under FSDP: on every rank, once) and written by rank 0
        before the checkpoint that says the stage ended."""
        weights = self._gather_weights(run.model)
        if self.main:
            save_atomic({"stage": run.name, **weights}, self.folder.final(run.name))
        return weights

    def _save(self, run: StageRun) -> None:
        """``last.pt``: the weights, optimizer, scaler, RNG and step to resume ``run`` exactly."""
        if self._sharded:
            self._save_shards(run)
            return
        if not self.main:
            return
        weights = self._gather_weights(run.model)
        optim_state = full_optimizer_state(run.model, run.optimizer)
        extra = {"teacher": run.moving.state_dict()} if run.moving is not None else {}  # only a moving teacher has state
        save_atomic({
            **extra,
            **weights,
            "stage": run.name,
            "step": run.step,
            "optimizer": optim_state,
            "scaler": run.scaler.state_dict(),
            "rng": rng_state(),
        }, self.folder.last)

    def _save_shards(self, run: StageRun) -> None:
        """FSDP: each rank writes its shards to a new folder; then rank 0 points ``last.pt`` at it
        (atomically) and removes the older folders, so a kill at any moment leaves a complete one."""
        shards = self.folder.checkpoints / f"shards-{run.name}-{run.step:08d}"
        save_shards(shards, run.model, run.optimizer, run.teacher)
        if not self.main:
            return
        save_atomic({"stage": run.name, "step": run.step, "shards": shards.name, "scaler": run.scaler.state_dict(),
                     "rng": rng_state()}, self.folder.last)
        self.folder.drop_shards_except(shards.name)

    def _log(self, record: dict[str, Any]) -> None:
        self.folder.metrics.parent.mkdir(parents=True, exist_ok=True)
        with open(self.folder.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.loggers is not None:
            self.loggers.log(record)

    # ---- export -----------------------------------------------------------------------------
    def export(self) -> Path:
        """Backbone weights as safetensors plus the config sections needed to rebuild it."""
        from .export import export_backbone

        return export_backbone(self.backbone, self.cfg, self.folder.export)
