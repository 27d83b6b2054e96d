"""Fine-tuning: a pre-trained backbone and a task head trained end to end on labelled data.

The recipe the ViT fine-tuning papers use (BEiT, MAE): layer-wise learning-rate decay (block ``i``
of ``L`` at ``lr * layer_decay ** (L - i)``, the tokenizer below the first block, the head and the
final norm at ``lr``), drop path, label smoothing, linear warm-up then cosine, AdamW without decay
on biases, norms and tokens. A held-out part of ``data.train`` is validated every
``finetune.eval_every`` steps; the best weights are kept and scored on ``data.test``, and
``finetune.patience`` validations without a better score stop the run early.

Two heads: ``cls`` (pooled features -> LayerNorm -> Linear, one label per sample) and ``dense``
(each token -> LayerNorm -> Linear, each input point scored by the token it went into,
`Tokens.source`: per-point segmentation, scored as mIoU).

Resume is exact: the batch order and augmentations are functions of the step (`core.data`), and a
checkpoint holds the weights, the optimizer, the best weights so far, the validation history and
the RNG state (drop path draws from it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import signal
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .backbone import Backbone
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_atomic, set_rng_state
from .data import AugmentedDataset, collate, make_loader, mix_seed
from .dense_probe import confusion, iou_from_confusion
from .device import autocast_for
from .errors import UserError
from .loggers import MetricLoggers
from .runfolder import write_atomic
from .schedule import decay_exempt, lr_at

__all__ = ["Finetuned", "layer_groups", "split_validation", "label_classes", "FinetuneRun", "FinetuneStopped"]

log = logging.getLogger("anymodal.finetune")

_LAST = "last.pt"
BEST = "best.safetensors"


class FinetuneStopped(SystemExit):
    """SIGTERM/SIGINT arrived: the run checkpointed at ``step`` and exits 128 + the signal."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class Finetuned(nn.Module):
    """``backbone`` and a head: ``forward(batch) -> (logits [n, classes], labels [n])``, over the
    batch's samples (``cls``) or its labelled points that a token holds (``dense``)."""

    def __init__(self, backbone: Backbone, head: str, classes: int, labels: str, sensor: Optional[str] = None) -> None:
        super().__init__()
        self.backbone, self.kind, self.labels, self.sensor = backbone, head, labels, sensor
        dim = backbone.encoder.dim
        self.head = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes))
        nn.init.trunc_normal_(self.head[1].weight, std=2e-5)  # near-zero logits: the pre-trained features lead at first
        nn.init.zeros_(self.head[1].bias)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if self.labels not in batch:
            raise UserError(f"fine-tuning reads labels from sample field {self.labels!r}; the samples have {sorted(batch)}")
        y = batch[self.labels].long()
        if self.kind == "cls":
            return self.head(self.backbone.embed(batch, self.sensor)), y
        tokens = self.backbone.tokenize(batch, self.sensor)
        if tokens.source is None:
            raise UserError(f"finetune.head=dense needs a tokenizer that records each point's token (Tokens.source); "
                            f"{type(self.backbone.tokenizer_of(self.sensor)).__name__} does not")
        if y.shape != tokens.source.shape:
            raise UserError(f"field {self.labels!r} holds {tuple(y.shape)} labels but the tokenizer saw "
                            f"{tuple(tokens.source.shape)} points")
        # logits per token, then each point takes its token's: [B, T, C] rather than [B, N, D]
        logits = self.head(self.backbone.encode(tokens).tokens.x)
        kept = (tokens.source >= 0) & (y >= 0)
        point_logits = torch.gather(logits, 1, tokens.source.clamp_min(0)[..., None].expand(-1, -1, logits.shape[-1]))
        return point_logits[kept], y[kept]


def layer_groups(model: Finetuned, ft: Any) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (layer, decay or not), each with its ``lr_scale``."""
    depth = len(model.backbone.encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        block = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
        if block:
            layer = int(block.group(1)) + 1
        elif name.startswith("head.") or re.search(r"(?:^|\.)encoder\.norm\.", name):
            layer = depth + 1
        else:  # tokenizers, position tables, tokens, sensor embeddings: below the first block
            layer = 0
        exempt = decay_exempt(name, p)
        group = groups.setdefault((layer, exempt), {"params": [], "weight_decay": 0.0 if exempt else ft.weight_decay,
                                                    "lr_scale": ft.layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def split_validation(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of a dataset of ``size``: a seeded ``fraction`` held out."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(mix_seed(seed, 7))).tolist()
    held = max(1, round(size * fraction))
    if held >= size:
        raise UserError(f"finetune.val_fraction={fraction} of {size} samples leaves none to train on")
    return sorted(order[held:]), sorted(order[:held])


def label_classes(datasets: list[Dataset], field: str, batch_size: int) -> int:
    """One more than the largest label of ``field`` in ``datasets`` (a pass over their samples)."""
    top = -1
    for data in datasets:
        for raw in DataLoader(data, batch_size=batch_size, collate_fn=collate):
            if field not in raw:
                raise UserError(f"fine-tuning reads labels from sample field {field!r}; the samples have {sorted(raw)}")
            top = max(top, int(torch.as_tensor(raw[field]).max()))
    if top < 0:
        raise UserError(f"no labels >= 0 in field {field!r}")
    return top + 1


@contextlib.contextmanager
def _signals(flag: list[int]) -> Iterator[None]:
    """SIGTERM/SIGINT set ``flag``: the loop checkpoints after the step in flight and stops."""
    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread
            old[sig] = signal.signal(sig, lambda signum, frame: flag.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class FinetuneRun:
    """One fine-tuning run in ``folder`` (``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt``,
    ``best.safetensors``, ``results.json``); ``loggers``: TensorBoard, W&B, MLflow as the run config says.

    Args:
        model: the backbone (pre-trained or not) with its head, on ``device``.
        train: the labelled training part, with augmentations (`AugmentedDataset`).
        val, test: plain labelled datasets.
        ft: the ``finetune`` config section; seed: the run's.
    """

    def __init__(self, model: Finetuned, train: AugmentedDataset, val: Dataset, test: Dataset, ft: Any, seed: int,
                 folder: Path, device: torch.device, precision: str = "auto", num_workers: int = 0,
                 loggers: Optional[MetricLoggers] = None) -> None:
        self.model, self.train, self.val, self.test, self.ft, self.seed = model, train, val, test, ft, seed
        self.folder, self.device, self.num_workers, self.loggers = Path(folder), device, num_workers, loggers
        self.autocast, dtype = autocast_for(device, precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(layer_groups(model, ft), lr=ft.lr, betas=(0.9, 0.999), fused=fused or None)
        self.step, self.best, self.best_step, self.since_best = 0, -math.inf, -1, 0
        self.best_state: Optional[dict[str, Tensor]] = None
        self.history: list[dict[str, float]] = []

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / _LAST

    def resume(self) -> None:
        """Continue from ``checkpoints/last.pt``.

        Raises:
            CheckpointError: it is missing, corrupt, or of another model.
        """
        state = load_checkpoint(self.checkpoint)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{self.checkpoint} is not a checkpoint of this fine-tuning run: "
                                  f"{str(e).splitlines()[0]}") from None
        self.scaler.load_state_dict(state["scaler"])  # a disabled scaler ignores it
        self.step, self.best, self.best_step = int(state["step"]), float(state["best"]), int(state["best_step"])
        self.since_best, self.history, self.best_state = int(state["since_best"]), list(state["history"]), state["best_state"]
        set_rng_state(state["rng"])
        log.info("resumed %s at step %d (best validation %.4f at step %d)", self.folder, self.step, self.best, self.best_step)

    def _save(self) -> None:
        save_atomic({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), "step": self.step, "best": self.best,
                     "best_step": self.best_step, "since_best": self.since_best, "history": self.history,
                     "best_state": self.best_state, "rng": rng_state()}, self.checkpoint)

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.loggers is not None:
            self.loggers.log(record)

    def run(self) -> dict[str, Any]:
        """Train to ``finetune.steps`` (or the early stop), then score the best weights on the test split.

        Raises:
            FinetuneStopped: SIGTERM/SIGINT; a checkpoint of the last finished step was written.
            FloatingPointError: the loss became NaN or Inf (the bad update is not applied).
        """
        ft = self.ft
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        self._keep_metrics_until(self.step)
        loader = make_loader(self.train, ft.batch_size, self.seed, self.step, self.num_workers,
                             pin_memory=self.device.type == "cuda")
        stop: list[int] = []
        batches = iter(loader)
        with _signals(stop), contextlib.ExitStack() as stack:
            if self.loggers is not None:
                stack.callback(self.loggers.close)
            while self.step < ft.steps and not self._early_stop():
                loss = self._train_step(next(batches))
                self.step += 1
                record: dict[str, Any] = {"stage": "finetune", "step": self.step, "loss": loss,
                                          "lr": self.optimizer.param_groups[-1]["lr"]}
                if self.step % ft.eval_every == 0 or self.step == ft.steps:
                    record.update(self._validate())
                self._log(record)
                if stop or self.step % ft.checkpoint_every == 0 or self.step == ft.steps or self._early_stop():
                    self._save()
                if stop:
                    raise FinetuneStopped(stop[0], self.step)
        return self._finish()

    def _early_stop(self) -> bool:
        return bool(self.ft.patience) and self.since_best >= self.ft.patience

    def _train_step(self, raw: dict[str, Any]) -> float:
        ft, model = self.ft, self.model
        model.train()
        factor = lr_at(self.step, ft.steps, ft.lr, ft.warmup_steps, ft.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = factor * group["lr_scale"]
        raw = {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in raw.items()}
        with self.autocast():
            logits, y = model(raw)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=ft.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the fine-tuning loss is {loss.item()} at step {self.step + 1}; the update was not "
                                     f"applied (lower finetune.lr, or check the labels)")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if ft.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), ft.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()

    @torch.no_grad()
    def score(self, data: Dataset) -> dict[str, float]:
        """``accuracy`` (and for the dense head ``miou``) of the model on ``data``, in eval mode."""
        self.model.eval()
        classes = self.model.head[1].out_features
        matrix = torch.zeros(classes, classes, dtype=torch.long)
        for raw in DataLoader(data, batch_size=self.ft.batch_size, collate_fn=collate):
            raw = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in raw.items()}
            with self.autocast():
                logits, y = self.model(raw)
            if y.numel() and int(y.max()) >= classes:
                raise UserError(f"label {int(y.max())} in field {self.model.labels!r} is out of range for "
                                f"{classes} classes (finetune.classes)")
            matrix += confusion(logits.argmax(-1).cpu(), y.cpu(), classes)
        out = {"accuracy": float(matrix.diag().sum() / matrix.sum().clamp_min(1))}
        if self.model.kind == "dense":
            iou = iou_from_confusion(matrix)
            out["miou"] = float(iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else 0.0
        return out

    def _metric(self, scores: dict[str, float]) -> float:
        return scores["miou" if self.model.kind == "dense" else "accuracy"]

    def _validate(self) -> dict[str, float]:
        scores = self.score(self.val)
        value = self._metric(scores)
        self.history.append({"step": self.step, **scores})
        if value > self.best:
            self.best, self.best_step, self.since_best = value, self.step, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            self.since_best += 1
        log.info("step %d: validation %s (best %.4f at step %d)", self.step,
                 ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), self.best, self.best_step)
        return {f"val/{k}": v for k, v in scores.items()}

    def _keep_metrics_until(self, step: int) -> None:
        """Drop metric lines past ``step`` (written after the checkpoint a resume starts from)."""
        path = self.folder / "metrics.jsonl"
        if path.is_file():
            lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))

    def _finish(self) -> dict[str, Any]:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        test = self.score(self.test)
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        write_atomic(self.folder / BEST, lambda tmp: save_file(state, str(tmp), metadata={"format": "anymodal-finetuned"}))
        results = {"head": self.model.kind, "init": self.ft.init, "steps": self.step, "stopped_early": self.step < self.ft.steps,
                   "best_step": self.best_step, "val": self.best, "test": test, "history": self.history}
        write_atomic(self.folder / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
        log.info("fine-tuned %d steps; best validation %.4f at step %d; test %s", self.step, self.best, self.best_step,
                 ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
        return results
