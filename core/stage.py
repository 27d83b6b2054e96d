"""A stage of a recipe, set up to train: `StageSetup.build` turns a stage's config (and the checkpoint
being resumed, if any) into one `StageRun`, which the trainer's loop consumes.

The set-up runs in this order, and the order is part of exact resume: building the objectives
draws their initial weights from the global RNG, and the RNG state of the checkpoint is restored
only after everything that draws from it has been built.

    initial weights (scratch / init_from) -> teacher -> objectives -> masker -> dataset -> monitor
    -> resumed weights and step -> dry run -> compile -> DDP / FSDP -> optimizer (+ its resumed
    state) -> RNG state -> loader
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from .backbone import Backbone
from .build import (build_backbone, build_dataset, build_masker, build_objectives, build_sensor_transforms, build_teacher,
                    build_transforms)
from .checkpoint import CheckpointError, checkpoint_part, load_checkpoint, load_model_state, save_atomic, set_rng_state, shard_folder
from .config import SCRATCH, ConfigError, objective_nodes
from .data import AugmentedDataset, collate, make_loader, mix_seed
from .device import compile_for
from .distributed import barrier
from .errors import DataError, UserError
from .init_weights import init_backbone
from .masking import Mask
from .mix import MixDataset
from .monitor import OnlineMonitor
from .objective import Batch, TargetSwitch, reads_targets
from .parallel import load_optimizer_state, load_shards, parallelize
from .runfolder import RunFolder
from .schedule import build_optimizer
from .teachers import MovingTeacher, Teacher
from .tokens import Tokens

log = logging.getLogger("anymodal.train")

__all__ = ["StageRun", "StageSetup", "StepForward", "split_batch", "stage_steps", "to_device"]

Masker = Callable[[Tokens, torch.Generator], Mask]


def stage_steps(stage: Any, num_samples: int, batch_size: int) -> int:
    """The stage's length in optimizer steps: ``steps``, or ``epochs`` over the dataset when given."""
    if stage.epochs is None:
        return int(stage.steps)
    return max(1, math.ceil(stage.epochs * num_samples / batch_size))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch's tensors on ``device`` (other fields, such as text, as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """A collated batch as ``parts`` equal micro-batches, every field cut along its first dimension
    (tensors and lists alike; the batch size must be a multiple of ``parts``)."""
    if parts == 1:
        return [batch]
    size = len(next(iter(batch.values())))
    step = size // parts
    return [{k: v[i * step:(i + 1) * step] for k, v in batch.items()} for i in range(parts)]


class StepForward(nn.Module):
    """A step's forward pass as one module: tokenize -> mask -> objectives, summed with weights.

    One module so that DistributedDataParallel can wrap it: DDP synchronizes the gradients of the
    parameters used inside its ``forward``, and the objectives reach the backbone from in here.

    Args:
        backbone: the student.
        objectives: label -> `Objective`, the stage's objectives.
        weights: label -> loss weight.
        sensor: the sensor whose tokens the batch holds (None: the backbone's first).
    """

    def __init__(self, backbone: Backbone, objectives: nn.ModuleDict, weights: dict[str, float],
                 sensor: Optional[str] = None) -> None:
        super().__init__()
        self.backbone, self.objectives, self.weights, self.sensor = backbone, objectives, weights, sensor

    def check_batch(self, raw: dict[str, Any]) -> None:
        """Each objective's ``check_batch(raw)``, where it has one, on the batch still on the host."""
        for objective in self.objectives.values():
            check = getattr(objective, "check_batch", None)
            if check is not None:
                check(raw)

    def forward(self, raw: dict[str, Any], masker: Optional[Masker], generator: torch.Generator,
                teacher: Optional[Teacher]) -> tuple[Tensor, dict[str, Any]]:
        """The weighted loss and every objective's metrics as ``"<label>/<name>"`` (tensors or floats)."""
        tokens = self.backbone.tokenize(raw, self.sensor)
        mask = masker(tokens, generator) if masker is not None else None
        batch = Batch(raw, tokens, mask, generator)
        loss = torch.zeros((), device=tokens.x.device)
        metrics: dict[str, Any] = {}
        for label, objective in self.objectives.items():
            out = objective(batch, self.backbone, teacher)
            loss = loss + self.weights[label] * out.loss.float()
            metrics.update({f"{label}/{k}": v for k, v in out.metrics.items()})
        return loss, metrics


@dataclass
class StageRun:
    """Everything one stage's loop reads, and the step it has reached.

    Attributes:
        index: the stage's position in the recipe (its data order and masks are seeded by it).
        name: the stage's name.
        stage: its config node (``optim``, ``steps``, ...).
        total: its length in optimizer steps.
        batch_size: the global batch size.
        model: backbone and objectives as one module, unwrapped (checkpoints read it).
        forward: what a step calls: ``model``, or its DDP wrapper.
        masker: the stage's masker, or None.
        teacher: the stage's teacher, or None.
        moving: ``teacher`` when it is a `MovingTeacher` (updated each step, checkpointed), else None.
        optimizer: AdamW over ``model``'s (possibly sharded) parameters.
        scaler: the fp16 gradient scaler (disabled in other precisions).
        loader: this rank's share of each global batch, from ``step`` on (iterated once, by the loop).
        step: optimizer steps done; the resumed step before the first one.
        monitor: the online monitor (rank 0, ``eval.monitor_every``), or None.
        skipped: samples the dataset's scan left out (corrupt files), logged as ``data/skipped``.
        sources: the `data.mix` sources' labels (their shares of each batch are logged), or empty.
    """

    index: int
    name: str
    stage: Any
    total: int
    batch_size: int
    model: StepForward
    forward: nn.Module
    masker: Optional[Masker]
    teacher: Optional[Teacher]
    moving: Optional[MovingTeacher]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Iterable[dict[str, Any]]
    step: int
    monitor: Optional[OnlineMonitor]
    skipped: int
    sources: tuple[str, ...] = ()


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


class StageSetup:
    """Builds each stage's `StageRun` for one process of a run.

    Args:
        cfg: the composed, validated config.
        components: the loaded plugin components.
        folder: the run folder.
        device: this process's device.
        autocast: the step's autocast context factory (``core.device.autocast_for``).
        amp_dtype: its dtype (float16 turns the gradient scaler on), or None.
        rank: this process's rank.
        world: the number of processes.
    """

    def __init__(self, cfg: DictConfig, components: Any, folder: RunFolder, device: torch.device, autocast: Any,
                 amp_dtype: Optional[torch.dtype], rank: int, world: int) -> None:
        self.cfg, self.components, self.folder, self.device = cfg, components, folder, device
        self.autocast, self.amp_dtype = autocast, amp_dtype
        self.rank, self.world, self.main = rank, world, rank == 0

    def build(self, backbone: Backbone, index: int, name: str, stage: Any,
              state: Optional[dict[str, Any]]) -> Optional[StageRun]:
        """Set stage ``name`` up to train ``backbone``, from the start or from ``state`` (``last.pt``).

        Returns:
            The `StageRun`, or None when ``state`` was written at the stage's last step: the stage
            is over, and ``backbone`` holds its final weights.
        """
        if state is None:
            self._initial_weights(backbone, name, stage)
        teacher, objectives, weights = self._objectives(backbone, name, stage)
        masker = build_masker(stage, self.components)
        batch_size = stage.batch_size or self.cfg.data.batch_size
        share, micro = batch_size // self.world, stage.optim.accumulate_steps
        if share % micro:
            raise UserError(f"recipe.stages.{name}.optim.accumulate_steps={micro} must divide the batch each rank "
                            f"takes: {share} (batch {batch_size} over {self.world} rank(s))")
        dataset = self._dataset(index, stage.sensor or backbone.sensor)
        total = stage_steps(stage, len(dataset), batch_size)
        monitor = OnlineMonitor(self.cfg, self.components, self.device) if self.cfg.eval.monitor_every and self.main else None
        model = StepForward(backbone, objectives, weights, stage.sensor)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        shards = shard_folder(self.folder.last, state) if state is not None else None
        step = self._resumed(name, state, shards, objectives, teacher, scaler)
        if step >= total:  # the checkpoint is this stage's end
            self._stage_ended(backbone, name, state, shards)
            return None
        self._dry_run(name, stage, model, masker, teacher, dataset)
        forward, optimizer = self._distributed(model, objectives, teacher, stage, state, shards)
        if state is not None:
            set_rng_state(state["rng"])
        loader = make_loader(dataset, batch_size, mix_seed(self.cfg.run.seed, index), start_step=step,
                             num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                             rank=self.rank, world=self.world)
        skipped = len(getattr(dataset.dataset, "skipped", ()))  # corrupt files the dataset's scan left out
        moving = teacher if isinstance(teacher, MovingTeacher) else None
        mix = dataset.dataset if isinstance(dataset.dataset, MixDataset) else None
        if mix is not None:
            log.info("data.mix: each epoch of %d samples holds %s", len(mix), ", ".join(
                f"{n} of {label} ({n / len(mix):.3f}, weight {w:.3f})" for label, n, w in zip(mix.labels, mix.per_epoch, mix.weights)))
        return StageRun(index, name, stage, total, batch_size, model, forward, masker, teacher, moving, optimizer, scaler,
                        loader, step, monitor, skipped, tuple(mix.labels) if mix is not None else ())

    def _initial_weights(self, backbone: Backbone, name: str, stage: Any) -> None:
        """A fresh stage starts from the run's initial random weights (``init_from: scratch``), an
        earlier stage's final weights (``init_from: <stage>``), or where the last stage left off."""
        if stage.init_from == SCRATCH:
            with torch.random.fork_rng(devices=[]):  # same seed, same construction: the run's first weights
                torch.manual_seed(self.cfg.run.seed)
                initial = build_backbone(self.cfg, self.components).to(self.device)
            if self.cfg.model.init:  # the run's initial weights are the ones it was started from
                init_backbone(initial, str(self.cfg.model.init))
            backbone.load_state_dict(initial.state_dict())
        elif stage.init_from:
            path = self.folder.final(stage.init_from)
            load_model_state(backbone, checkpoint_part(load_checkpoint(path), "backbone", path), f"stage {name} init_from {path}")

    def _objectives(self, backbone: Backbone, name: str,
                    stage: Any) -> tuple[Optional[Teacher], nn.ModuleDict, dict[str, float]]:
        """The stage's teacher, objectives (label -> `Objective`) and loss weights, on the device; the
        tokenizer makes reconstruction targets only when an objective reads them."""
        prefix = f"recipe.stages.{name}"
        with _bad_value(f"{prefix}.teacher"):
            teacher = build_teacher(stage, self.components, backbone, self.folder)
        if teacher is not None:
            teacher.to(self.device)
        with _bad_value(f"{prefix}.objectives"):
            objectives, weights = build_objectives(stage, self.components, backbone, teacher)
        objectives.to(self.device)
        tokenizer = backbone.tokenizer_of(stage.sensor)
        if isinstance(tokenizer, TargetSwitch):
            tokenizer.make_targets = reads_targets(objectives.values())
        return teacher, objectives, weights

    def _dataset(self, index: int, key: str) -> AugmentedDataset:
        """``data.train`` with ``data.transforms`` (and the sensor's own) applied to field ``key``, and
        each other scene sensor's own transforms to its field; seeded by the stage."""
        cfg = self.cfg
        with _bad_value("data.train / data.transforms / modality.sensors.*.transforms"):
            return AugmentedDataset(build_dataset(cfg, "train", self.components), build_transforms(cfg, self.components, key),
                                    key, mix_seed(cfg.run.seed, index), views=cfg.data.views,
                                    others=build_sensor_transforms(cfg, self.components, skip=key))

    def _resumed(self, name: str, state: Optional[dict[str, Any]], shards: Optional[Path], objectives: nn.ModuleDict,
                 teacher: Optional[Teacher], scaler: torch.amp.GradScaler) -> int:
        """Load the checkpoint's whole weights (a sharded one loads after sharding) and scaler; its step, or 0."""
        if state is None:
            return 0
        if shards is None:  # whole weights go in before sharding; optimizer state after
            load_model_state(objectives, state["objectives"], f"checkpoint {self.folder.last} (objectives of stage {name})")
            if "teacher" in state:
                load_model_state(teacher, state["teacher"], f"checkpoint {self.folder.last} (teacher of stage {name})")
        scaler.load_state_dict(state["scaler"])
        return int(state["step"])

    def _stage_ended(self, backbone: Backbone, name: str, state: dict[str, Any], shards: Optional[Path]) -> None:
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
            load_model_state(backbone, checkpoint_part(load_checkpoint(final), "backbone", final), f"stage {name} final {final}")
        set_rng_state(state["rng"])

    def _dry_run(self, name: str, stage: Any, model: StepForward, masker: Optional[Masker], teacher: Optional[Teacher],
                 dataset: AugmentedDataset) -> None:
        """One small batch through tokenizer, masker and every objective before the first step, so a field the
        batch lacks is a clear error now, not a KeyError hours in. Leaves no trace: no gradients, RNG restored."""
        samples = [dataset[(i, 0)] for i in range(min(2, len(dataset)))]
        host = collate(samples)
        raw = to_device(host, self.device)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        modules = [m for m in (model, teacher) if m is not None]
        buffers = [{k: b.clone() for k, b in m.named_buffers()} for m in modules]  # forwards may count calls
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.autocast(), _restored(modules, buffers):
            try:
                model.check_batch(host)
                model(raw, masker, torch.Generator().manual_seed(0), teacher)
            except KeyError as e:
                missing = e.args[0] if e.args else ""
                if isinstance(missing, str) and " " in missing:  # a component's own message, already explained
                    raise DataError(f"stage {name!r}: {missing}") from e
                raise DataError(f"stage {name!r}: a tokenizer or objective needs batch field {missing!r}, which the "
                                f"dataset's samples do not have (they have: {', '.join(sorted(samples[0]))})") from e
            except Exception as e:  # a plugin's component that fails is named with its file:line; ours are bugs
                failure = self.components.blame(self._used(stage), e)
                if failure is None:
                    raise
                raise failure from e

    def _used(self, stage: Any) -> list[tuple[str, str]]:
        """(kind, name) of the components a stage's step runs, for `Components.blame`."""
        modality = self.cfg.modality
        tokenizer = modality.sensors[stage.sensor].tokenizer if stage.sensor in modality.sensors else modality.tokenizer
        used = [("tokenizer", tokenizer.name),
                *(("objective", node["name"]) for _, node, _ in objective_nodes(stage))]
        if stage.masker:
            used.append(("masker", stage.masker.name))
        return used

    def _distributed(self, model: StepForward, objectives: nn.ModuleDict, teacher: Optional[Teacher], stage: Any,
                     state: Optional[dict[str, Any]], shards: Optional[Path]) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Compile (``run.compile``), wrap or shard for the ranks (``run.parallel``), then build the optimizer
        over the resulting parameters and load its resumed state (and a sharded checkpoint's weights)."""
        cfg = self.cfg
        compile_for(cfg.run.compile, model, objectives, teacher, cfg.run.cuda_graphs)
        forward = parallelize(cfg.run.parallel, self.world, model, teacher)
        optimizer = build_optimizer(model, stage.optim, self.device)  # after sharding: FSDP swaps the parameters
        if shards is not None:
            load_shards(shards, model, optimizer, teacher)
        elif state is not None:
            load_optimizer_state(model, optimizer, state["optimizer"])
        return forward, optimizer
