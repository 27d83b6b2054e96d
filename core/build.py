"""Build components from a validated config: one place that turns names into modules.

A node is ``{name: <registered>, <kwargs>}``. Nodes nested in another component's section are
built here too, where that component's factory declares them in a ``components`` attribute: dotted
key in its section -> registry kind (the contrastive objective's
``{"text.tokenizer": "tokenizer", "other_tokenizer": "tokenizer"}``); the factory then gets the
built module in the node's place. A nested node whose factory takes ``dim`` gets, unless it sets
one, the ``dim`` of the mapping that holds it (``text.dim`` for ``text.tokenizer``), else the width
its holder is built at (an objective's: the encoder width).

Nested components are constructed before their holder, without drawing from the run's random
stream; their initial weights are drawn where the holder calls `init_component` on them (so its
own weights and theirs come in the holder's order, the same whatever is nested), or else right
after the holder's factory returns.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from .backbone import Backbone, SensorInput
from .checkpoint import load_checkpoint, load_model_state
from .config import objective_nodes
from .encoder import Encoder
from .mix import MixDataset
from .posenc import build_posenc
from .registry import nested_components
from .runfolder import RunFolder
from .schema import model_shape as encoder_shape  # (width, depth, heads) after the size's defaults

__all__ = ["encoder_shape", "build_backbone", "build_dataset", "build_transforms", "build_sensor_transforms", "build_masker", "build_objectives",
           "build_teacher", "stage_objectives", "nested_components", "init_component"]

# a nested component -> how to construct it again, until `init_component` draws its initial weights
_UNINITIALIZED: "weakref.WeakKeyDictionary[nn.Module, Callable[[], nn.Module]]" = weakref.WeakKeyDictionary()


def _plain(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _split_name(node: Any) -> tuple[str, dict]:
    kwargs = _plain(node)
    return kwargs.pop("name"), kwargs


def init_component(module: Any) -> Any:
    """Draw the initial weights of a nested component here, from the run's random stream, and return
    it. The builder constructed it without drawing; constructing it again now gives the weights it
    would have had if its holder had built it at this point. Anything else is returned as it is."""
    construct = _UNINITIALIZED.pop(module, None) if isinstance(module, nn.Module) else None
    if construct is not None:
        module.load_state_dict(construct().state_dict())
    return module


def _build_node(node: Any, kind: str, key: str, width: int, components: Any) -> Any:
    """Nested node ``key`` (``{name, **kwargs}``) built from the ``kind`` registry, its own nested nodes first."""
    registry = components.registries.get(kind)
    if registry is None:
        raise TypeError(f"{key}: its holder declares a nested component of kind {kind!r}; kinds: "
                        f"{', '.join(components.registries)}")
    if not isinstance(node, Mapping) or "name" not in node:
        raise ValueError(f"{key} must be a mapping with a 'name' naming a registered {kind}, got {node!r}")
    kwargs = dict(node)
    name = kwargs.pop("name")
    factory = registry.entry(name).factory
    if "dim" in inspect.signature(factory).parameters:
        kwargs.setdefault("dim", width)
    kwargs, nested = _build_nested(factory, kwargs, key, kwargs.get("dim", width), components)
    module = registry.build(name, **kwargs)
    for inner in nested:
        init_component(inner)
    return module


def _holder(kwargs: dict, parents: list[str], width: int) -> tuple[Optional[dict], int]:
    """The mapping at ``parents`` inside ``kwargs`` (copied on the way, so the caller's stays as it
    was) and the width a node there is built at; (None, width) where the path has no mapping."""
    holder = kwargs
    for part in parents:
        if not isinstance(holder.get(part), Mapping):
            return None, width
        holder[part] = dict(holder[part])
        holder = holder[part]
        width = holder.get("dim", width)
    return holder, width


def _build_nested(factory: Callable[..., Any], kwargs: dict, key: str, width: int, components: Any) -> tuple[dict, list]:
    """``kwargs`` with the nested nodes ``factory`` declares built in their place, and the modules built."""
    built = []
    for path, kind in nested_components(factory).items():
        *parents, leaf = path.split(".")
        holder, at = _holder(kwargs, parents, width)
        if holder is None or holder.get(leaf) is None:
            continue

        def construct(node: Any = holder[leaf], kind: str = kind, at: int = at, where: str = f"{key}.{path}") -> Any:
            return _build_node(node, kind, where, at, components)

        with torch.random.fork_rng(devices=[]):  # the run's stream is drawn from in init_component
            module = construct()
        if isinstance(module, nn.Module):
            _UNINITIALIZED[module] = construct
        holder[leaf] = module
        built.append(module)
    return kwargs, built


def build_backbone(cfg: DictConfig, components: Any) -> Backbone:
    """The student: ``modality.tokenizer`` and the encoder, then each of ``modality.sensors``' tokenizers
    with a positional encoding of its own, and its own encoder with ``model.sensor_encoders: separate``
    (built in that order, so one-sensor weights never change)."""
    dim, depth, heads = encoder_shape(cfg.model)

    def tokenizer_and_posenc(node: Any) -> tuple[nn.Module, nn.Module]:
        name, kwargs = _split_name(node)
        tokenizer = components.tokenizer.build(name, dim=dim, **kwargs)
        return tokenizer, build_posenc(cfg.model.posenc, dim, tokenizer.pos_axes, getattr(tokenizer, "grid_size", None))

    def encoder_of(posenc: nn.Module) -> Encoder:
        return Encoder(dim, depth, heads, posenc, mlp_ratio=cfg.model.mlp_ratio, drop_path=cfg.model.drop_path,
                       attn_backend=cfg.model.attn_backend, cls_token=cfg.model.cls_token,
                       grad_checkpointing=cfg.model.grad_checkpointing)

    tokenizer, posenc = tokenizer_and_posenc(cfg.modality.tokenizer)
    encoder = encoder_of(posenc)
    others = {}
    for sensor, node in cfg.modality.sensors.items():
        if sensor != cfg.modality.sensor:
            other_tokenizer, other_posenc = tokenizer_and_posenc(node.tokenizer)
            own = encoder_of(other_posenc) if cfg.model.sensor_encoders == "separate" else None
            others[sensor] = SensorInput(other_tokenizer, other_posenc, own)
    return Backbone(tokenizer, encoder, pool=cfg.model.pool, sensor=cfg.modality.sensor or None, others=others)


def build_dataset(cfg: DictConfig, split: str, components: Any) -> Dataset:
    """The dataset of ``data.<split>`` (``data.mix``'s sources, weighted, in place of ``train`` when
    given); ``data.strict`` reaches factories that take ``strict``."""
    if split == "train" and cfg.data.get("mix"):
        sources, weights = [], []
        for i, node in enumerate(cfg.data.mix):
            kwargs = _plain(node)
            weights.append(kwargs.pop("weight"))
            label = str(kwargs.pop("label", None) or f"{kwargs['name']}{i}")
            sources.append((label, _dataset(kwargs, split, cfg, components)))
        return MixDataset(sources, weights)
    node = cfg.data[split]
    if not node:
        raise ValueError(f"config has no data.{split} dataset")
    return _dataset(_plain(node), split, cfg, components)


def _dataset(kwargs: dict, split: str, cfg: DictConfig, components: Any) -> Dataset:
    name = kwargs.pop("name")
    kwargs.setdefault("split", split)
    entry = components.dataset.entry(name)
    if "strict" in inspect.signature(entry.factory).parameters:
        kwargs.setdefault("strict", cfg.data.strict)
    return components.dataset.build(name, **kwargs)


def build_transforms(cfg: DictConfig, components: Any, sensor: Optional[str] = None) -> list:
    """``data.transforms``, then ``sensor``'s own ``modality.sensors.<sensor>.transforms``: those of
    the field a stage trains on."""
    own = (cfg.modality.sensors[sensor].get("transforms") or []) if sensor in cfg.modality.sensors else []
    return [_transform(node, components) for node in [*cfg.data.transforms, *own]]


def build_sensor_transforms(cfg: DictConfig, components: Any, skip: Optional[str] = None) -> dict[str, list]:
    """Each scene sensor's own transforms (``modality.sensors.<sensor>.transforms``) but ``skip``'s."""
    return {sensor: [_transform(t, components) for t in node.get("transforms") or []]
            for sensor, node in cfg.modality.sensors.items() if sensor != skip}


def _transform(node: Any, components: Any) -> Any:
    name, kwargs = _split_name(node)
    return components.transform.build(name, **kwargs)


def build_masker(stage: Any, components: Any) -> Any:
    if not stage.masker:
        return None
    name, kwargs = _split_name(stage.masker)
    return components.masker.build(name, **kwargs)


def build_teacher(stage: Any, components: Any, student: Backbone, folder: Any) -> Optional[nn.Module]:
    """The stage's teacher (frozen or EMA), or None when the stage names none."""
    if not stage.teacher:
        return None
    name, kwargs = _split_name(stage.teacher)
    if "folder" in inspect.signature(components.teacher.entry(name).factory).parameters:
        kwargs["folder"] = folder
    return components.teacher.build(name, student=student, **kwargs)


def build_objectives(stage: Any, components: Any, backbone: Backbone,
                     teacher: Optional[nn.Module] = None) -> tuple[nn.ModuleDict, dict[str, float]]:
    """The stage's objectives (label -> module) and their loss weights.

    Factories get ``dim`` and ``tokenizer`` (the student's, of the stage's sensor), ``sensor`` (the
    stage's) and ``teacher_dim`` when they take it, and
    the nested components they declare built (`nested_components`).

    Raises:
        ValueError: an objective needs a masker or a teacher that the stage does not give.
    """
    modules, weights = nn.ModuleDict(), {}
    for label, node, weight in objective_nodes(stage):
        name = node.pop("name")
        factory = components.objective.entry(name).factory
        if getattr(factory, "needs_mask", False) and not stage.masker:
            raise ValueError(f"objective {label!r} ({name}) needs a masker: set the stage's `masker:`")
        if getattr(factory, "needs_teacher", False) and teacher is None:
            raise ValueError(f"objective {label!r} ({name}) needs a teacher: set the stage's `teacher:` (ema, stage, timm)")
        if "teacher_dim" in inspect.signature(factory).parameters:
            node.setdefault("teacher_dim", getattr(teacher, "dim", None))
        if "sensor" in inspect.signature(factory).parameters:
            node.setdefault("sensor", getattr(stage, "sensor", None) or backbone.sensor)
        dim = backbone.encoder.dim
        node, nested = _build_nested(factory, node, f"objectives.{label}", dim, components)
        modules[label] = components.objective.build(name, dim=dim, tokenizer=backbone.tokenizer_of(getattr(stage, "sensor", None)), **node)
        for module in nested:  # those the objective did not initialize itself
            init_component(module)
        weights[label] = weight
    return modules, weights


def stage_objectives(folder: RunFolder, components: Any, backbone: Backbone, name: str, stage: Any) -> Optional[nn.ModuleDict]:
    """A finished stage's objectives with their trained weights (heads, decoders, text towers)."""
    final = folder.final(name)
    if not final.is_file():
        return None
    teacher = build_teacher(stage, components, backbone, folder)
    objectives, _ = build_objectives(stage, components, backbone, teacher)
    load_model_state(objectives, load_checkpoint(final)["objectives"], f"{final} (objectives)")
    return objectives.to(next(backbone.parameters()).device).eval()
