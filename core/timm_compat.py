"""Use timm without torchvision, and load timm ViT weights into an anymodal `Backbone`.

Why this module exists
----------------------
timm's models need only torch, but ``import timm`` imports torchvision:

* ``timm.layers`` (``create_norm``, ``norm_act``) does ``from torchvision.ops.misc import
  FrozenBatchNorm2d``, the one torchvision *code* a timm model can use;
* ``timm.data`` (imported by ``timm.models`` for its constants) imports
  ``torchvision.transforms`` (and subclasses ``transforms.ToTensor``, reads
  ``InterpolationMode`` members) and ``torchvision.datasets`` at module level; these are only
  *called* by timm's data pipelines, which anymodal does not use.

PyPI's torchvision wheels for x86_64 Linux are built against the CUDA torch wheel, so on a
machine with the CPU-only torch (``--index-url .../whl/cpu``) ``pip install timm`` either pulls a
second, CUDA torch or leaves a torchvision that fails to import (``RuntimeError: operator
torchvision::nms does not exist``, or an ``OSError`` loading its C extension). That is why
anymodal installs timm with ``pip install --no-deps timm`` and why `import_timm` falls back to a
stand-in torchvision when the real one is missing or broken:

* ``torchvision.ops.misc.FrozenBatchNorm2d`` is a real, correct module (same buffers, state-dict
  keys and arithmetic as torchvision's);
* ``torchvision.transforms.InterpolationMode`` (and ``transforms.functional.InterpolationMode``)
  is a real enum with torchvision's members, because timm builds lookup tables from it at import;
* every other name timm asks of the stand-in (``transforms.ToTensor``, ``datasets.CIFAR10``, ...)
  is a placeholder class that raises an ``ImportError`` naming the missing torchvision as soon as it
  is called or instantiated, so a data pipeline that needs the real torchvision fails loudly
  instead of silently misbehaving.

The stand-in stays in ``sys.modules`` for the life of the process (timm's own lazy imports, for
example ``timm.utils``, need it); its modules carry ``__anymodal_stub__ = True``.
"""

from __future__ import annotations

import enum
import importlib
import importlib.machinery
import logging
import os
import sys
import traceback
import types
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .checkpoint import load_model_state

__all__ = ["import_timm", "FrozenBatchNorm2d", "backbone_state_from_timm_vit", "load_timm_vit", "timm_vit_from_backbone"]

log = logging.getLogger(__name__)

_NO_DEPS_HINT = (
    "install it with `pip install --no-deps timm` (plus its light dependencies: "
    "`pip install pyyaml huggingface_hub safetensors`). --no-deps matters on CPU-only machines: "
    "timm requires torchvision, and PyPI's x86_64 torchvision wheels require the CUDA build of torch, "
    "so a plain `pip install timm` replaces the CPU torch or leaves a torchvision that cannot be "
    "imported; anymodal supplies the one torchvision class timm's models need (see "
    "anymodal.core.timm_compat)"
)
_TIMM_DEPS = {"yaml": "pyyaml", "huggingface_hub": "huggingface_hub", "safetensors": "safetensors"}
_warned = False


# --------------------------------------------------------------------------------------------
# the torchvision stand-in


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (torchvision's ``ops.misc`` class).

    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` and attribute ``eps``;
    ``forward`` is ``(x - mean) / sqrt(var + eps) * weight + bias`` per channel. A
    ``num_batches_tracked`` entry in a loaded state dict is dropped, as torchvision does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


class InterpolationMode(enum.Enum):
    """torchvision's ``transforms.InterpolationMode`` (same members and values)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Unavailable:
    """Base of the stand-in's placeholders: subclassable, but creating or calling one raises."""

    _qualname = "torchvision"

    def __new__(cls, *args: Any, **kwargs: Any):
        name = next((c._qualname for c in cls.__mro__ if "_qualname" in c.__dict__), "torchvision")
        raise ImportError(f"{name} needs torchvision, which is not installed or cannot be imported here "
                          "(anymodal put a stand-in in its place so that timm's models import; "
                          "see anymodal.core.timm_compat). Install a torchvision that matches your torch "
                          "to use timm's data pipelines.")


class _StubModule(types.ModuleType):
    """A stand-in torchvision module: explicit attributes, else a placeholder per public name."""

    __anymodal_stub__ = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"module {self.__name__!r} (anymodal's torchvision stand-in) has no attribute {name!r}")
        placeholder = type(name, (_Unavailable,), {"_qualname": f"{self.__name__}.{name}", "__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


def _stub_module(name: str, package: bool) -> _StubModule:
    module = _StubModule(name, "anymodal's stand-in for torchvision (see anymodal.core.timm_compat)")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, origin="anymodal-stub", is_package=package)
    if package:
        # an empty search path: `import torchvision.<anything not stubbed>` is a ModuleNotFoundError,
        # which callers such as timm's optional imports already handle
        module.__path__ = []
    return module


def _install_torchvision_stub() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # a half-imported, broken torchvision
    tv = _stub_module("torchvision", package=True)
    ops = _stub_module("torchvision.ops", package=True)
    misc = _stub_module("torchvision.ops.misc", package=False)
    transforms = _stub_module("torchvision.transforms", package=True)
    functional = _stub_module("torchvision.transforms.functional", package=False)
    datasets = _stub_module("torchvision.datasets", package=False)
    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    functional.InterpolationMode = transforms.InterpolationMode = InterpolationMode
    tv.ops, ops.misc = ops, misc
    tv.transforms, transforms.functional = transforms, functional
    tv.datasets = datasets
    for module in (tv, ops, misc, transforms, functional, datasets):
        sys.modules[module.__name__] = module


def _torchvision_failed(err: BaseException) -> bool:
    """Did ``import timm`` fail because torchvision is missing or cannot be imported?"""
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "torchvision":
        return True
    if not isinstance(err, (ImportError, RuntimeError, OSError)):
        return False
    marker = f"{os.sep}torchvision{os.sep}"
    return any(marker in frame.filename for frame in traceback.extract_tb(err.__traceback__))


def import_timm() -> types.ModuleType:
    """``import timm``, standing in for torchvision when it is missing or broken (see module docs).

    Raises:
        ImportError: timm (or one of its small dependencies) is not installed; the message says how
            to install it on a CPU-only machine.
    """
    global _warned
    try:
        import timm
        return timm
    except ModuleNotFoundError as err:
        if err.name == "timm":
            raise ImportError(f"this feature needs timm, which is not installed: {_NO_DEPS_HINT}") from err
        if err.name in _TIMM_DEPS:
            raise ImportError(f"timm needs {_TIMM_DEPS[err.name]}, which is not installed "
                              f"(`pip install {_TIMM_DEPS[err.name]}`); timm itself is best installed "
                              f"with --no-deps: {_NO_DEPS_HINT}") from err
        if not _torchvision_failed(err):
            raise
        cause: BaseException = err
    except (ImportError, RuntimeError, OSError) as err:
        if not _torchvision_failed(err):
            raise
        cause = err
    # a failed import leaves timm's already-imported submodules behind; start clean
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        del sys.modules[name]
    _install_torchvision_stub()
    if not _warned:
        _warned = True
        log.warning("torchvision is unavailable (%s: %s); importing timm with anymodal's stand-in, which "
                    "provides FrozenBatchNorm2d. timm's models work; its torchvision-based data "
                    "transforms and datasets do not.", type(cause).__name__, cause)
    try:
        import timm
    except Exception as err:
        raise ImportError(f"timm failed to import even with anymodal's torchvision stand-in: "
                          f"{type(err).__name__}: {err}") from err
    return timm


# --------------------------------------------------------------------------------------------
# timm VisionTransformer weights -> anymodal Backbone

# per-block parameters with the same names in timm's Block and ours (core.layers.Block)
_BLOCK_KEYS = frozenset(f"{module}.{p}" for module in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                        for p in ("weight", "bias"))
# timm's classifier side; not part of the backbone
_HEAD_PREFIXES = ("head.", "head_drop.", "fc_norm.", "attn_pool.")


def backbone_state_from_timm_vit(state: Mapping[str, Tensor], num_patches: Optional[int] = None,
                                 unmapped: Optional[list[str]] = None) -> dict[str, Tensor]:
    """Convert a timm ``VisionTransformer`` state dict to an anymodal `Backbone`'s.

    The backbone is ``Backbone(ImagePatchTokenizer(dim, image_size, patch_size, channels),
    Encoder(dim, depth, heads, posenc=LearnedPosEnc(dim, grid_size), cls_token=...))`` with the
    timm model's width, depth, heads, patch size and grid. Renames: ``patch_embed.proj.*`` ->
    ``tokenizer.proj.*``; ``cls_token`` -> ``encoder.cls_token``; ``pos_embed[:, :1]`` (the class
    token's position) -> ``encoder.cls_pos``; the patches' ``pos_embed[0, 1:]`` ->
    ``encoder.posenc.table`` (both row-major over the patch grid); ``blocks.*`` ->
    ``encoder.blocks.*``; ``norm.*`` -> ``encoder.norm.*``. Classifier keys (``head``,
    ``fc_norm``, ``attn_pool``) are dropped. A model without a class token maps ``pos_embed[0]``
    to the table.

    Args:
        state: the timm model's ``state_dict()``.
        num_patches: the backbone's patch count, if known; when ``pos_embed`` has exactly this many
            rows besides a class token (timm's ``no_embed_class=True``), the class token gets a zero
            position, which is what timm computes.
        unmapped: a list to collect the keys with no counterpart in (classifier keys included)
            instead of raising for them: what `model.init` loads only what fits with.

    Raises:
        ValueError: keys with no anymodal counterpart (register tokens, layer scale ``ls1.gamma``,
            qk-norm, ``norm_pre``, ...), all listed; or a model whose final norm is ``fc_norm``
            (after pooling) instead of ``norm`` (per token).
    """
    strict = unmapped is None
    if strict and "norm.weight" not in state and "fc_norm.weight" in state:
        raise ValueError("this timm ViT has no final per-token norm: it normalizes after pooling (fc_norm, the default "
                         "with global_pool='avg'), while anymodal's Encoder ends with a LayerNorm on every token; "
                         "use a model created with fc_norm=False (or a class-token model)")
    out: dict[str, Tensor] = {}
    unmapped = [] if unmapped is None else unmapped
    has_cls = "cls_token" in state
    for key, value in state.items():
        if key.startswith(_HEAD_PREFIXES):
            if not strict:
                unmapped.append(key)
            continue
        if key.startswith("patch_embed.proj."):
            out["tokenizer.proj." + key[len("patch_embed.proj."):]] = value
        elif key == "cls_token":
            out["encoder.cls_token"] = value
        elif key == "pos_embed":
            if value.dim() != 3 or value.shape[0] != 1:
                raise ValueError(f"timm pos_embed has shape {tuple(value.shape)}; expected [1, tokens, dim]")
            if not has_cls:
                out["encoder.posenc.table"] = value[0].detach().clone()
            elif num_patches is not None and value.shape[1] == num_patches:
                out["encoder.cls_pos"] = torch.zeros_like(value[:, :1])
                out["encoder.posenc.table"] = value[0].detach().clone()
            else:
                out["encoder.cls_pos"] = value[:, :1].detach().clone()
                out["encoder.posenc.table"] = value[0, 1:].detach().clone()
        elif key.startswith("blocks."):
            parts = key.split(".", 2)
            if len(parts) == 3 and parts[1].isdigit() and parts[2] in _BLOCK_KEYS:
                out["encoder." + key] = value
            else:
                unmapped.append(key)
        elif key in ("norm.weight", "norm.bias"):
            out["encoder." + key] = value
        else:
            unmapped.append(key)
    if unmapped and strict:
        raise ValueError(
            f"cannot map {len(unmapped)} timm key(s) onto an anymodal Backbone: {', '.join(unmapped)}. "
            "Supported: a plain pre-norm ViT (class token optional, learned pos_embed, patch_embed.proj, "
            "blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm); register tokens, layer "
            "scale (ls1/ls2), qk-norm, norm_pre and patch_embed.norm have no counterpart."
        )
    return out


def load_timm_vit(backbone: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Load a timm ViT state dict into ``backbone`` (strict); returns ``backbone``.

    Raises:
        ValueError: unmappable timm keys (see `backbone_state_from_timm_vit`), or keys missing from /
            unexpected by the backbone, or shape differences, each named.
    """
    table = getattr(getattr(backbone.encoder, "posenc", None), "table", None)
    num_patches = table.shape[0] if isinstance(table, Tensor) else None
    converted = backbone_state_from_timm_vit(state, num_patches=num_patches)
    load_model_state(backbone, converted, "timm ViT weights (build the backbone with the timm model's width, depth, "
                     "patch size, image size, channels and class token)")
    return backbone


# --------------------------------------------------------------------------------------------
# anymodal Backbone -> timm VisionTransformer weights (the inverse of the mapping above)


def timm_vit_from_backbone(backbone: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An image backbone as a timm ``VisionTransformer``: ``(state_dict, create_model kwargs)``.

    ``timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)`` (any ViT name: the
    kwargs set every size) then loads the state dict strictly, and its ``forward_features`` gives
    the backbone's tokens (the class token first when there is one). A fixed (sin-cos) position
    encoding becomes timm's learned ``pos_embed``, evaluated on the patch grid.

    Raises:
        ValueError: a backbone timm has no model for (another tokenizer than image patches, more
            than one sensor), with the reason.
    """
    tokenizer, encoder = backbone.tokenizer, backbone.encoder
    if type(tokenizer).__name__ != "ImagePatchTokenizer" or getattr(backbone, "others", None):
        raise ValueError(f"timm export needs a single-sensor image backbone (ImagePatchTokenizer); this one tokenizes "
                         f"with {type(tokenizer).__name__}{' and more sensors' if getattr(backbone, 'others', None) else ''}"
                         ", for which timm has no model: export it as safetensors, onnx or torch instead")
    with torch.no_grad():
        probe = torch.zeros(1, tokenizer.channels, tokenizer.image_size, tokenizer.image_size,
                            dtype=tokenizer.proj.weight.dtype, device=tokenizer.proj.weight.device)
        tokens = tokenizer(probe)
        table = encoder.posenc(tokens.pos).to(tokens.x.dtype)  # [1, N, D], row-major like timm's patches
    state: dict[str, Tensor] = {}
    for key, value in backbone.state_dict().items():
        if key.startswith("tokenizer.proj."):
            state["patch_embed.proj." + key[len("tokenizer.proj."):]] = value
        elif key.startswith("encoder.blocks.") or key in ("encoder.norm.weight", "encoder.norm.bias"):
            state[key[len("encoder."):]] = value
        elif key == "encoder.cls_token":
            state["cls_token"] = value
    has_cls = encoder.cls_token is not None
    state["pos_embed"] = torch.cat([encoder.cls_pos.detach(), table], 1) if has_cls else table
    state = {k: v.detach().clone().contiguous().cpu() for k, v in state.items()}
    block = encoder.blocks[0]
    kwargs = {"img_size": tokenizer.image_size, "patch_size": tokenizer.patch_size, "in_chans": tokenizer.channels,
              "embed_dim": encoder.dim, "depth": len(encoder.blocks), "num_heads": block.attn.num_heads,
              "mlp_ratio": block.mlp.fc1.out_features / encoder.dim, "class_token": has_cls,
              "global_pool": "token" if backbone.pool_mode == "cls" else "avg", "fc_norm": False, "num_classes": 0}
    return state, kwargs
