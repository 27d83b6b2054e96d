"""What ``anymodal train`` and a submitted Slurm job run: compose and validate a config, or continue a
run folder from its saved one, and hand it to the trainer inside the folder's lock."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from ..core.config import compose, validate
from ..core.errors import UserError
from ..core.runfolder import RunFolder
from ..plugins.manager import load_components

__all__ = ["load_config", "resume_config", "train"]

log = logging.getLogger("anymodal")


def load_config(config: str, overrides: Sequence[str]):
    """What `anymodal train` runs: the composed config (plugins' defaults merged, validated) and the components."""
    composed = compose(config, overrides)
    components = load_components(composed.cfg.plugins)
    for defaults in components.configure(composed.cfg):
        composed.cfg = OmegaConf.merge(OmegaConf.merge(composed.cfg, defaults), composed.cfg)
    validate(composed, components)
    return composed, components


def _log_to(folder: Path) -> None:
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / "logs" / "anymodal.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)


def resume_config(folder: RunFolder, overrides: Sequence[str], allow_changes: bool):
    """The run's saved config with the resume's overrides applied, and what they change (refused when
    they would alter the weights, unless ``allow_changes``)."""
    from ..core.resume import ResumeChangeError, config_changes, harmful

    recorded = folder.recorded_overrides()
    saved = compose(str(folder.config), recorded)  # as saved: plugin defaults are in it already
    composed, components = load_config(str(folder.config), [*recorded, *overrides])
    changes = config_changes(saved.cfg, composed.cfg)
    refused = harmful(changes)
    if refused and not allow_changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ResumeChangeError(f"--resume continues {folder.root} with its saved config ({folder.config}); these overrides "
                                f"would make it differ from an uninterrupted run: {listed}. Pass --allow-changes to "
                                f"resume with them anyway (they are recorded in {folder.changes.name}), or start a new run")
    return composed, components, changes


def train(config: Optional[str], overrides: Sequence[str], run_dir: Optional[str] = None, resume: bool = False,
          allow_changes: bool = False) -> Path:
    """Run a config's recipe in a run folder; with ``resume``, continue the folder's run from its saved config."""
    from ..core.trainer import Trainer

    from ..core.device import resolve_device
    from ..core.distributed import init_from_env, rank, shutdown

    composed = components = None
    if config is not None:
        composed, components = load_config(config, overrides)
        folder = RunFolder(Path(run_dir) if run_dir else Path(composed.cfg.run.out_dir) / composed.cfg.run.name)
    elif run_dir and resume:
        folder = RunFolder(Path(run_dir))
    else:
        raise UserError("name a config to train (e.g. `anymodal train default`), or resume a run folder: "
                        "`anymodal train --resume --run-dir DIR`")
    changes: dict = {}
    if resume and folder.last.is_file() and folder.config.is_file():
        composed, components, changes = resume_config(folder, overrides, allow_changes)
    elif composed is None:  # nothing was trained yet: start again from the folder's saved config
        if not folder.config.is_file():
            raise UserError(f"{folder.root} holds no run to resume; name a config to start one there")
        composed, components = load_config(str(folder.config), overrides)
    cfg = composed.cfg
    # under torchrun or a multi-task Slurm job: join the process group the environment describes
    created = init_from_env(resolve_device(cfg.run.device).type)
    try:
        with folder.lock() if rank() == 0 else contextlib.nullcontext():  # one run per folder
            if rank() == 0:
                _log_to(folder.root)
            log.info("run folder %s; config from %s", folder.root, ", ".join(composed.files))
            Trainer(cfg, components, folder.root, resume=resume, changes=changes).run()
    finally:
        if created:
            shutdown()
    return folder.root
