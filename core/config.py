"""Compose, validate and save configs.

A config file may start with a ``defaults:`` mapping of group -> name (``model: tiny``); each group
file (``configs/<group>/<name>.yaml``, looked up beside the file first, then in the package) is
merged in order, then the file itself, then command-line overrides: ``group=name`` swaps a group
file, ``a.b.c=value`` sets a key (values parse as YAML). Every key is checked against the schema
(`core.schema`): an unknown key or a value of the wrong type is an error naming the key, the file
it came from and the closest valid keys or the expected type.

Replacing a node whole: layers merge into each other, so a node keeps the keys that earlier layers
gave it (a modality's ``data.train: {name: mnist, split: train}`` under your ``name: image_folder``).
``_replace_: true`` inside a mapping makes that layer's node replace what the layers before it set,
instead of merging into it; a section of the schema (``run``, a stage) restarts from its defaults::

    data:
      train: {_replace_: true, name: image_folder, root: photos}   # no keys from the modality file

On the command line, give the node whole (``'data.train={_replace_: true, name: image_folder,
root: photos}'``) or clear it first and set its keys after (``data.train._replace_=true
data.train.name=image_folder data.train.root=photos``): overrides apply in order, so a
``_replace_`` after the node's other overrides is an error. Lists are always replaced whole.

`validate` then checks, once plugins are loaded, every component node against its registry and
factory signature, every value against the range or choices its schema field declares
(`core.schema.checked`), the model's width against its heads, and builds the tokenizer and each
masker node once (they are cheap; their constructors check their arguments), so a bad mask ratio
is a config error naming ``modality.masker.ratio`` and its file. Component nodes nested in an
objective's section (the contrastive objective's ``text.tokenizer``), where its factory declares
them, are checked against their registries and signatures too. It reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError
from .registry import ArgumentError, closest, nested_components, signature_errors
from .schema import REPLACE, Config, Range, key_errors, model_errors, model_shape, optional_of, rule_errors

__all__ = ["ConfigError", "ComposedConfig", "compose", "validate", "save_config", "load_run_config", "PACKAGE_CONFIGS", "SCRATCH"]

PACKAGE_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "modality", "recipe", "launcher")
COMMAND_LINE = "command line"
SCRATCH = "scratch"  # init_from: scratch restarts a stage from the run's initial random weights


class ConfigError(UserError, ValueError):
    """One or more config problems, each naming the key and where it came from."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid config:\n  - " + "\n  - ".join(errors))


@dataclasses.dataclass
class ComposedConfig:
    cfg: DictConfig
    sources: dict[str, str]  # dotted key -> file it was last set by
    files: list[str]

    def source(self, key: str) -> str:
        """The file that set ``key`` or the closest enclosing key."""
        parts = key.split(".")
        while parts:
            found = self.sources.get(".".join(parts))
            if found:
                return found
            parts.pop()
        return "defaults"


def _resolve_file(name: str, group: Optional[str], search: list[Path]) -> Path:
    candidates = []
    for base in search:
        folder = base / group if group else base
        for n in (name, f"{name}.yaml"):
            candidates.append(folder / n)
    if not group:
        candidates.insert(0, Path(name))
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if group:
        options = sorted({p.stem for base in search for p in (base / group).glob("*.yaml")})
        near = closest(name, options)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError([f"no {group} config named {name!r}{hint} available: {', '.join(options) or '(none)'}"])
    options = sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml"))
    raise ConfigError([f"config file {name!r} not found (looked in the working directory and {PACKAGE_CONFIGS}); "
                       f"packaged configs: {', '.join(options)}"])


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not a YAML text file: byte {e.object[e.start]:#04x} at offset {e.start} "
                           "is not UTF-8"]) from e
    except OSError as e:
        raise ConfigError([f"{path}: cannot be read: {e.strerror}"]) from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}{_yaml_error(e, text)}"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping, got {type(data).__name__}"])
    return data


def _yaml_error(e: yaml.YAMLError, text: str) -> str:
    """", line L, column C: not valid YAML: <what>" for a PyYAML error, in one line."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML forbids: it gives an offset
        line, column = text.count("\n", 0, e.position), e.position - text.rfind("\n", 0, e.position) - 1
        character = chr(e.character) if isinstance(e.character, int) else e.character
        what = f"{e.reason}: {character!r}"
    elif mark is not None:
        line, column = mark.line, mark.column
        what = ": ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None))))
    else:
        return f": not valid YAML: {' '.join(str(e).split())}"
    return f", line {line + 1}, column {column + 1}: not valid YAML: {what}"


def _record(data: Any, prefix: str, source: str, sources: dict[str, str]) -> None:
    if isinstance(data, Mapping):
        for k, v in data.items():
            key = f"{prefix}{k}"
            sources[key] = source
            _record(v, key + ".", source, sources)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError([f"override {text!r} on the command line is not key=value"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _expand_wildcards(data: Any, node: Any) -> Any:
    """A ``"*"`` key applies its value to every key the config already has at that level
    (``recipe.stages.*.steps=20`` shortens every stage); explicit keys beside it win."""
    if not isinstance(data, Mapping):
        return data
    out: dict = {}
    if "*" in data and isinstance(node, DictConfig):
        out = {key: data["*"] for key in node.keys()}
    for key, value in data.items():
        if key == "*":
            continue
        if isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            value = OmegaConf.to_container(OmegaConf.merge(out[key], value))
        out[key] = value
    child = lambda k: node.get(k) if isinstance(node, DictConfig) and k in node else None  # noqa: E731
    return {k: _expand_wildcards(v, child(k)) for k, v in out.items()}


def _check_no_new_stages(data: Mapping, cfg: DictConfig, source: str, recipe_file: str) -> None:
    """Layers after the recipe file may change its stages but not add any: a stage that the chosen
    recipe lacks is a typo or a leftover from another recipe."""
    stages = ((data.get("recipe") or {}).get("stages") or {}) if isinstance(data.get("recipe"), Mapping) else {}
    known = list(cfg.recipe.stages.keys())
    for name in stages:
        if name not in known:
            near = closest(str(name), known)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError([f"recipe.stages.{name} (from {source}) is not a stage of the recipe in {recipe_file}{hint}; "
                               f"stages: {', '.join(known)}"])


def _strip_replace(data: Any, prefix: str = "") -> tuple[Any, list[str]]:
    """``data`` without its ``_replace_`` keys, and the dotted keys of the nodes marked ``_replace_: true``."""
    if not isinstance(data, Mapping):
        return data, []
    found = [prefix[:-1]] if prefix and data.get(REPLACE) is True else []
    out = {}
    for key, value in data.items():
        if key != REPLACE:
            out[key], inner = _strip_replace(value, f"{prefix}{key}.")
            found += inner
    return out, found


def _schema_type(key: str) -> Any:
    """The schema's type of dotted ``key`` (Any inside free-form component nodes)."""
    tp: Any = Config
    for part in key.split("."):
        tp = optional_of(tp)[0]
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return Any
    return optional_of(tp)[0]


def _clear(cfg: DictConfig, key: str, source: str, sources: dict[str, str]) -> None:
    """Reset node ``key`` for a ``_replace_`` layer: a schema section to its defaults, a component node to empty."""
    inside = [k for k in sources if k.startswith(key + ".")]
    earlier = [k for k in inside if sources[k] == COMMAND_LINE]
    if source == COMMAND_LINE and earlier:
        raise ConfigError([f"{key}.{REPLACE}=true on the command line comes after {earlier[0]}=..., which it would "
                           f"discard: put it before the node's other overrides, or give the node whole "
                           f"('{key}={{{REPLACE}: true, ...}}')"])
    for k in inside:
        del sources[k]
    tp = _schema_type(key)
    OmegaConf.update(cfg, key, tp() if dataclasses.is_dataclass(tp) else {}, merge=False)


def plugin_config_dirs() -> list[Path]:
    """The ``configs/`` folders that installed plugins ship beside their module, searched for group
    files after the packaged ones: the image plugin's ``configs/modality/image.yaml`` makes
    ``modality=image`` work, a sensor package's ``radar.yaml`` ``modality=radar``. Found without
    importing the plugins; other packages' none when autoload is disabled."""
    from ..plugins.manager import plugin_entry_points

    found = []
    for ep in plugin_entry_points():
        try:
            spec = importlib.util.find_spec(ep.value.split(":")[0].strip())
        except (ImportError, ValueError):  # a broken plugin: `anymodal doctor` reports it
            continue
        if spec is not None and spec.origin:
            folder = Path(spec.origin).parent / "configs"
            if folder.is_dir():
                found.append(folder)
    return found


def compose(file: str, overrides: Iterable[str] = ()) -> ComposedConfig:
    """Compose ``file`` with its defaults and ``overrides`` into a validated-structure config.

    Raises:
        ConfigError: unknown keys (with the file and the closest valid keys), a missing group file,
            a value of the wrong type, or a malformed override.
    """
    path = _resolve_file(file, None, [PACKAGE_CONFIGS])
    search = [path.parent, PACKAGE_CONFIGS, *plugin_config_dirs()]
    main = _read_yaml(path)
    defaults = main.pop("defaults", None) or {}
    if not isinstance(defaults, Mapping):
        raise ConfigError([f"defaults in {path} must be a mapping of group to name (model: tiny), got {defaults!r}"])
    defaults = dict(defaults)
    overrides = [_parse_override(o) for o in overrides]
    for key, value in overrides:
        if key in GROUPS:
            defaults[key] = value
    layers: list[tuple[str, dict]] = []
    recipe_file = None
    for group, name in defaults.items():
        if group not in GROUPS:
            near = closest(group, list(GROUPS))
            raise ConfigError([f"unknown defaults group {group!r} in {path}" + (f"; did you mean {near[0]!r}?" if near else "")
                               + f"; groups: {', '.join(GROUPS)}"])
        group_file = _resolve_file(str(name), group, search)
        layers.append((str(group_file), _read_yaml(group_file)))
        if group == "recipe":
            recipe_file = str(group_file)
    layers.append((str(path), main))
    value_overrides = [(k, v) for k, v in overrides if k not in GROUPS]
    layers += [(COMMAND_LINE, _nest(k, v)) for k, v in value_overrides]

    errors = [e for source, data in layers for e in key_errors(data, source)]
    if errors:
        raise ConfigError(errors)
    cfg = OmegaConf.structured(Config)
    sources: dict[str, str] = {}
    recipe_merged = False
    for source, data in layers:
        data, replaced = _strip_replace(_expand_wildcards(data, cfg))
        if recipe_merged:
            _check_no_new_stages(data, cfg, source, recipe_file)
        recipe_merged = recipe_merged or source == recipe_file
        for key in replaced:
            _clear(cfg, key, source, sources)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as e:  # the type checks above catch what they can; this names the rest
            message = str(getattr(e, "msg", e)).splitlines()[0]
            raise ConfigError([f"{getattr(e, 'full_key', None) or 'config'} (from {source}): {message}"]) from e
        _record(data, "", source, sources)
    return ComposedConfig(cfg, sources, [s for s, _ in layers])


def _component_errors(node: Any, registry: Any, key: str, src: Callable[[str], str], injected: Iterable[str]) -> list[str]:
    source = src(key)
    if not isinstance(node, Mapping) or "name" not in node:
        return [f"{key} (from {source}) must be a mapping with a 'name' naming a registered {registry.kind}"]
    name = node["name"]
    if name not in registry:
        near = closest(str(name), registry.names())
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return [f"{key}.name: unknown {registry.kind} {name!r} (from {source}){hint}; registered: {', '.join(registry.names())}"]
    factory = registry.entry(name).factory
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in node.items() if k != "name"}
    kwargs.update({k: None for k in injected if k in accepted})  # filled in by the builder
    errors = [f"{key} ({registry.kind} {name!r}, from {source}): {e}" for e in signature_errors(factory, kwargs)]
    inherited = [k for k in kwargs if k not in accepted and src(f"{key}.{k}") != src(f"{key}.name")]
    if errors and inherited and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        errors.append(f"{key}: {', '.join(map(repr, inherited))} came from {src(f'{key}.{inherited[0]}')}, merged under "
                      f"the name from {src(f'{key}.name')}; add `{REPLACE}: true` to the node to replace it whole")
    return errors


def _build_errors(node: Any, registry: Any, key: str, src: Callable[[str], str], **injected: Any) -> list[str]:
    """A node checked against its factory, then built once, so that its constructor checks the values
    (for the cheap components: the modality's tokenizer and the maskers)."""
    errors = _component_errors(node, registry, key, src, injected)
    if errors:
        return errors
    name, kwargs = node["name"], {k: v for k, v in node.items() if k != "name"}
    try:
        registry.build(name, **kwargs, **injected)
    except ArgumentError as e:
        return [f"{key}.{e} (from {src(f'{key}.{e.argument}')})"]
    except (ValueError, TypeError) as e:  # the arguments come straight from the YAML: a bad value or type
        return [f"{key} ({registry.kind} {name!r}, from {src(key)}): {e}"]
    return []


def _nested_errors(factory: Callable[..., Any], node: Mapping, key: str, components: Any,
                   src: Callable[[str], str]) -> list[str]:
    """The component nodes nested in ``node`` that ``factory`` declares (`core.registry.nested_components`),
    each checked against its registry and factory signature (``dim`` is given by the builder), and
    theirs in turn. A declared key that the node does not set is left to the factory's default."""
    errors = []
    for path, kind in nested_components(factory).items():
        inner: Any = node
        for part in path.split("."):
            inner = inner.get(part) if isinstance(inner, Mapping) else None
        if inner is None:
            continue
        where = f"{key}.{path}"
        registry = components.registries.get(kind)
        if registry is None:
            errors.append(f"{where} (from {src(where)}): the factory declares it a {kind!r}, which is no kind of "
                          f"component; kinds: {', '.join(components.registries)}")
            continue
        found = _component_errors(inner, registry, where, src, ["dim"])
        errors += found or _nested_errors(registry.entry(inner["name"]).factory, inner, where, components, src)
    return errors


def _weight_errors(stage: Mapping, prefix: str, src: Callable[[str], str]) -> list[str]:
    """Each objective's loss weight: a number >= 0 (0 switches the objective off)."""
    errors = []
    for label, node in stage["objectives"].items():
        key = f"{prefix}.objectives.{label}.weight"
        problem = Range(0).problem(node.get("weight", 1.0))
        if problem:
            errors.append(f"{key} {problem}, got {node['weight']!r} (from {src(key)})")
    return errors


def objective_nodes(stage: Any) -> list[tuple[str, dict, float]]:
    """(label, node with 'name', weight) for each objective of a stage."""
    out = []
    objectives = stage.objectives
    if isinstance(objectives, DictConfig):
        objectives = OmegaConf.to_container(objectives, resolve=True)
    for label, node in objectives.items():
        node = dict(node)
        weight = float(node.pop("weight", 1.0))
        node.setdefault("name", label)
        out.append((label, node, weight))
    return out


SENSOR_KEYS = ("tokenizer", "masker", "transforms")


def _sensors(modality: Mapping) -> list[str]:
    """The sample fields a config's backbone tokenizes: the first sensor's, then the others."""
    first = modality["sensor"] or modality["tokenizer"].get("input_key") or "(the tokenizer's input field)"
    return [first, *(s for s in modality["sensors"] if s != modality["sensor"])]


def _sensor_errors(modality: Mapping, components: Any, src: Callable[[str], str], dim: Optional[int]) -> list[str]:
    """``modality.sensors``: each a mapping of a tokenizer (and a masker and transforms); ``modality.sensor``
    one of them."""
    sensors = modality["sensors"]
    if not sensors:
        return []
    errors = []
    if modality["sensor"] not in sensors:
        errors.append(f"modality.sensor (from {src('modality.sensor')}) must name one of modality.sensors "
                      f"({', '.join(sensors)}), the sensor modality.tokenizer reads; got {modality['sensor']!r}")
    for sensor, node in sensors.items():
        key = f"modality.sensors.{sensor}"
        if not isinstance(node, Mapping) or not node.get("tokenizer"):
            errors.append(f"{key} (from {src(key)}) must be a mapping with a tokenizer: {{tokenizer: {{name: ...}}}}")
            continue
        errors += [f"unknown key '{key}.{k}' (from {src(key)}); a sensor has {', '.join(SENSOR_KEYS)}"
                   for k in node if k not in SENSOR_KEYS]
        if sensor != modality["sensor"]:  # the first sensor's tokenizer is modality.tokenizer, checked already
            errors += (_component_errors(node["tokenizer"], components.tokenizer, f"{key}.tokenizer", src, ["dim"]) if dim is None
                       else _build_errors(node["tokenizer"], components.tokenizer, f"{key}.tokenizer", src, dim=dim))
        if node.get("masker"):
            errors += _build_errors(node["masker"], components.masker, f"{key}.masker", src)
        transforms = node.get("transforms") or []
        if not isinstance(transforms, list):
            errors.append(f"{key}.transforms (from {src(key)}) must be a list of transforms, got {transforms!r}")
            continue
        for i, t in enumerate(transforms):
            errors += _component_errors(t, components.transform, f"{key}.transforms.{i}", lambda _: src(key), [])
    return errors


def _scene_transform_errors(cfg: Mapping, components: Any, src: Callable[[str], str]) -> list[str]:
    """A scene's calibration describes the geometry as recorded: a transform that moves pixels or
    points (its factory's ``moves_geometry``) would silently break every projection between sensors."""
    if not cfg["modality"]["sensors"]:
        return []
    nodes = [(f"data.transforms.{i}", "data.transforms", t) for i, t in enumerate(cfg["data"]["transforms"])]
    for sensor, node in cfg["modality"]["sensors"].items():
        if isinstance(node, Mapping) and isinstance(node.get("transforms"), list):
            key = f"modality.sensors.{sensor}"
            nodes += [(f"{key}.transforms.{i}", key, t) for i, t in enumerate(node["transforms"])]
    errors = []
    for key, file_key, node in nodes:
        name = node.get("name") if isinstance(node, Mapping) else None
        if name in components.transform and getattr(components.transform.entry(name).factory, "moves_geometry", False):
            errors.append(f"{key} ({name}, from {src(file_key)}) moves pixels or points, which the scene's calibration "
                          f"would then no longer describe; a scene sensor takes transforms that keep its geometry "
                          f"(photometric, jitter, dropout)")
    return errors


def _mix_errors(mix: list, components: Any, src: Callable[[str], str]) -> list[str]:
    """``data.mix``: each source a dataset node with a positive ``weight`` (and an optional ``label``)."""
    errors, labels = [], []
    for i, node in enumerate(mix):
        key = f"data.mix.{i}"
        if not isinstance(node, Mapping):
            errors.append(f"{key} (from {src('data.mix')}) must be a mapping: {{weight: W, name: DATASET, ...}}")
            continue
        weight = node.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or weight == float("inf"):
            errors.append(f"{key}.weight (from {src('data.mix')}) must be a positive number, got {weight!r}")
        label = str(node.get("label") or f"{node.get('name')}{i}")
        if label in labels:
            errors.append(f"{key}.label {label!r} (from {src('data.mix')}) names two sources; give each its own label")
        labels.append(label)
        dataset = {k: v for k, v in node.items() if k not in ("weight", "label")}
        errors += _component_errors(dataset, components.dataset, key, lambda _: src("data.mix"), ["split"])
    return errors


def validate(composed: ComposedConfig, components: Any) -> None:
    """Check every value against its schema rule and every component node against its registry and
    factory signature (maskers are built once); report all at once.

    Raises:
        ConfigError: listing every problem found, each naming the key, its file and what is allowed.
    """
    try:
        cfg = OmegaConf.to_container(composed.cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError([f"cannot resolve the config: {e}"]) from e
    src = composed.source
    errors = rule_errors(cfg, src) + model_errors(cfg["model"], src)
    if errors:  # no model width to build the tokenizer with
        errors += _component_errors(cfg["modality"]["tokenizer"], components.tokenizer, "modality.tokenizer", src, ["dim"])
    else:
        errors += _build_errors(cfg["modality"]["tokenizer"], components.tokenizer, "modality.tokenizer", src,
                                dim=model_shape(composed.cfg.model)[0])
    if cfg["modality"]["masker"]:
        errors += _build_errors(cfg["modality"]["masker"], components.masker, "modality.masker", src)
    errors += _sensor_errors(cfg["modality"], components, src, None if errors else model_shape(composed.cfg.model)[0])
    for split in ("train", "test"):
        if cfg["data"][split] and not (split == "train" and cfg["data"]["mix"]):
            errors += _component_errors(cfg["data"][split], components.dataset, f"data.{split}", src, ["split"])
    errors += _mix_errors(cfg["data"]["mix"], components, src)
    for i, node in enumerate(cfg["data"]["transforms"]):
        errors += _component_errors(node, components.transform, f"data.transforms.{i}", lambda _: src("data.transforms"), [])
    errors += _scene_transform_errors(cfg, components, src)
    tokenizer = cfg["modality"]["tokenizer"]
    if not cfg["modality"]["sensor"] and tokenizer.get("name") in components.tokenizer:  # one sensor: its field
        cfg["modality"]["sensor"] = tokenizer.get("input_key") or _default(components.tokenizer.entry(tokenizer["name"]).factory,
                                                                            "input_key") or ""
    if not cfg["recipe"]["stages"]:
        errors.append(f"recipe {cfg['recipe']['name']!r} (from {src('recipe')}) has no stages")
    earlier: list[str] = []
    for stage_name, stage in composed.cfg.recipe.stages.items():
        prefix = f"recipe.stages.{stage_name}"
        resolved_stage = cfg["recipe"]["stages"][stage_name]
        teacher = resolved_stage["teacher"]
        if teacher:
            errors += _component_errors(teacher, components.teacher, f"{prefix}.teacher", src, ["student", "folder"])
        init_from = resolved_stage["init_from"]
        for key, ref in (("init_from", None if init_from == SCRATCH else init_from), ("teacher.stage", (teacher or {}).get("stage"))):
            if ref is not None and ref not in earlier:
                errors.append(f"{prefix}.{key} (from {src(prefix + '.' + key)}) names stage {ref!r}, which is not an "
                              f"earlier stage of this recipe (earlier: {', '.join(earlier) or 'none'}"
                              + (f"; or {SCRATCH!r} for the initial random weights)" if key == "init_from" else ")"))
        if stage_name == SCRATCH:
            errors.append(f"{prefix}: {SCRATCH!r} is reserved for init_from (the initial random weights); rename the stage")
        earlier.append(stage_name)
        # a masker that points at another node (${modality.masker}) is checked there
        if resolved_stage["masker"] and not OmegaConf.is_interpolation(stage, "masker"):
            errors += _build_errors(resolved_stage["masker"], components.masker, f"{prefix}.masker", src)
        errors += _unknown_sensor(f"{prefix}.sensor", resolved_stage["sensor"], cfg["modality"], src)
        batch, parts = resolved_stage["batch_size"] or cfg["data"]["batch_size"], resolved_stage["optim"]["accumulate_steps"]
        if isinstance(batch, int) and isinstance(parts, int) and parts > 0 and batch % parts:
            errors.append(f"{prefix}.optim.accumulate_steps={parts} (from {src(prefix + '.optim.accumulate_steps')}) "
                          f"must divide the batch size {batch} into equal micro-batches")
        if not resolved_stage["objectives"]:
            errors.append(f"{prefix} (from {src(prefix)}) lists no objectives")
        weight_errors = _weight_errors(resolved_stage, prefix, src)
        errors += weight_errors
        for label, node, _ in [] if weight_errors else objective_nodes(OmegaConf.create(resolved_stage)):
            key = f"{prefix}.objectives.{label}"
            errors += _component_errors(node, components.objective, key, src, ["dim", "tokenizer", "sensor"])
            if node["name"] in components.objective:
                factory = components.objective.entry(node["name"]).factory
                errors += _nested_errors(factory, node, key, components, src)
                for arg in getattr(factory, "sensor_args", ()):  # arguments that name another sensor
                    errors += _unknown_sensor(f"{key}.{arg}", node.get(arg, _default(factory, arg)), cfg["modality"], src)
    if errors:
        raise ConfigError(errors)


def _default(factory: Callable[..., Any], arg: str) -> Any:
    parameter = inspect.signature(factory).parameters.get(arg)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _unknown_sensor(key: str, sensor: Optional[str], modality: Mapping, src: Callable[[str], str]) -> list[str]:
    """An error when ``key`` names a sensor the modality does not have (None names none)."""
    sensors = _sensors(modality)
    if sensor is None or sensor in sensors:
        return []
    near = closest(sensor, sensors)
    return [f"{key} (from {src(key)}) names sensor {sensor!r}, which modality {modality['name']!r} does not have "
            f"(sensors: {', '.join(sensors)})" + (f"; did you mean {near[0]!r}?" if near else "")]


def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)


def load_run_config(run_dir: Path) -> DictConfig:
    """The config a run folder's run uses: the saved ``config.yaml``, re-checked against the schema,
    with the changes its resumes recorded (``--allow-changes``) applied in order."""
    from .runfolder import RunFolder

    folder = RunFolder(Path(run_dir))
    path = folder.config
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no config.yaml")
    data = _read_yaml(path)
    errors = key_errors(data, str(path))
    if errors:
        raise ConfigError(errors)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), data)
    for key, value in folder.recorded_changes():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg
