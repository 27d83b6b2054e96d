"""What ``anymodal train`` and a submitted Slurm job run: compose and validate a config, or continue a
run folder from its saved one, and hand it to the trainer inside the folder's lock. A run folder at
a URL (``s3://...``) is trained in a local working copy mirrored to it (`core.remote_run`)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from omegaconf import OmegaConf

from ..core.config import compose, validate
from ..core.errors import UserError
from ..core.remote_run import RemoteRun, is_url
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


def _run_folder(out_dir: str, name: str) -> str:
    """``run.out_dir/run.name``, for a local folder or a URL."""
    return f"{out_dir.rstrip('/')}/{name}" if is_url(out_dir) else str(Path(out_dir) / name)


def _run_config(folder: RunFolder, where: str, composed, components, overrides: Sequence[str], resume: bool,
                allow_changes: bool):
    """The config the run continues (``resume``: the folder's saved one) or starts with, and what the overrides change."""
    changes: dict = {}
    if resume and folder.last.is_file() and folder.config.is_file():
        composed, components, changes = resume_config(folder, overrides, allow_changes)
    elif composed is None:  # nothing was trained yet: start again from the folder's saved config
        if not folder.config.is_file():
            raise UserError(f"{where} holds no run to resume; name a config to start one there")
        composed, components = load_config(str(folder.config), overrides)
    return composed, components, changes


def train(config: Optional[str], overrides: Sequence[str], run_dir: Optional[str] = None, resume: bool = False,
          allow_changes: bool = False, take_over: bool = False) -> Union[Path, str]:
    """Run a config's recipe in a run folder; with ``resume``, continue the folder's run from its saved config.

    The run folder may be an fsspec URL (``s3://bucket/prefix/run``, or ``run.out_dir=s3://...``): see
    `core.remote_run`; ``take_over`` then takes its lock from another run. Returns the folder (the URL for one).
    """
    from ..core.trainer import Trainer

    from ..core.device import resolve_device
    from ..core.distributed import init_from_env, rank, shutdown

    composed = components = None
    if config is not None:
        composed, components = load_config(config, overrides)
        target = str(run_dir) if run_dir else _run_folder(str(composed.cfg.run.out_dir), composed.cfg.run.name)
    elif run_dir and resume:
        target = str(run_dir)
    else:
        raise UserError("name a config to train (e.g. `anymodal train default`), or resume a run folder: "
                        "`anymodal train --resume --run-dir DIR`")
    if is_url(target):
        return _train_remote(RemoteRun(target), composed, components, overrides, resume, allow_changes, take_over)
    folder = RunFolder(Path(target))
    composed, components, changes = _run_config(folder, str(folder.root), composed, components, overrides, resume,
                                                allow_changes)
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


def _train_remote(remote: RemoteRun, composed, components, overrides: Sequence[str], resume: bool, allow_changes: bool,
                  take_over: bool) -> str:
    """`train` at a URL: rank 0 holds the remote lock and fetches the run into the working copy, every
    rank trains in the working copy, rank 0 uploads after each checkpoint and at the end."""
    from ..core.trainer import Preempted, Trainer

    from ..core.device import resolve_device
    from ..core.distributed import init_from_env, rank, shutdown

    if composed is not None:
        device = resolve_device(composed.cfg.run.device).type
    else:  # only the process group needs it before the fetch: read the saved config's device
        device = _saved_device(remote, overrides) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "cpu"
    created = init_from_env(device)
    try:
        with remote.hold(take_over) if rank() == 0 else contextlib.nullcontext():  # one run per remote folder
            _same_working_copy(remote)
            folder = RunFolder(remote.local)
            if not resume and folder.last.is_file():
                raise FileExistsError(f"{remote.url} already holds a run (checkpoints/last.pt): continue it with "
                                      f"--resume, or start a new run in another folder with --run-dir or run.name=NAME")
            composed, components, changes = _run_config(folder, remote.url, composed, components, overrides, resume,
                                                        allow_changes)
            if rank() == 0:
                _log_to(folder.root)
            log.info("run folder %s (working copy %s); config from %s", remote.url, folder.root, ", ".join(composed.files))
            try:
                Trainer(composed.cfg, components, folder.root, resume=resume, changes=changes,
                        after_save=remote.push if rank() == 0 else None).run()
            except Preempted as stop:
                stop.run_dir = remote.url  # what to resume: the URL, not the working copy
                raise
    finally:
        if created:
            shutdown()
    return remote.url


def _saved_device(remote: RemoteRun, overrides: Sequence[str]) -> str:
    """``run.device`` of the run saved at the URL (with its recorded changes and ``overrides``), read
    before the fetch: every rank needs it to join the process group."""
    from ..core.device import resolve_device

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.yaml", "config-changes.jsonl"):
            remote.fetch(name, os.path.join(tmp, name))
        folder = RunFolder(Path(tmp))
        if not folder.config.is_file():
            raise UserError(f"{remote.url} holds no run to resume; name a config to start one there")
        composed, _ = load_config(str(folder.config), [*folder.recorded_overrides(), *overrides])
        return resolve_device(composed.cfg.run.device).type


def _same_working_copy(remote: RemoteRun) -> None:
    """Every rank must see the working copy rank 0 fetched (one machine, or ANYMODAL_CACHE on a shared filesystem)."""
    from ..core.distributed import rank, world_size

    if world_size() == 1:
        return
    import torch.distributed as dist

    session = [remote.session if rank() == 0 else None]
    dist.broadcast_object_list(session, src=0)  # also: no rank reads the working copy before the fetch
    if rank() != 0 and remote.fetched_session() != session[0]:
        raise UserError(f"rank {rank()} does not see the working copy of {remote.url} that rank 0 fetched "
                        f"({remote.local}): every process of a run at a URL needs the same one; on several "
                        "machines set ANYMODAL_CACHE to a folder on a shared filesystem")
