"""What ``anymodal finetune RUN`` runs: a run folder's backbone (its export, else its last checkpoint;
or random weights with ``finetune.init=scratch``) and a task head, trained on the run's labelled
data by `core.finetune`, in a folder of its own (default ``RUN/finetune``, ``RUN/finetune-scratch``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from ..core.build import build_backbone, build_dataset, build_transforms
from ..core.config import _nest, _parse_override, load_run_config, save_config
from ..core.data import AugmentedDataset, mix_seed
from ..core.device import resolve_device
from ..core.errors import UserError
from ..core.export import WEIGHTS, load_exported
from ..core.finetune import Finetuned, FinetuneRun, label_classes, split_validation
from ..core.loggers import MetricLoggers
from ..core.pretrained import load_checkpoint_backbone
from ..core.runfolder import RunFolder
from ..core.schema import FinetuneConfig, key_errors, rule_errors
from ..plugins.manager import load_components

__all__ = ["finetune", "finetune_config"]

log = logging.getLogger("anymodal.finetune")

# what a fine-tuning run may change of its source run's config
_CHANGEABLE = ("finetune.", "run.device", "run.precision", "run.seed", "run.tensorboard", "run.wandb", "run.mlflow",
               "data.num_workers", "eval.labels",
               "eval.point_labels", "eval.point_sensor", "eval.point_classes")


def finetune_config(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """The run's config with the command line's ``overrides`` (``finetune.*`` and a few run and eval
    keys) applied and checked.

    Raises:
        UserError: an override of another key, an unknown key, or a value out of range.
    """
    cfg = load_run_config(run_dir)
    errors = []
    for text in overrides:
        key, value = _parse_override(text)
        if not key.startswith(_CHANGEABLE):
            errors.append(f"{key}: fine-tuning keeps the run's config; it may set finetune.*, "
                          + ", ".join(k for k in _CHANGEABLE if not k.endswith(".")))
            continue
        found = key_errors(_nest(key, value), "the command line")
        if found:
            errors += found
        else:
            OmegaConf.update(cfg, key, value, merge=True)
    if not errors:
        errors = rule_errors(OmegaConf.to_container(cfg.finetune), lambda key: "the command line", FinetuneConfig,
                             "finetune.")
    if errors:
        raise UserError("; ".join(errors))
    return cfg


def _backbone(cfg: DictConfig, components: Any, folder: RunFolder) -> Any:
    """The backbone with ``finetune.drop_path``: the run's weights, or (scratch) seeded random ones."""
    ft = cfg.finetune
    shaped = OmegaConf.merge(cfg, {"model": {"drop_path": ft.drop_path}})
    torch.manual_seed(cfg.run.seed)
    backbone = build_backbone(shaped, components)
    if ft.init == "scratch":
        return backbone
    if (folder.export / WEIGHTS).is_file():
        log.info("fine-tuning the exported backbone of %s", folder.root)
        return load_exported(backbone, folder.export)
    log.info("fine-tuning the backbone of %s", folder.last)
    return load_checkpoint_backbone(backbone, folder.last)


def finetune(run_dir: str, overrides: Sequence[str] = (), out: Optional[str] = None,
             resume: bool = False) -> tuple[Path, dict[str, Any]]:
    """Fine-tune run ``run_dir``'s backbone; (the output folder, its ``results.json`` content).

    Raises:
        FileExistsError: ``out`` holds a fine-tuning run already and ``resume`` is not set.
        FileNotFoundError: ``run_dir`` is not a run folder, or ``resume`` finds no checkpoint.
        UserError: a bad override, labels the data lacks, a config that differs from the resumed one.
        `core.finetune.FinetuneStopped`: SIGTERM or SIGINT; the run checkpointed.
    """
    source = RunFolder(Path(run_dir))
    cfg = finetune_config(source.root, overrides)
    ft = cfg.finetune
    folder = Path(out) if out else source.root / ("finetune" if ft.init == "pretrained" else "finetune-scratch")
    folder.mkdir(parents=True, exist_ok=True)
    with RunFolder(folder).lock():
        checkpoint = folder / "checkpoints" / "last.pt"
        if checkpoint.is_file() and not resume:
            raise FileExistsError(f"{folder} holds a fine-tuning run already: continue it with --resume, or pass another --out")
        if resume and not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: {folder} has no fine-tuning checkpoint ({checkpoint})")
        if resume:
            _check_same(OmegaConf.load(folder / "config.yaml"), cfg, folder)
        save_config(cfg, folder / "config.yaml")
        return folder, _run(cfg, source, folder, resume)


def _check_same(saved: DictConfig, cfg: DictConfig, folder: Path) -> None:
    changed = [k for k in ("finetune", "eval") if OmegaConf.to_container(saved.get(k, {})) != OmegaConf.to_container(cfg[k])]
    if changed:
        raise UserError(f"--resume: the config differs from the one {folder} was started with (in {', '.join(changed)}): "
                        f"give the same overrides, or start another --out")


def _run(cfg: DictConfig, source: RunFolder, folder: Path, resume: bool) -> dict[str, Any]:
    ft, ev = cfg.finetune, cfg.eval
    components = load_components(cfg.plugins)
    device = resolve_device(cfg.run.device)
    backbone = _backbone(cfg, components, source).to(device)
    if ft.head == "dense":
        if not ev.point_labels:
            raise UserError("finetune.head=dense reads per-point labels from eval.point_labels, which is not set")
        labels, sensor = str(ev.point_labels), ev.point_sensor
    else:
        labels, sensor = str(ev.labels[0]), None
    full, test = build_dataset(cfg, "train", components), build_dataset(cfg, "test", components)
    train_ids, val_ids = split_validation(len(full), ft.val_fraction, cfg.run.seed)
    val = Subset(full, val_ids)
    key = sensor or backbone.sensor
    # a dense head's labels are aligned with the points: augmentations that move or drop points are left out
    transforms = build_transforms(cfg, components, key) if ft.head == "cls" else []
    train = AugmentedDataset(Subset(full, train_ids), transforms, key, mix_seed(cfg.run.seed, 11))
    classes = ft.classes or (len(ev.point_classes) if ft.head == "dense" and ev.point_classes else 0)
    classes = classes or label_classes([full, test], labels, ft.batch_size)
    log.info("fine-tuning (%s head, %d classes, init %s) on %d samples, validating on %d, testing on %d, into %s",
             ft.head, classes, ft.init, len(train), len(val), len(test), folder)
    model = Finetuned(backbone, ft.head, classes, labels, sensor).to(device)
    run = FinetuneRun(model, train, val, test, ft, cfg.run.seed, folder, device, str(cfg.run.precision),
                      int(cfg.data.num_workers), MetricLoggers(cfg, folder / "logs"))
    if resume:
        run.resume()
    return run.run()
