"""Structured config schema: every section a dataclass, so every key is known, typed and ranged.

Component nodes (tokenizer, datasets, maskers, objectives) are free-form mappings with a ``name``
(the registered component) and that component's keyword arguments; they are checked against the
factory's signature by `core.config.validate`.

A field's allowed values sit next to it, as ``checked(default, rule)``: a `Range` of numbers, a
`OneOf` of choices, `Items` for a list, or `Satisfies` for anything else. The checks read the
schema: `key_errors` (unknown keys and wrong types, when `core.config.compose` reads each layer)
and `rule_errors` / `model_errors` (values, once resolved, in `core.config.validate`). Each
returns every problem it finds, naming the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from omegaconf import BooleanNode, FloatNode, IntegerNode, StringNode
from omegaconf.errors import ValidationError

from .attention import ATTENTION_BACKENDS
from .device import COMPILE_MODES, PRECISIONS, SDPA_KERNELS
from .encoder import ENCODER_SIZES, POOLS
from .parallel import PARALLEL_MODES
from .posenc import POSENCS
from .registry import closest

__all__ = ["Config", "RunConfig", "ModelConfig", "ModalityConfig", "DataConfig", "OptimConfig",
           "StageConfig", "RecipeConfig", "EvalConfig", "LauncherConfig", "FinetuneConfig", "Rule", "Range", "OneOf", "Items", "Satisfies",
           "checked", "field_rules", "model_shape", "optional_of", "key_errors", "rule_errors", "model_errors",
           "REPLACE", "PRECISIONS", "POSENCS", "POOLS"]

REPLACE = "_replace_"  # in a mapping: replace the node of earlier layers instead of merging into it (core.config)
_SCALARS = {int: (IntegerNode, "an integer"), float: (FloatNode, "a number"), bool: (BooleanNode, "true or false"),
            str: (StringNode, "a string")}


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


class Rule:
    """What a field's values may be: ``problem(value)`` says what is wrong ("must be >= 1") or None."""

    def problem(self, value: Any) -> Optional[str]:
        raise NotImplementedError

    def hint(self, value: Any) -> str:
        """Said after the value: the closest valid choice, where there are names."""
        return ""


@dataclass(frozen=True)
class Range(Rule):
    """Numbers from ``low`` to ``high`` (None: unbounded), inclusive unless ``*_open``; never NaN or inf;
    whole numbers only when ``integer`` (component arguments: the schema's own int fields are typed)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"

    def problem(self, value: Any) -> Optional[str]:
        kind = "an integer" if self.integer else "a number"
        if not isinstance(value, int if self.integer else (int, float)) or isinstance(value, bool):
            return f"must be {kind} {self}"
        if not math.isfinite(value):
            return f"must be a finite {kind[kind.index(' ') + 1:]} {self}"
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        return f"must be {self}" if too_low or too_high else None


@dataclass(frozen=True)
class OneOf(Rule):
    """One of ``choices``; strings compare case-insensitively when ``fold_case`` (YAML's ``true`` arrives as "True")."""

    choices: tuple
    fold_case: bool = False

    def problem(self, value: Any) -> Optional[str]:
        seen = str(value).lower() if self.fold_case else value
        return None if seen in self.choices else f"must be one of {', '.join(map(str, self.choices))}"

    def hint(self, value: Any) -> str:
        near = closest(str(value), [str(c) for c in self.choices]) if isinstance(value, str) else []
        return f"; did you mean {near[0]!r}?" if near else ""


@dataclass(frozen=True)
class Items(Rule):
    """A list: ``length`` items exactly (or at least ``min_length``), each satisfying ``each``."""

    each: Any = None
    length: Optional[int] = None
    min_length: int = 0

    def problem(self, value: Any) -> Optional[str]:
        if self.length is not None and len(value) != self.length:
            return f"must be a list of {self.length} items" + (f", each {self.each}" if isinstance(self.each, Range) else "")
        if len(value) < self.min_length:
            return f"must list at least {self.min_length} item{'s' if self.min_length > 1 else ''}"
        for i, item in enumerate(value if self.each else ()):
            problem = self.each.problem(item)
            if problem:
                return f"item {i} ({item!r}) {problem}"
        return None


@dataclass(frozen=True)
class Satisfies(Rule):
    """Any value ``predicate`` accepts; ``description`` says what that is ("a torch device")."""

    predicate: Callable[[Any], bool]
    description: str

    def problem(self, value: Any) -> Optional[str]:
        return None if self.predicate(value) else f"must be {self.description}"


def checked(default: Any, rule: Any) -> Any:
    """A dataclass field with ``default`` (a callable: a default factory) whose values must satisfy ``rule``."""
    if callable(default):
        return field(default_factory=default, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def field_rules(schema: type) -> dict[str, Any]:
    """Field name -> the rule declared with `checked`, for the fields of dataclass ``schema`` that have one."""
    return {f.name: f.metadata["rule"] for f in fields(schema) if "rule" in f.metadata}


def _is_device(name: Any) -> bool:
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = checked(0, Range(0, 2**64 - 1))  # torch's seeds are unsigned 64-bit
    device: str = checked("auto", Satisfies(_is_device, "auto or a torch device (cpu, cuda, cuda:N, mps)"))
    precision: str = checked("auto", OneOf(PRECISIONS))  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16
    log_every: int = checked(10, AT_LEAST_1)
    checkpoint_every: int = checked(200, AT_LEAST_1)
    threads: int = checked(0, AT_LEAST_0)  # CPU threads for torch; 0 keeps torch's default
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed
    wandb: bool = False  # Weights & Biases (offline unless WANDB_API_KEY or WANDB_MODE say otherwise): core/loggers.py
    mlflow: bool = False  # MLflow (MLFLOW_TRACKING_URI, else an SQLite store, the run's logs/mlflow.db)
    # none | blocks (each transformer block) | objectives (each objective's whole forward)
    compile: str = checked("none", OneOf(COMPILE_MODES))
    cuda_graphs: bool = False  # compiled parts replay as CUDA graphs (torch.compile mode reduce-overhead); needs run.compile
    sdpa_kernel: str = checked("auto", OneOf(SDPA_KERNELS))  # auto | flash | cudnn | efficient | math (see core.device.sdpa_kernels)
    # ddp | fsdp (FSDP2 fully_shard): how several processes (torchrun, Slurm tasks) split the work
    parallel: str = checked("ddp", OneOf(PARALLEL_MODES))


SENSOR_ENCODERS = ("shared", "separate")
OPTIMIZERS = ("adamw", "lars", "lamb")


@dataclass
class ModelConfig:
    size: str = checked("tiny", OneOf(tuple(ENCODER_SIZES)))  # tiny | small | base | large (timm's ViT sizes)
    dim: Optional[int] = checked(None, AT_LEAST_1)  # overrides of the size's width / depth / heads
    depth: Optional[int] = checked(None, AT_LEAST_1)
    num_heads: Optional[int] = checked(None, AT_LEAST_1)
    mlp_ratio: float = checked(4.0, POSITIVE)
    drop_path: float = checked(0.0, FRACTION)
    attn_backend: str = checked("sdpa", OneOf(ATTENTION_BACKENDS))  # sdpa | math | xformers
    posenc: str = checked("sincos", OneOf(POSENCS))
    cls_token: bool = True
    pool: str = checked("mean", OneOf(POOLS))
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute
    # a scene's sensors through the one encoder (with a per-sensor embedding) or each through its own
    sensor_encoders: str = checked("shared", OneOf(SENSOR_ENCODERS))
    # start from weights trained elsewhere: a file or folder (anymodal export, run or checkpoint; a timm
    # ViT checkpoint) or a hub name (timm:NAME, hf-hub:ORG/REPO); what fits is loaded, the rest reported
    init: Optional[str] = None


@dataclass
class ModalityConfig:
    name: str = ""  # set by the modality file; a label, never branched on
    tokenizer: Dict[str, Any] = field(default_factory=dict)
    masker: Dict[str, Any] = field(default_factory=dict)  # the modality's default masker
    # a scene sample's sensors, by sample field: {cam_front: {tokenizer: {...}, masker: {...}, transforms: [...]}};
    # `tokenizer` above is then the first sensor's, reading the field named by `sensor`
    sensor: str = ""
    sensors: Dict[str, Dict[str, Any]] = field(default_factory=dict)


@dataclass
class DataConfig:
    train: Dict[str, Any] = field(default_factory=dict)
    test: Dict[str, Any] = field(default_factory=dict)
    # weighted sources in place of `train`: [{weight: 0.7, label: a, name: shards, path: ...}, ...] (core/mix.py)
    mix: List[Dict[str, Any]] = field(default_factory=list)
    transforms: List[Dict[str, Any]] = field(default_factory=list)  # training augmentations, in order
    batch_size: int = checked(64, AT_LEAST_1)
    num_workers: int = checked(0, AT_LEAST_0)
    strict: bool = False  # fail on the first corrupt file instead of skipping and counting
    views: int = checked(1, OneOf((1, 2)))  # 2: each sample also carries an independently augmented `<key>_view2`


@dataclass
class OptimConfig:
    name: str = checked("adamw", OneOf(OPTIMIZERS))  # adamw | lars | lamb (layer-wise trust ratios, large batches)
    lr: float = checked(1e-3, AT_LEAST_0)
    weight_decay: float = checked(0.05, AT_LEAST_0)
    betas: List[float] = checked(lambda: [0.9, 0.95], Items(FRACTION, length=2))
    warmup_steps: int = checked(0, AT_LEAST_0)
    min_lr: float = checked(0.0, AT_LEAST_0)
    clip_grad: float = checked(1.0, AT_LEAST_0)  # 0 disables clipping
    fused: str = checked("auto", OneOf(("auto", "true", "false"), fold_case=True))  # auto: fused AdamW on CUDA
    # LARS: the fraction of a tensor's norm an update of lr 1 moves it by (its momentum is betas[0])
    trust_coefficient: float = checked(0.001, POSITIVE)
    # micro-batches per step: each rank's share of the batch in this many forward/backward passes,
    # then one optimizer step (the activations of one micro-batch at a time)
    accumulate_steps: int = checked(1, AT_LEAST_1)


@dataclass
class StageConfig:
    steps: int = checked(100, AT_LEAST_1)
    epochs: Optional[float] = checked(None, POSITIVE)  # when set, the stage runs ceil(epochs * samples / batch) steps instead
    objectives: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # label -> {name?, weight, kwargs}
    masker: Optional[Dict[str, Any]] = None
    teacher: Optional[Dict[str, Any]] = None  # {name: ema|stage|timm|<plugin's>, ...}
    init_from: Optional[str] = None  # an earlier stage's final backbone, or "scratch" (the run's initial random weights); default: carry on
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: Optional[int] = checked(None, AT_LEAST_1)  # overrides data.batch_size for this stage
    sensor: Optional[str] = None  # the sensor whose tokens the stage's batch holds (a scene's); default the first


@dataclass
class RecipeConfig:
    name: str = "recipe"
    stages: Dict[str, StageConfig] = field(default_factory=dict)


@dataclass
class EvalConfig:
    max_train: int = checked(10000, AT_LEAST_1)  # labelled samples the probes fit on
    max_test: int = checked(10000, AT_LEAST_1)
    batch_size: int = checked(256, AT_LEAST_1)
    probe_iters: int = checked(100, AT_LEAST_1)  # L-BFGS iterations of the linear probe
    probe_l2: float = checked(1e-4, AT_LEAST_0)  # L2 penalty of the linear probe (features are standardized)
    knn_k: int = checked(20, AT_LEAST_1)
    # sample fields to probe (e.g. [label, motion]); the online monitor uses the first
    labels: List[str] = checked(lambda: ["label"], Items(min_length=1))
    pictures: bool = True
    retrieval_samples: int = checked(1000, AT_LEAST_1)  # test samples ranked for zero-shot retrieval (contrastive stages)
    monitor_every: int = checked(0, AT_LEAST_0)  # online k-NN, linear-probe and collapse monitors every N steps during training; 0 = off
    # a per-point segmentation probe (scenes): the field of per-point labels (lidar_top/labels), the
    # sensor whose tokens are probed (default the first), class names, points drawn per frame
    point_labels: Optional[str] = None
    point_sensor: Optional[str] = None
    point_classes: List[str] = field(default_factory=list)
    point_samples: int = checked(2048, AT_LEAST_1)
    monitor_samples: int = checked(1000, Range(2))  # labelled samples the online monitor uses (half reference, half query)


@dataclass
class FinetuneConfig:
    """`anymodal finetune`: the pre-trained encoder and a task head trained end to end on data.train
    (less a held-out validation part), scored on data.test with the best validation weights."""

    head: str = checked("cls", OneOf(("cls", "dense")))  # cls: eval.labels[0] per sample; dense: eval.point_labels per point
    init: str = checked("pretrained", OneOf(("pretrained", "scratch")))  # scratch: the same run from random weights
    classes: int = checked(0, AT_LEAST_0)  # 0: one more than the largest label in the data
    steps: int = checked(300, AT_LEAST_1)
    batch_size: int = checked(64, AT_LEAST_1)
    lr: float = checked(1e-3, POSITIVE)  # the head's; block i of L gets lr * layer_decay ** (L - i)
    min_lr: float = checked(1e-6, AT_LEAST_0)
    warmup_steps: int = checked(20, AT_LEAST_0)  # linear warm-up, then cosine to min_lr
    weight_decay: float = checked(0.05, AT_LEAST_0)
    layer_decay: float = checked(0.75, Range(0, 1, low_open=True))  # 1: one learning rate for all layers
    drop_path: float = checked(0.1, FRACTION)  # stochastic depth at the last block
    label_smoothing: float = checked(0.1, FRACTION)
    clip_grad: float = checked(1.0, AT_LEAST_0)  # 0 disables clipping
    val_fraction: float = checked(0.1, Range(0, 1, low_open=True, high_open=True))
    eval_every: int = checked(50, AT_LEAST_1)  # validation every N steps (and at the last)
    patience: int = checked(0, AT_LEAST_0)  # stop after N validations without a better score; 0: never early
    checkpoint_every: int = checked(100, AT_LEAST_1)


@dataclass
class LauncherConfig:
    """Where `anymodal submit` sends a run (`anymodal train` always runs here; torchrun for several processes)."""

    name: str = "local"  # local | slurm (a label: `anymodal submit` always goes through submitit to Slurm)
    nodes: int = checked(1, AT_LEAST_1)
    tasks_per_node: int = checked(1, AT_LEAST_1)  # processes per node: one per GPU
    gpus_per_node: int = checked(0, AT_LEAST_0)
    cpus_per_task: int = checked(8, AT_LEAST_1)
    mem_gb: Optional[float] = checked(None, POSITIVE)  # per node; None: the cluster's default
    timeout_min: int = checked(240, AT_LEAST_1)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    signal_delay_s: int = checked(120, AT_LEAST_0)  # Slurm sends USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = checked(5, AT_LEAST_0)  # time-outs that requeue the job (preemptions always requeue)
    array_parallelism: int = checked(64, AT_LEAST_1)  # jobs of an --sweep array that run at once
    sbatch_extra: Dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. {exclusive: true}


@dataclass
class Config:
    plugins: List[str] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    modality: ModalityConfig = field(default_factory=ModalityConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def model_shape(model: Any) -> tuple[int, int, int]:
    """(width, depth, heads) of ``model.size`` with any explicit overrides applied.

    Raises:
        ValueError: an unknown size (with the closest one).
    """
    rule = field_rules(ModelConfig)["size"]
    if rule.problem(model.size):
        raise ValueError(f"model.size {rule.problem(model.size)}, got {model.size!r}{rule.hint(model.size)}")
    dim, depth, heads = ENCODER_SIZES[model.size]
    return model.dim or dim, model.depth or depth, model.num_heads or heads


def optional_of(tp: Any) -> tuple[Any, bool]:
    """(the type inside ``Optional[...]``, True) or (``tp``, False)."""
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def key_errors(data: Mapping, source: str, schema: Any = None, prefix: str = "") -> list[str]:
    """Unknown keys in ``data`` against dataclass ``schema``, with suggestions, and values of the wrong type."""
    errors: list[str] = []
    hints = typing.get_type_hints(schema or Config)
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key == REPLACE and prefix:
            errors += _type_errors(value, REPLACE, path, source)
        elif key not in hints:
            near = closest(str(key), list(hints))
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else f"; valid keys: {', '.join(hints)}"
            errors.append(f"unknown key {path!r} in {source}{hint}")
        else:
            errors += _type_errors(value, hints[key], path, source)
    return errors


def _type_errors(value: Any, tp: Any, path: str, source: str) -> list[str]:
    """``value`` against type ``tp``, converted the way OmegaConf converts it; interpolations are
    checked once resolved. ``tp`` REPLACE: a YAML boolean."""
    if isinstance(value, str) and "${" in value:
        return []
    tp, optional = optional_of(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    got = "null" if value is None else f"{value!r} ({type(value).__name__})"
    wrong = lambda expected: [f"{path} (from {source}): expected {expected}, got {got}"]  # noqa: E731
    if tp is Any or (value is None and optional):
        return []
    if tp == REPLACE:
        return [] if isinstance(value, bool) else wrong("true or false")
    if dataclasses.is_dataclass(tp) or origin is dict:
        if not isinstance(value, Mapping):
            return wrong("a mapping")
        if dataclasses.is_dataclass(tp):
            return key_errors(value, source, tp, path + ".")
        return [e for k, v in value.items() for e in _type_errors(v, REPLACE if k == REPLACE else args[1], f"{path}.{k}", source)]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return wrong("a list")
        return [e for i, v in enumerate(value) for e in _type_errors(v, args[0], f"{path}[{i}]", source)]
    node, expected = _SCALARS[tp]
    try:
        node(value, is_optional=False)
    except ValidationError:
        return wrong(expected)
    return []


def rule_errors(data: Mapping, src: Callable[[str], str], schema: Any = None, prefix: str = "") -> list[str]:
    """Every value outside the range or choices its schema field declares (`core.schema.checked`)."""
    errors = []
    schema = schema or Config
    rules = field_rules(schema)
    for name, tp in typing.get_type_hints(schema).items():
        key, value, tp = f"{prefix}{name}", data[name], optional_of(tp)[0]
        problem = rules[name].problem(value) if name in rules and value is not None else None
        if problem:
            errors.append(f"{key} {problem}, got {value!r} (from {src(key)}){rules[name].hint(value)}")
        if dataclasses.is_dataclass(tp):
            errors += rule_errors(value, src, tp, key + ".")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            errors += [e for k, v in value.items() for e in rule_errors(v, src, typing.get_args(tp)[1], f"{key}.{k}.")]
    return errors


def model_errors(model: Mapping, src: Callable[[str], str]) -> list[str]:
    """The width, after the size's defaults, must split evenly over the heads."""
    if rule_errors(model, lambda _: "", ModelConfig, "model."):  # a bad size, width or head count: its rule reports it
        return []
    dim, _, heads = model_shape(SimpleNamespace(**model))
    if dim % heads == 0:
        return []
    origin = lambda k: f"from {src('model.' + k)}" if model[k] is not None else f"model.size {model['size']!r}"  # noqa: E731
    return [f"model width {dim} ({origin('dim')}) is not divisible by model.num_heads {heads} ({origin('num_heads')}): "
            "each head takes width / num_heads channels"]
