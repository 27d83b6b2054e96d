"""`model.init`: start a run from weights trained elsewhere.

The source is a local file or folder (an anymodal export, run folder or checkpoint; a timm ViT
checkpoint as safetensors or a torch file) or a hub name (``timm:NAME``, ``hf-hub:ORG/REPO``). What
fits the backbone is loaded; position tables of another grid are interpolated to the backbone's;
everything else is reported, never silently dropped: `InitReport`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_weights_file
from .errors import UserError

__all__ = ["InitError", "InitReport", "HUB_PREFIXES", "init_backbone", "read_init_state", "local_init_problem"]

log = logging.getLogger(__name__)

HUB_PREFIXES = ("timm:", "hf-hub:")
_WRAPPERS = ("module.", "_orig_mod.")  # DDP and torch.compile prefixes
_NESTED = ("backbone", "state_dict", "model", "module")  # where frameworks keep the weights in a checkpoint


class InitError(UserError):
    """``model.init`` names weights that cannot be read or that do not fit the backbone at all."""


@dataclass
class InitReport:
    """What `init_backbone` did with each tensor of the source and of the backbone."""

    source: str
    layout: str  # "anymodal" or "timm"
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)  # "key: (from) -> (to)", interpolated
    skipped: list[str] = field(default_factory=list)  # "key: source (shape) vs backbone (shape)"
    missing: list[str] = field(default_factory=list)  # backbone keys the source does not have
    unexpected: list[str] = field(default_factory=list)  # source keys the backbone does not have

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""

        return (f"model.init {self.source} ({self.layout} weights): {len(self.loaded)} tensors loaded, "
                f"{len(self.resized)} resized{few(self.resized)}, {len(self.skipped)} skipped for their shape"
                f"{few(self.skipped)}, {len(self.missing)} missing{few(self.missing)}, "
                f"{len(self.unexpected)} unused{few(self.unexpected)}")

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def local_init_problem(source: str) -> Optional[str]:
    """Why a local ``model.init`` cannot be read (checked with the config, before a run starts), or None."""
    if source.startswith(HUB_PREFIXES):
        return None
    if not Path(source).expanduser().exists():
        return f"no such file or folder {source}"
    return None


def _hub_file(source: str) -> Path:
    """The weights of a hub name, from the local cache or downloaded; an InitError when neither works."""
    repo = ("timm/" + source[len("timm:"):]) if source.startswith("timm:") else source[len("hf-hub:"):]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise InitError(f"model.init {source}: reading from the hub needs huggingface_hub (pip install huggingface_hub); "
                        "or download the weights and give their path") from None
    try:
        return Path(hf_hub_download(repo, "model.safetensors"))
    except Exception as e:  # offline, no such repo, no access: the hub raises many types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InitError(f"model.init {source}: cannot get model.safetensors of {repo} from the Hugging Face hub "
                        f"({type(e).__name__}: {reason[:200]}); on a machine without access, download it elsewhere "
                        "and give the file's path") from None


def _torch_file(path: Path) -> dict[str, Tensor]:
    """The state dict of a torch checkpoint, read without running code (``weights_only``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"weights file {path} cannot be read ({type(e).__name__}: {e})") from e
    for _ in range(2):  # {"model": {...}}, {"state_dict": {...}}, an anymodal checkpoint's {"backbone": {...}}
        if isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()):
            inner = next((state[k] for k in _NESTED if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise CheckpointError(f"weights file {path} holds no tensors (looked in {', '.join(_NESTED)} too)")
    return tensors


def read_init_state(source: str) -> dict[str, Tensor]:
    """The tensors ``source`` names (see the module docstring), wrapper prefixes removed."""
    if source.startswith(HUB_PREFIXES):
        path = _hub_file(source)
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        from .export import WEIGHTS

        found = next((p for p in (path / WEIGHTS, path / "export" / WEIGHTS, path / "checkpoints" / "last.pt")
                      if p.is_file()), None)
        if found is None:
            raise InitError(f"model.init {source}: the folder holds no {WEIGHTS}, export/{WEIGHTS} or "
                            "checkpoints/last.pt")
        path = found
    if not path.is_file():
        raise InitError(f"model.init {source}: no such file or folder")
    try:
        state = read_weights_file(path) if path.suffix == ".safetensors" else _torch_file(path)
    except CheckpointError as e:
        raise InitError(f"model.init {source}: {e}") from None
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPERS:
            key = key[len(prefix):] if key.startswith(prefix) else key
        out[key] = value
    return out


def _is_timm_vit(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("patch_embed.", "blocks.")) for k in state)


def _resize_table(table: Tensor, grid: tuple[int, ...]) -> Optional[Tensor]:
    """A learned position table ``[N, D]`` over a grid of ``grid``'s shape scaled evenly, interpolated to
    ``grid``; None when ``N`` is no such grid."""
    rows, dim = table.shape
    scale = (rows / math.prod(grid)) ** (1 / len(grid))
    source = tuple(max(1, round(g * scale)) for g in grid)
    if math.prod(source) != rows or len(grid) > 3:
        return None
    mode = {1: "linear", 2: "bicubic", 3: "trilinear"}[len(grid)]
    volume = table.float().T.reshape(1, dim, *source)
    return F.interpolate(volume, size=grid, mode=mode, align_corners=False).reshape(dim, -1).T.to(table.dtype)


def init_backbone(backbone: nn.Module, source: str) -> InitReport:
    """Load what fits of ``source`` into ``backbone`` (in place) and say what happened.

    Raises:
        InitError: the source cannot be read, or not one of its tensors fits the backbone (weights
            of another model).
    """
    state = read_init_state(source)
    layout = "anymodal"
    unused: list[str] = []
    if _is_timm_vit(state):
        from .timm_compat import backbone_state_from_timm_vit

        layout = "timm"
        table = getattr(getattr(backbone.encoder, "posenc", None), "table", None)
        state = backbone_state_from_timm_vit(state, num_patches=table.shape[0] if isinstance(table, Tensor) else None,
                                             unmapped=unused)
    report = InitReport(source, layout, unexpected=unused)
    own = backbone.state_dict()
    grids = {f"{name}.table": module.grid_size for name, module in backbone.named_modules() if hasattr(module, "grid_size")
             and isinstance(getattr(module, "table", None), Tensor)}
    take: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif value.shape == own[key].shape:
            take[key] = value
            report.loaded.append(key)
        elif key in grids and value.dim() == 2 and value.shape[1] == own[key].shape[1] and \
                (resized := _resize_table(value, tuple(grids[key]))) is not None:
            take[key] = resized
            report.resized.append(f"{key}: {tuple(value.shape)} -> {tuple(own[key].shape)}")
        else:
            report.skipped.append(f"{key}: {tuple(value.shape)} vs {tuple(own[key].shape)}")
    report.missing = sorted(set(own) - set(state))
    if not take:
        raise InitError(f"model.init {source}: none of its {len(state)} tensors fits this backbone "
                        f"({len(report.skipped)} of another shape, first: {', '.join(report.skipped[:2]) or 'none'}; "
                        f"{len(report.unexpected)} unknown, first: {', '.join(report.unexpected[:2]) or 'none'}): "
                        "weights of another model")
    with torch.no_grad():
        for key, value in take.items():
            own[key].copy_(value.to(own[key].dtype))
    return report
