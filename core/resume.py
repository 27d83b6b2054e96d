"""What a resumed run may change: its config comes from the run folder, and overrides are checked.

A resume continues bit for bit only with the config the run started with. Overrides on
``--resume`` that cannot change the weights (progress bar, logging, checkpoint cadence, threads,
data workers, evaluation, the launcher) are applied quietly; any other change is refused unless
``--allow-changes`` is given, and then it is recorded in the folder (`RunFolder.changes`) while
``config.yaml`` keeps the config the run started with.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

__all__ = ["HARMLESS", "config_changes", "harmful", "ResumeChangeError"]

# keys (and key prefixes, ending in ".") whose change leaves a resumed run's weights as they would have been
HARMLESS = ("run.name", "run.out_dir", "run.progress", "run.tensorboard", "run.wandb", "run.mlflow", "run.log_every",
            "run.checkpoint_every", "run.threads", "data.num_workers", "eval.", "launcher.")


class ResumeChangeError(UserError):
    """``--resume`` with overrides that would make the resumed run differ from an uninterrupted one."""


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes(before: DictConfig, after: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Every leaf key whose value differs, as ``key -> (before, after)`` (absent keys read as None)."""
    a = _flat(OmegaConf.to_container(before, resolve=True))
    b = _flat(OmegaConf.to_container(after, resolve=True))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def harmful(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The changes that can alter the weights of the resumed run."""
    return {k: v for k, v in changes.items()
            if not any(k == h or (h.endswith(".") and k.startswith(h)) for h in HARMLESS)}
