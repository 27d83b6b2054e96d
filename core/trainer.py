"""One trainer for every recipe: stages run in order, each with its objectives, masker and schedule.

Per step: tokenize -> mask -> objectives (summed with weights) -> backward -> clip -> AdamW.
bf16/fp16 autocast where the device supports it, a NaN/Inf guard, metrics to JSONL (and
TensorBoard when installed), atomic checkpoints, and exact resume: the data order and
augmentations are functions of the step (`core.data`), masks draw from a generator seeded by the
step, and the global RNG state is saved with the weights.

Under torch.distributed (torchrun, or `anymodal submit` on Slurm) the step's forward runs inside
DistributedDataParallel, each rank takes its share of every global batch, metrics and the
preemption flag are averaged/ORed across ranks in one collective per step, and only rank 0 writes
the metrics, checkpoints and export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm import tqdm

from .backbone import Backbone
from .build import build_backbone, build_dataset, build_masker, build_objectives, build_teacher, build_transforms
from .checkpoint import (CheckpointError, checkpoint_part, load_checkpoint, load_model_state, rng_state, save_atomic, set_rng_state,
                         shard_folder)
from .config import SCRATCH, ConfigError, objective_nodes, save_config
from .device import autocast_for, compile_for, resolve_device, sdpa_kernels
from .data import AugmentedDataset, collate, make_loader, mix_seed
from .errors import DataError, UserError
from .distributed import barrier, local_rank, mean_over_ranks, rank, world_size
from .monitor import OnlineMonitor
from .parallel import full_optimizer_state, grad_norm_value, load_optimizer_state, load_shards, parallelize, save_shards
from .objective import Batch
from .runfolder import RunFolder
from .schedule import build_optimizer, lr_at

__all__ = ["Trainer", "NonFiniteLossError", "Preempted", "stage_steps"]

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


def stage_steps(stage: Any, num_samples: int, batch_size: int) -> int:
    """The stage's length in optimizer steps: ``steps``, or ``epochs`` over the dataset when given."""
    if stage.epochs is None:
        return int(stage.steps)
    return max(1, math.ceil(stage.epochs * num_samples / batch_size))


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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


@contextlib.contextmanager
def _bad_value(key: str) -> Any:
    """A component factory's ValueError (an argument it rejects) as a config error naming ``key``; the
    config check cannot build these components (stage teachers need the earlier stage's weights)."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError([f"{key}: {e}"]) from e


@contextlib.contextmanager
def _restored(modules: list[nn.Module], buffers: list[dict[str, Tensor]]) -> Any:
    """Put each module's buffers back to ``buffers`` on the way out."""
    try:
        yield
    finally:
        with torch.no_grad():
            for module, saved in zip(modules, buffers):
                for key, value in module.named_buffers():
                    value.copy_(saved[key])


class StepForward(nn.Module):
    """A step's forward pass as one module: tokenize -> mask -> objectives, summed with weights.

    One module so that DistributedDataParallel can wrap it: DDP synchronizes the gradients of the
    parameters used inside its ``forward``, and the objectives reach the backbone from in here.
    """

    def __init__(self, backbone: Backbone, objectives: nn.ModuleDict, weights: dict[str, float]) -> None:
        super().__init__()
        self.backbone, self.objectives, self.weights = backbone, objectives, weights

    def forward(self, raw: dict[str, Any], masker: Any, generator: torch.Generator,
                teacher: Optional[nn.Module]) -> tuple[Tensor, dict[str, Any]]:
        tokens = self.backbone.tokenize(raw)
        mask = masker(tokens, generator) if masker is not None else None
        batch = Batch(raw, tokens, mask, generator)
        loss = torch.zeros((), device=tokens.x.device)
        metrics: dict[str, Any] = {}
        for label, objective in self.objectives.items():
            out = objective(batch, self.backbone, teacher)
            loss = loss + self.weights[label] * out.loss.float()
            metrics.update({f"{label}/{k}": v for k, v in out.metrics.items()})
        return loss, metrics


class Trainer:
    """Runs a config's recipe in a run folder.

    Args:
        cfg: the composed, validated config.
        components: the loaded plugin components.
        run_dir: the run folder.
        resume: continue from ``checkpoints/last.pt`` if it exists.
        changes: config changes this resume makes (key -> (before, after)), recorded in the folder.
    """

    def __init__(self, cfg: DictConfig, components: Any, run_dir: Path, resume: bool = False,
                 changes: Optional[dict[str, tuple[Any, Any]]] = None) -> None:
        self.cfg, self.components = cfg, components
        self.folder = RunFolder(Path(run_dir))
        self.resume, self.changes = resume, changes or {}
        self.rank, self.world = rank(), world_size()
        self.main = self.rank == 0  # the one process that writes to the run folder
        device = resolve_device(cfg.run.device)
        if self.world > 1 and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank())
        self.device = device
        if self._sharded and cfg.eval.monitor_every:
            raise ValueError("eval.monitor_every needs whole weights on rank 0: set it to 0 with run.parallel=fsdp "
                             "(or use run.parallel=ddp)")
        self.autocast, self.amp_dtype = autocast_for(self.device, cfg.run.precision)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        self.backbone: Backbone = build_backbone(cfg, components).to(self.device)
        self.key = self.backbone.tokenizer.input_key
        self._writer = None

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
        started = state is None
        with _Signals() as self.signals:  # one handler for the whole run: stage boundaries included
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

    def _initial_weights(self) -> dict[str, Any]:
        """The backbone's weights at the start of the run (same seed, same construction)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed)
            return build_backbone(self.cfg, self.components).to(self.device).state_dict()

    # ---- one stage --------------------------------------------------------------------------
    def _train_stage(self, index: int, name: str, stage: Any, state: Optional[dict[str, Any]]) -> None:
        cfg = self.cfg
        if stage.init_from == SCRATCH and state is None:
            self.backbone.load_state_dict(self._initial_weights())
        elif stage.init_from and state is None:
            path = self.folder.final(stage.init_from)
            load_model_state(self.backbone, checkpoint_part(load_checkpoint(path), "backbone", path),
                             f"stage {name} init_from {path}")
        prefix = f"recipe.stages.{name}"
        with _bad_value(f"{prefix}.teacher"):
            teacher = build_teacher(stage, self.components, self.backbone, self.folder)
        if teacher is not None:
            teacher.to(self.device)
        with _bad_value(f"{prefix}.objectives"):
            objectives, weights = build_objectives(stage, self.components, self.backbone, teacher)
        objectives.to(self.device)
        if hasattr(self.backbone.tokenizer, "make_targets"):  # skip reconstruction targets no objective reads
            self.backbone.tokenizer.make_targets = any(getattr(o, "needs_targets", False) for o in objectives.values())
        masker = build_masker(stage, self.components)
        batch_size = stage.batch_size or cfg.data.batch_size
        with _bad_value("data.train / data.transforms"):
            dataset = AugmentedDataset(build_dataset(cfg, "train", self.components),
                                       build_transforms(cfg, self.components), self.key, mix_seed(cfg.run.seed, index),
                                       views=cfg.data.views)
        total = stage_steps(stage, len(dataset), batch_size)
        monitor = OnlineMonitor(cfg, self.components, self.device) if cfg.eval.monitor_every and self.main else None
        model = StepForward(self.backbone, objectives, weights)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        step = 0
        shards = shard_folder(self.folder.last, state) if state is not None else None
        if state is not None and shards is None:  # whole weights go in before sharding; optimizer state after
            load_model_state(objectives, state["objectives"], f"checkpoint {self.folder.last} (objectives of stage {name})")
            if "teacher" in state:
                load_model_state(teacher, state["teacher"], f"checkpoint {self.folder.last} (teacher of stage {name})")
        if state is not None:
            scaler.load_state_dict(state["scaler"])
            step = int(state["step"])
        if step >= total:  # the checkpoint is this stage's end
            self._stage_ended(name, state, shards)
            return
        self._dry_run(name, stage, model, masker, teacher, dataset)
        compile_for(cfg.run.compile, model, objectives, teacher, cfg.run.cuda_graphs)
        forward = parallelize(cfg.run.parallel, self.world, model, teacher)
        optimizer = build_optimizer(model, stage.optim, self.device)  # after sharding: FSDP swaps the parameters
        if shards is not None:
            load_shards(shards, model, optimizer, teacher)
        elif state is not None:
            load_optimizer_state(model, optimizer, state["optimizer"])
        if state is not None:
            set_rng_state(state["rng"])
        loader = make_loader(dataset, batch_size, mix_seed(cfg.run.seed, index), start_step=step,
                             num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                             rank=self.rank, world=self.world)
        skipped = len(getattr(dataset.dataset, "skipped", ()))  # corrupt files the dataset's scan left out
        model.train()
        if self.world == 1 and self.signals.received:  # arrived between stages: the checkpoint is consistent
            self._preempt(name, step)
        bar = tqdm(total=total, initial=step, desc=name, disable=not (cfg.run.progress and self.main), dynamic_ncols=True)
        last_time, last_step = time.perf_counter(), step
        for raw in loader:
            lr = lr_at(step, total, stage.optim.lr, stage.optim.warmup_steps, stage.optim.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            metrics, stop = self._step(index, name, step, raw, forward, masker, optimizer, scaler, stage, teacher,
                                       self.signals.received)
            step += 1
            if hasattr(teacher, "update"):
                teacher.update(self.backbone, step, total)
            bar.update(1)
            if monitor is not None and step % cfg.eval.monitor_every == 0:
                watched = monitor(self.backbone)
                metrics.update(watched)
                bar.set_description(f"{name} knn={watched['monitor/knn']:.2f} rank={watched['monitor/rankme']:.1f}")
            if self.main and (step % cfg.run.log_every == 0 or step == total):
                now = time.perf_counter()
                rate = (step - last_step) * batch_size / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                extra = {"data/skipped": skipped} if skipped else {}
                self._log({"stage": name, "step": step, "lr": lr, "samples_per_s": rate, **metrics, **extra})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", rate=f"{rate:.0f}/s")
            if step == total:
                weights = self._gather_weights(model)  # under FSDP: on every rank, once
                if self.main:  # the stage's final weights go first, then the checkpoint that says the stage ended
                    save_atomic({"stage": name, **weights}, self.folder.final(name))
            if step == total or step % cfg.run.checkpoint_every == 0 or stop:
                self._save(name, step, model, optimizer, scaler, teacher)
            if stop:
                bar.close()
                self._preempt(name, step)
            if step >= total:
                break
        bar.close()
        if self._sharded:  # the next stage starts from whole weights again
            self.backbone = build_backbone(cfg, self.components).to(self.device)
            load_model_state(self.backbone, weights["backbone"], f"stage {name} (gathered)")
        barrier()  # the next stage's init_from and stage teacher read the final file on every rank
        if self.world == 1 and self.signals.received:
            self._preempt(name, step)

    def _stage_ended(self, name: str, state: dict[str, Any], shards: Optional[Path]) -> None:
        """Resuming from a checkpoint written at the stage's last step: the stage's final weights are
        the backbone to carry on with (written from the checkpoint if a kill came between the two
        files), and the RNG is restored as it was at that step, so the next stage starts as it would have."""
        final = self.folder.final(name)
        if not final.is_file():
            if shards is not None:
                raise CheckpointError(f"{self.folder.last} ends stage {name!r} but {final} is missing, and a sharded "
                                      f"checkpoint cannot rebuild it outside FSDP; resume an earlier checkpoint")
            if self.main:
                save_atomic({"stage": name, "backbone": state["backbone"], "objectives": state["objectives"]}, final)
            barrier()
        if shards is not None:
            load_model_state(self.backbone, checkpoint_part(load_checkpoint(final), "backbone", final), f"stage {name} final {final}")
        set_rng_state(state["rng"])

    def _dry_run(self, name: str, stage: Any, model: "StepForward", masker: Any, teacher: Optional[nn.Module], dataset: Any) -> None:
        """One small batch through tokenizer, masker and every objective before the first step, so a field the
        batch lacks is a clear error now, not a KeyError hours in. Leaves no trace: no gradients, RNG restored."""
        samples = [dataset[(i, 0)] for i in range(min(2, len(dataset)))]
        raw = _to_device(collate(samples), self.device)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        modules = [m for m in (model, teacher) if m is not None]
        buffers = [{k: b.clone() for k, b in m.named_buffers()} for m in modules]  # forwards may count calls
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.autocast(), _restored(modules, buffers):
            try:
                model(raw, masker, torch.Generator().manual_seed(0), teacher)
            except KeyError as e:
                raise DataError(f"stage {name!r}: a tokenizer or objective needs batch field {e.args[0]!r}, which the "
                                f"dataset's samples do not have (they have: {', '.join(sorted(samples[0]))})") from e
            except Exception as e:  # a plugin's component that fails is named with its file:line; ours are bugs
                used = [("tokenizer", self.cfg.modality.tokenizer.name), *(("objective", node["name"])
                        for _, node, _ in objective_nodes(stage))]
                if stage.masker:
                    used.append(("masker", stage.masker.name))
                failure = self.components.blame(used, e)
                if failure is None:
                    raise
                raise failure from e

    def _step(self, index: int, name: str, step: int, raw: dict[str, Any], forward: nn.Module, masker: Any,
              optimizer: torch.optim.Optimizer, scaler: Any, stage: Any, teacher: Optional[nn.Module],
              signal_received: Optional[int]) -> tuple[dict[str, float], bool]:
        """One optimizer step; returns the metrics (averaged over ranks) and whether to stop for a signal."""
        raw = _to_device(raw, self.device)
        # each rank masks its own share of the batch: the mask stream depends on the rank too
        seed_parts = (self.cfg.run.seed, index, step, 1) + ((self.rank,) if self.world > 1 else ())
        generator = torch.Generator().manual_seed(mix_seed(*seed_parts))
        if self.cfg.run.cuda_graphs:  # a new step: graph outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast(), sdpa_kernels(self.cfg.run.sdpa_kernel):
            loss, metrics = forward(raw, masker, generator, teacher)
        # objectives may report tensors: one sync here, which also averages over ranks
        values, stop = mean_over_ranks([loss.detach(), *metrics.values()], flag=signal_received)
        value, metrics = values[0], dict(zip(metrics, values[1:]))
        if not math.isfinite(value):
            last = self.folder.last if self.folder.last.is_file() else None
            raise NonFiniteLossError(
                f"loss is {value} at stage {name!r} step {step + 1} ({', '.join(f'{k}={v}' for k, v in metrics.items())}); "
                f"the update was not applied. Last good checkpoint: {last or 'none written yet'}"
                + (" (continue with --resume after fixing the cause)" if last else ""))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = float("nan")
        if stage.optim.clip_grad:
            scaler.unscale_(optimizer)
            grad_norm = grad_norm_value(nn.utils.clip_grad_norm_(forward.parameters(), stage.optim.clip_grad))
        scaler.step(optimizer)
        scaler.update()
        return {"loss": value, "grad_norm": grad_norm, **metrics}, stop > 0

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

    def _save(self, name: str, step: int, model: StepForward, optimizer: torch.optim.Optimizer, scaler: Any,
              teacher: Optional[nn.Module]) -> None:
        if self._sharded:
            self._save_shards(name, step, model, optimizer, scaler, teacher)
            return
        if not self.main:
            return
        weights = self._gather_weights(model)
        optim_state = full_optimizer_state(model, optimizer)
        extra = {"teacher": teacher.state_dict()} if hasattr(teacher, "update") else {}  # only a moving teacher has state
        save_atomic({
            **extra,
            **weights,
            "stage": name,
            "step": step,
            "optimizer": optim_state,
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
        }, self.folder.last)

    def _save_shards(self, name: str, step: int, model: StepForward, optimizer: torch.optim.Optimizer, scaler: Any,
                     teacher: Optional[nn.Module]) -> None:
        """FSDP: each rank writes its shards to a new folder; then rank 0 points ``last.pt`` at it
        (atomically) and removes the older folders, so a kill at any moment leaves a complete one."""
        shards = self.folder.checkpoints / f"shards-{name}-{step:08d}"
        save_shards(shards, model, optimizer, teacher)
        if not self.main:
            return
        save_atomic({"stage": name, "step": step, "shards": shards.name, "scaler": scaler.state_dict(), "rng": rng_state()},
                    self.folder.last)
        self.folder.drop_shards_except(shards.name)

    def _log(self, record: dict[str, Any]) -> None:
        self.folder.metrics.parent.mkdir(parents=True, exist_ok=True)
        with open(self.folder.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(f"{record['stage']}/{k}", v, record["step"])

    def _tensorboard(self) -> Any:
        if self._writer is None and self.cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self._writer = False
            else:
                self._writer = SummaryWriter(str(self.folder.logs / "tensorboard"))
        return self._writer or None

    # ---- export -----------------------------------------------------------------------------
    def export(self) -> Path:
        """Backbone weights as safetensors plus the config sections needed to rebuild it."""
        from .export import export_backbone

        return export_backbone(self.backbone, self.cfg, self.folder.export)
