"""Check a plugin's tokenizer against the ``register_tokenizers`` contract (``hookspecs.py``) on a
sample batch, so a broken tokenizer is reported at load time with what was wrong, not deep in a run."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..core.data import collate
from ..core.tokens import Tokens

__all__ = ["tokenizer_problems", "CHECK_DIM", "CHECK_BATCH"]

CHECK_DIM = 16  # the encoder width the tokenizer is built with for the check
CHECK_BATCH = 2  # samples in the check's batch


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


def _tokens_problems(tok: Any, out: Any, b: int) -> list[str]:
    if not isinstance(out, Tokens):
        return [f"forward returned {type(out).__name__}, expected anymodal.core.tokens.Tokens"]
    problems = []
    x, pos, padding, targets = out.x, out.pos, out.padding, out.targets
    if x.dim() != 3 or x.shape[0] != b or x.shape[2] != CHECK_DIM:
        problems.append(f"Tokens.x has shape {tuple(x.shape)}, expected [B={b}, N, dim={CHECK_DIM}]")
    elif not x.is_floating_point():
        problems.append(f"Tokens.x has dtype {x.dtype}, expected floating point")
    elif not bool(torch.isfinite(x).all()):
        problems.append("Tokens.x has NaN or infinite values")
    elif any(p.requires_grad for p in tok.parameters()) and not x.requires_grad:
        problems.append("Tokens.x does not depend on the tokenizer's parameters (no gradient reaches them)")
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


def tokenizer_problems(factory: Callable[..., Any]) -> list[str]:
    """What ``factory``'s tokenizer does against the contract; empty when it keeps it.

    The tokenizer is built as ``factory(dim=CHECK_DIM)`` (its other arguments at their defaults)
    and run on ``factory.example_input(CHECK_BATCH)``, called with ``padding=`` when the batch has
    ``<input_key>_padding``, as `anymodal.core.backbone.Backbone.tokenize` calls it.
    """
    if not callable(getattr(factory, "example_input", None)):
        return ["its factory has no example_input(batch_size) giving a sample batch to check it on"]
    try:
        tok = factory(dim=CHECK_DIM)
    except Exception as e:  # any failure is the plugin's; say what it was
        return [f"building it as factory(dim={CHECK_DIM}) raised {type(e).__name__}: {e}"]
    problems = _attribute_problems(tok)
    if problems:
        return problems
    try:
        batch = _sample_batch(factory)
    except Exception as e:
        return [f"example_input({CHECK_BATCH}) raised {type(e).__name__}: {e}"]
    key = tok.input_key
    if key not in batch:
        return [f"example_input gave a batch without its input_key {key!r} (fields: {', '.join(sorted(batch))})"]
    padding = batch.get(f"{key}_padding")
    try:
        out = tok(batch[key]) if padding is None else tok(batch[key], padding=padding)
    except Exception as e:
        how = "tokenizer(x, padding=...)" if padding is not None else "tokenizer(x)"
        return [f"{how} on example_input({CHECK_BATCH}) raised {type(e).__name__}: {e}"]
    return _tokens_problems(tok, out, batch[key].shape[0])
