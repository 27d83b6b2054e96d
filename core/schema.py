"""Structured config schema: every section a dataclass, so every key is known and typed.

Component nodes (tokenizer, datasets, maskers, objectives) are free-form mappings with a ``name``
(the registered component) and that component's keyword arguments; they are checked against the
factory's signature by `core.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["Config", "RunConfig", "ModelConfig", "ModalityConfig", "DataConfig", "OptimConfig",
           "StageConfig", "RecipeConfig", "EvalConfig", "LauncherConfig"]


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16
    log_every: int = 10
    checkpoint_every: int = 200
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed
    compile: str = "none"  # none | blocks (each transformer block) | objectives (each objective's whole forward)
    cuda_graphs: bool = False  # compiled parts replay as CUDA graphs (torch.compile mode reduce-overhead); needs run.compile
    sdpa_kernel: str = "auto"  # auto | flash | cudnn | efficient | math (see core.device.sdpa_kernels)
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard): how several processes (torchrun, Slurm tasks) split the work


@dataclass
class ModelConfig:
    size: str = "tiny"  # tiny | small | base | large (timm's ViT sizes)
    dim: Optional[int] = None  # overrides of the size's width / depth / heads
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    attn_backend: str = "sdpa"  # sdpa | math | xformers
    posenc: str = "sincos"  # sincos | learned | mlp
    cls_token: bool = True
    pool: str = "mean"  # mean | cls
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute


@dataclass
class ModalityConfig:
    name: str = ""  # set by the modality file; a label, never branched on
    tokenizer: Dict[str, Any] = field(default_factory=dict)
    masker: Dict[str, Any] = field(default_factory=dict)  # the modality's default masker


@dataclass
class DataConfig:
    train: Dict[str, Any] = field(default_factory=dict)
    test: Dict[str, Any] = field(default_factory=dict)
    transforms: List[Dict[str, Any]] = field(default_factory=list)  # training augmentations, in order
    batch_size: int = 64
    num_workers: int = 0
    strict: bool = False  # fail on the first corrupt file instead of skipping and counting
    views: int = 1  # 2: each sample also carries an independently augmented `<key>_view2`


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    min_lr: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping
    fused: str = "auto"  # auto (fused AdamW on CUDA) | true | false


@dataclass
class StageConfig:
    steps: int = 100
    epochs: Optional[float] = None  # when set, the stage runs ceil(epochs * samples / batch) steps instead
    objectives: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # label -> {name?, weight, kwargs}
    masker: Optional[Dict[str, Any]] = None
    teacher: Optional[Dict[str, Any]] = None  # {name: ema|stage|timm|<plugin's>, ...}
    init_from: Optional[str] = None  # an earlier stage's final backbone, or "scratch" (the run's initial random weights); default: carry on
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: Optional[int] = None  # overrides data.batch_size for this stage


@dataclass
class RecipeConfig:
    name: str = "recipe"
    stages: Dict[str, StageConfig] = field(default_factory=dict)


@dataclass
class EvalConfig:
    max_train: int = 10000  # labelled samples the probes fit on
    max_test: int = 10000
    batch_size: int = 256
    probe_iters: int = 100  # L-BFGS iterations of the linear probe
    probe_l2: float = 1e-4  # L2 penalty of the linear probe (features are standardized)
    knn_k: int = 20
    labels: List[str] = field(default_factory=lambda: ["label"])  # sample fields to probe (e.g. [label, motion])
    pictures: bool = True
    retrieval_samples: int = 1000  # test samples ranked for zero-shot retrieval (contrastive stages)
    monitor_every: int = 0  # online k-NN and collapse monitors every N steps during training; 0 = off
    monitor_samples: int = 1000  # labelled samples the online monitor uses (half reference, half query)


@dataclass
class LauncherConfig:
    """Where `anymodal submit` sends a run (`anymodal train` always runs here; torchrun for several processes)."""

    name: str = "local"  # local | slurm (a label: `anymodal submit` always goes through submitit to Slurm)
    nodes: int = 1
    tasks_per_node: int = 1  # processes per node: one per GPU
    gpus_per_node: int = 0
    cpus_per_task: int = 8
    mem_gb: Optional[float] = None  # per node; None: the cluster's default
    timeout_min: int = 240
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    signal_delay_s: int = 120  # Slurm sends USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 5  # time-outs that requeue the job (preemptions always requeue)
    array_parallelism: int = 64  # jobs of an --sweep array that run at once
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
