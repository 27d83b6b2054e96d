"""Check a plugin against the contract (``hookspecs.py``) when it registers, so that a broken plugin is
reported at load time with what was wrong and where, not deep in a run: its tokenizers on a sample
batch (shapes, dtype, scale), the arguments its factories must take, and, for any exception raised
in its code, the file and line."""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..core.data import collate
from ..core.tokens import Tokens

__all__ = ["TokenizerCheck", "check_tokenizer", "token_scale_note", "factory_problems", "plugin_home",
           "raised_at", "describe_failure", "CHECK_DIM", "CHECK_BATCH", "SINCOS_RMS", "TOKEN_RMS_FLOOR",
           "TOKEN_RMS_CEILING", "ALWAYS_PASSED"]

CHECK_DIM = 16  # the encoder width the tokenizer is built with for the check
CHECK_BATCH = 2  # samples in the check's batch
SINCOS_RMS = 2 ** -0.5  # RMS of the sin-cos positional encoding: each (sin, cos) pair has unit norm
# Token RMS (over channels) against that encoding, which the encoder adds to every token. The
# built-in sensor tokenizers' largest tokens measure 0.36-0.66 on their own data (dim 16); a plugin
# whose tokens were all near 0.07 trained at a constant loss. Above the ceiling the positions are
# under 1% of what the encoder sees.
TOKEN_RMS_FLOOR = 0.2  # warn when no token reaches it
TOKEN_RMS_CEILING = 10.0  # warn when the median token exceeds it
# what anymodal passes to every factory of a kind (core/build.py); the config gives the rest
ALWAYS_PASSED = {"tokenizer": ("dim",), "dataset": ("split",), "objective": ("dim", "tokenizer"), "teacher": ("student",)}


# ---- where in a plugin's code an exception was raised ---------------------------------------------


def plugin_home(module: str) -> tuple[str, ...]:
    """The folders (package) or file (module) of the top-level package ``module`` belongs to; () if unknown."""
    top = module.partition(".")[0]
    if not top:
        return ()
    loaded = sys.modules.get(top)
    spec = getattr(loaded, "__spec__", None) if loaded is not None else importlib.util.find_spec(top)
    if spec is None:
        return ()
    places = list(spec.submodule_search_locations or ()) or ([spec.origin] if spec.origin else [])
    return tuple(os.path.abspath(p) for p in places)


def _inside(filename: str, home: Sequence[str]) -> bool:
    path = os.path.abspath(filename)
    return any(path == h or path.startswith(h.rstrip(os.sep) + os.sep) for h in home)


def raised_at(error: BaseException, home: Sequence[str] = (), fallback: bool = True) -> Optional[str]:
    """``file:line`` where ``error`` was raised: the innermost frame inside ``home`` (see `plugin_home`),
    else (with ``fallback``) the innermost frame; a SyntaxError's own file and line."""
    if isinstance(error, SyntaxError) and error.filename and error.lineno:
        return f"{error.filename}:{error.lineno}"
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if _inside(frame.filename, home):
            return f"{frame.filename}:{frame.lineno}"
    if fallback and frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}"
    return None


def describe_failure(error: BaseException, home: Sequence[str] = (), fallback: bool = True) -> str:
    """``"<type>: <message> (at <file>:<line>)"`` for an exception raised in a plugin's code."""
    where = raised_at(error, home, fallback)
    return f"{type(error).__name__}: {error}" + (f" (at {where})" if where else "")


# ---- factories -----------------------------------------------------------------------------------


def factory_problems(kind: str, factory: Callable[..., Any]) -> list[str]:
    """The arguments anymodal always passes to a ``kind`` factory (`ALWAYS_PASSED`) that it cannot take."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (a C callable): checked when it is built
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    takes = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [arg for arg in ALWAYS_PASSED.get(kind, ()) if arg not in takes]
    if not missing:
        return []
    return [f"does not take {', '.join(map(repr, missing))}, which anymodal passes to every {kind} factory "
            f"(anymodal.plugins.hookspecs.register_{kind}s); its signature is {inspect.signature(factory)}"]


# ---- tokenizers ----------------------------------------------------------------------------------


@dataclass
class TokenizerCheck:
    """What the load-time check found: broken rules (the plugin is refused) and notes (logged as warnings)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _sample_batch(factory: Callable[..., Any]) -> Mapping[str, Any]:
    batch = factory.example_input(CHECK_BATCH)
    if isinstance(batch, Mapping):
        return batch
    return collate(list(batch))


def _attribute_problems(tok: Any) -> list[str]:
    problems = []
    for attr in ("input_key", "dim", "pos_axes"):
        if not hasattr(tok, attr):
            problems.append(f"it has no attribute {attr!r}")
    if getattr(tok, "dim", CHECK_DIM) != CHECK_DIM:
        problems.append(f"built with dim={CHECK_DIM} it has dim={tok.dim}")
    grid = getattr(tok, "grid_size", None)
    if grid is not None and not (isinstance(grid, tuple) and all(isinstance(g, int) and g > 0 for g in grid)):
        problems.append(f"grid_size is {grid!r}; expected a tuple of positive ints or None")
    return problems


def _dtype_problems(tok: Any) -> list[str]:
    """Parameters in another floating dtype than the rest of the model (torch's default at build time)."""
    model = torch.get_default_dtype()
    if not isinstance(tok, torch.nn.Module):
        return []
    other = [(n, p.dtype) for n, p in tok.named_parameters() if p.is_floating_point() and p.dtype != model]
    if not other:
        return []
    more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
    return [f"parameter {other[0][0]!r} is {other[0][1]}, expected {model} like the rest of the model{more}"]


def _x_problems(tok: Any, x: torch.Tensor, b: int) -> list[str]:
    model = torch.get_default_dtype()
    if x.dim() != 3 or x.shape[0] != b or x.shape[2] != CHECK_DIM:
        return [f"Tokens.x has shape {tuple(x.shape)}, expected [B={b}, N, dim={CHECK_DIM}]"]
    if x.dtype != model:  # the encoder adds positions and normalizes in the parameters' dtype
        return [f"Tokens.x has dtype {x.dtype}, expected {model}, the dtype of the model's parameters "
                f"(torch's default dtype; the encoder's LayerNorm takes no other)"]
    if not bool(torch.isfinite(x).all()):
        return ["Tokens.x has NaN or infinite values"]
    if any(p.requires_grad for p in tok.parameters()) and not x.requires_grad:
        return ["Tokens.x does not depend on the tokenizer's parameters (no gradient reaches them)"]
    return []


def _tokens_problems(tok: Any, out: Any, b: int) -> list[str]:
    if not isinstance(out, Tokens):
        return [f"forward returned {type(out).__name__}, expected anymodal.core.tokens.Tokens"]
    x, pos, padding, targets = out.x, out.pos, out.padding, out.targets
    problems = _x_problems(tok, x, b)
    axes = getattr(tok, "pos_axes", None)
    if pos.dim() != 3 or pos.shape[2] != axes:
        problems.append(f"Tokens.pos has shape {tuple(pos.shape)}, expected [B, N, pos_axes={axes}]")
    grid = getattr(tok, "grid_size", None)
    if grid is not None and pos.dim() == 3 and pos.shape[2] == len(grid):
        if pos.is_floating_point():
            problems.append(f"Tokens.pos is {pos.dtype}; with grid_size {grid} positions are integer grid coordinates")
        elif bool((pos < 0).any()) or bool((pos >= torch.tensor(grid, device=pos.device)).any()):
            problems.append(f"Tokens.pos has coordinates outside grid_size {grid}")
    if padding is not None and (padding.dtype != torch.bool or padding.shape != x.shape[:2]):
        problems.append(f"Tokens.padding is {padding.dtype} {tuple(padding.shape)}, expected bool [B, N] or None")
    if hasattr(tok, "target_dim"):
        want = (*x.shape[:2], tok.target_dim)
        if targets is None or tuple(targets.shape) != want:
            got = None if targets is None else tuple(targets.shape)
            problems.append(f"Tokens.targets is {got}, expected [B, N, target_dim] = {want} (the tokenizer has target_dim)")
        elif hasattr(tok, "reconstruction_loss"):
            loss = tok.reconstruction_loss(targets, targets)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                problems.append(f"reconstruction_loss returned {getattr(loss, 'shape', type(loss).__name__)}, expected a scalar tensor")
    return problems


def token_scale_note(tokens: Tokens) -> Optional[str]:
    """A warning when the real tokens' scale is far from the positional encoding's, else None.

    Measures each real token's RMS over its channels: if even the largest is under
    `TOKEN_RMS_FLOOR` the encoder sees mostly positions; if the median is over `TOKEN_RMS_CEILING`
    it hardly sees them. Sparse grids (most cells one learned "empty" embedding) pass on the
    tokens that carry data.
    """
    x = tokens.x.detach()[tokens.valid()]
    if x.numel() == 0:
        return None
    rms = x.float().pow(2).mean(-1).sqrt()
    largest, median = float(rms.max()), float(rms.median())
    measured = (f"on the example input its largest token has RMS {largest:.3f} (median {median:.3f}), "
                f"the sin-cos positional encoding has RMS {SINCOS_RMS:.2f}")
    if largest < TOKEN_RMS_FLOOR:
        return (f"its tokens are small next to the positional encoding the encoder adds to them: {measured}; "
                f"with no token above {TOKEN_RMS_FLOOR} the encoder sees mostly positions and may train at a "
                f"constant loss: scale the embeddings to an RMS of order 0.2-1 (a default-initialized "
                f"nn.Linear or nn.Conv2d on inputs of about unit scale gives 0.2-0.5)")
    if median > TOKEN_RMS_CEILING:
        return (f"its tokens are large next to the positional encoding the encoder adds to them: {measured}; "
                f"above {TOKEN_RMS_CEILING} the positions are lost: normalize the inputs to about unit scale")
    return None


def _run_tokenizer(factory: Callable[..., Any], home: Sequence[str]) -> tuple[Any, Any, int] | str:
    """Build the tokenizer and run it on the example batch: (tokenizer, output, batch size) or the problem."""
    try:
        tok = factory(dim=CHECK_DIM)
    except Exception as e:  # any failure is the plugin's; say what and where
        return f"building it as factory(dim={CHECK_DIM}) raised {describe_failure(e, home)}"
    problems = _attribute_problems(tok) + _dtype_problems(tok)
    if problems:
        return "; ".join(problems)
    try:
        batch = _sample_batch(factory)
    except Exception as e:
        return f"example_input({CHECK_BATCH}) raised {describe_failure(e, home)}"
    key = tok.input_key
    if key not in batch:
        return f"example_input gave a batch without its input_key {key!r} (fields: {', '.join(sorted(batch))})"
    padding = batch.get(f"{key}_padding")
    try:
        out = tok(batch[key]) if padding is None else tok(batch[key], padding=padding)
    except Exception as e:
        how = "tokenizer(x, padding=...)" if padding is not None else "tokenizer(x)"
        return f"{how} on example_input({CHECK_BATCH}) raised {describe_failure(e, home)}"
    return tok, out, batch[key].shape[0]


def check_tokenizer(factory: Callable[..., Any]) -> TokenizerCheck:
    """What ``factory``'s tokenizer does against the contract; no problems when it keeps it.

    The tokenizer is built as ``factory(dim=CHECK_DIM)`` (its other arguments at their defaults)
    and run on ``factory.example_input(CHECK_BATCH)``, called with ``padding=`` when the batch has
    ``<input_key>_padding``, as `anymodal.core.backbone.Backbone.tokenize` calls it. An exception
    is reported with the file and line in the plugin's code where it was raised; a token scale far
    from the positional encoding's is a note (`token_scale_note`), not a problem.
    """
    if not callable(getattr(factory, "example_input", None)):
        return TokenizerCheck(["its factory has no example_input(batch_size) giving a sample batch to check it on"])
    ran = _run_tokenizer(factory, plugin_home(getattr(factory, "__module__", None) or ""))
    if isinstance(ran, str):
        return TokenizerCheck([ran])
    tok, out, b = ran
    problems = _tokens_problems(tok, out, b)
    note = None if problems else token_scale_note(out)
    return TokenizerCheck(problems, [note] if note else [])
