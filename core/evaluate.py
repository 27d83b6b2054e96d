"""Frozen-backbone evaluation: linear probe and k-NN on a labelled split, next to a randomly
initialized encoder, plus pictures (loss curve, reconstructions) written into the run folder.

Each phase (features of each encoder and split, each probe fit, retrieval, pictures) is logged
with its sizes as it starts, and feature extraction shows a progress bar on a terminal. SIGTERM or
SIGINT stops eval with `EvalInterrupted`, which says what was written: a rerun starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .backbone import Backbone
from .build import build_backbone, build_dataset, stage_objectives
from .config import load_run_config, objective_nodes
from .data import collate
from .dense_probe import format_segmentation, point_features, segmentation_probe
from .linear import fit_linear
from .device import resolve_device
from .export import load_exported
from .runfolder import RunFolder, write_atomic

__all__ = ["extract_features", "linear_probe", "knn_accuracy", "evaluate_run", "format_table", "subset",
           "EvalInterrupted"]

log = logging.getLogger("anymodal.eval")


class EvalInterrupted(SystemExit):
    """SIGTERM or SIGINT arrived during eval; the exit status is 128 + the signal.

    Attributes:
        signum: the signal.
        written: the files eval had finished writing (a rerun writes them all again).
    """

    def __init__(self, signum: int, written: Sequence[Path]) -> None:
        super().__init__(128 + signum)
        self.signum, self.written = signum, list(written)

    def __str__(self) -> str:
        done = "wrote " + ", ".join(map(str, self.written)) if self.written else "nothing was written yet"
        return f"stopped by {signal.Signals(self.signum).name}; {done}"


@contextlib.contextmanager
def _stop_on_signals(written: list[Path]) -> Iterator[None]:
    """SIGTERM and SIGINT raise `EvalInterrupted` at once: eval keeps no state worth saving."""
    def stop(signum: int, frame: Any) -> None:
        raise EvalInterrupted(signum, written)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
            old[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    if len(dataset) <= n:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(dataset, sorted(order.tolist()))


@torch.no_grad()
def extract_features(backbone: Backbone, dataset: Dataset, batch_size: int, device: torch.device,
                     fields: Sequence[str] = ("label",), progress: Optional[str] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Pooled features ``[n, D]`` and each label field ``[n]`` of every sample, in eval mode;
    with ``progress``, a bar of that name over the batches (on a terminal)."""
    backbone.eval()
    feats: list[Tensor] = []
    labels: dict[str, list[Tensor]] = {f: [] for f in fields}
    for raw in _batches(dataset, batch_size, progress):
        missing = [f for f in fields if f not in raw]
        if missing:
            raise ValueError(f"evaluation needs samples with the label fields {list(fields)} (eval.labels); "
                             f"data.test's samples lack {missing} (they have {sorted(raw)})")
        raw = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in raw.items()}
        feats.append(backbone.embed(raw).float().cpu())
        for f in fields:
            labels[f].append(raw[f].cpu())
    return torch.cat(feats), {f: torch.cat(v) for f, v in labels.items()}


def _batches(dataset: Dataset, batch_size: int, progress: Optional[str]) -> Any:
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    if progress is None:
        return loader
    return tqdm(loader, desc=progress, unit="batch", leave=False, dynamic_ncols=True, disable=None)  # None: off when not a terminal


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, iters: int = 100,
                 l2: float = 1e-4) -> float:
    """Test accuracy of multinomial logistic regression on standardized features (L-BFGS)."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    layer, (mean, std) = fit_linear(train_x, train_y, classes, iters, l2)
    with torch.no_grad():
        return (layer((test_x - mean) / std).argmax(1) == test_y).float().mean().item()


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = 20,
                 temperature: float = 0.07) -> float:
    """Weighted k-NN on cosine similarity (the DINO evaluation's vote)."""
    xtr, xte = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for start in range(0, len(xte), 1024):
        sim = xte[start:start + 1024] @ xtr.T
        top, idx = sim.topk(min(k, len(xtr)), dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == test_y[start:start + 1024]).sum().item()
    return correct / len(xte)


def probe(backbone: Backbone, train: Dataset, test: Dataset, ev: Any, device: torch.device,
          name: str = "encoder", progress: bool = False) -> dict[str, float]:
    """Linear-probe and k-NN accuracy for each of ``ev.labels``; the first field's keys are
    ``linear_probe`` and ``knn``, another field's ``<field>/linear_probe`` and ``<field>/knn``.
    Each phase is logged under ``name``; ``progress`` shows bars over the feature batches."""
    fields = list(ev.labels)
    features = {}
    for split, data in (("train", train), ("test", test)):
        log.info("%s: features of the %s split, %d samples in batches of %d", name, split, len(data), ev.batch_size)
        features[split] = extract_features(backbone, data, ev.batch_size, device, fields,
                                           f"{name} {split}" if progress else None)
    (xtr, ytr), (xte, yte) = features["train"], features["test"]
    out = {}
    for i, f in enumerate(fields):
        prefix = "" if i == 0 else f"{f}/"
        log.info("%s: linear probe of %s on %d x %d features (%d L-BFGS iterations), tested on %d",
                 name, f, *xtr.shape, ev.probe_iters, len(xte))
        out[prefix + "linear_probe"] = linear_probe(xtr, ytr[f], xte, yte[f], ev.probe_iters, ev.probe_l2)
        log.info("%s: k-NN of %s (k=%d), %d queries against %d", name, f, ev.knn_k, len(xte), len(xtr))
        out[prefix + "knn"] = knn_accuracy(xtr, ytr[f], xte, yte[f], ev.knn_k)
    return out


@torch.no_grad()
def retrieval(objective: nn.Module, backbone: Backbone, dataset: Dataset, batch_size: int,
              device: torch.device, progress: Optional[str] = None) -> dict[str, float]:
    """Zero-shot retrieval R@1/R@5 both ways between samples and their partners (captions, or another
    sensor of the same frame).

    Identical captions are interchangeable: retrieving any sample whose caption equals the query's
    counts as a hit (label-derived captions repeat, which makes this zero-shot classification).
    With ``progress``, a bar of that name over the batches (on a terminal).
    """
    backbone.eval()
    za, zb, keys = [], [], []
    for raw in _batches(dataset, batch_size, progress):
        raw = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in raw.items()}
        za.append(objective.embed_sample(raw, backbone).float().cpu())
        zb.append(objective.embed_partner(raw, backbone).float().cpu())
        partners = raw[objective.partner_key]
        if isinstance(partners, Tensor):  # sensor data (a view, another sensor): only its own frame is a hit
            keys += [("frame", len(keys) + i) for i in range(len(partners))]
        else:
            keys += list(partners)
    za, zb = torch.cat(za), torch.cat(zb)
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    group = torch.tensor([ids[k] for k in keys])
    same = group[:, None] == group[None, :]
    sim = za @ zb.T
    out = {}
    for direction, s in (("sample_to_partner", sim), ("partner_to_sample", sim.T)):
        top = s.topk(min(5, s.shape[1]), dim=1).indices  # a test split of fewer than 5: R@5 is R@all
        hits = torch.gather(same, 1, top)
        out[f"{direction}_r1"] = hits[:, 0].float().mean().item()
        out[f"{direction}_r5"] = hits.any(1).float().mean().item()
    return out


def format_table(results: dict[str, dict[str, float]], k: int, fields: Sequence[str] = ("label",)) -> str:
    head, keys = ["encoder"], []
    for i, f in enumerate(fields):
        prefix = "" if i == 0 else f"{f}/"
        name = "" if len(fields) == 1 else f" ({f})"
        head += [f"linear probe{name}", f"k-NN{name} (k={k})"]
        keys += [prefix + "linear_probe", prefix + "knn"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        rows.append(f"| {name} | " + " | ".join(f"{100 * r[key]:.1f}%" for key in keys) + " |")
    return "\n".join(rows)


def format_retrieval(retrieval: dict[str, dict[str, float]]) -> str:
    # the partner is the objective's: captions, a second view, another modality or another sensor
    rows = ["| stage/objective | sample->partner R@1 | R@5 | partner->sample R@1 | R@5 |", "|---|---|---|---|---|"]
    for name, r in retrieval.items():
        rows.append(f"| {name} | {100 * r['sample_to_partner_r1']:.1f}% | {100 * r['sample_to_partner_r5']:.1f}% | "
                    f"{100 * r['partner_to_sample_r1']:.1f}% | {100 * r['partner_to_sample_r5']:.1f}% |")
    return "\n".join(rows)


def evaluate_run(run_dir: Path, components: Any, pictures: Optional[bool] = None) -> dict[str, Any]:
    """Probe the run's exported backbone and a random-init one; write ``eval/`` and return the results.

    Raises:
        EvalInterrupted: SIGTERM or SIGINT arrived; it lists the files written so far.
    """
    folder, written = RunFolder(Path(run_dir)), []
    start = time.perf_counter()
    with _stop_on_signals(written):
        summary = _evaluate(folder, components, pictures, written)
    log.info("eval of %s done in %.0f s: %s", folder.root, time.perf_counter() - start, ", ".join(p.name for p in written))
    return summary


def _evaluate(folder: RunFolder, components: Any, pictures: Optional[bool], written: list[Path]) -> dict[str, Any]:
    cfg = load_run_config(folder.root)
    device = resolve_device(cfg.run.device)
    ev, progress = cfg.eval, bool(cfg.run.progress)
    trained = load_exported(build_backbone(cfg, components), folder.export).to(device)  # a bad file fails first
    torch.manual_seed(cfg.run.seed)
    random_init = build_backbone(cfg, components).to(device)
    log.info("eval of %s on %s: building the train and test datasets", folder.root, device)
    train = subset(build_dataset(cfg, "train", components), ev.max_train, cfg.run.seed)
    test = subset(build_dataset(cfg, "test", components), ev.max_test, cfg.run.seed)
    log.info("%d train and %d test samples (eval.max_train=%d, eval.max_test=%d)", len(train), len(test), ev.max_train, ev.max_test)
    label = f"pre-trained ({cfg.recipe.name})"
    results = {name: probe(model, train, test, ev, device, name, progress)
               for name, model in ((label, trained), ("random init", random_init))}
    folder.eval.mkdir(parents=True, exist_ok=True)
    table = format_table(results, ev.knn_k, list(ev.labels))
    draw = ev.pictures if pictures is None else pictures
    summary = {"run": str(folder.root), "train_samples": len(train), "test_samples": len(test), "results": results,
               "retrieval": _retrievals(folder, cfg, components, trained, subset(test, ev.retrieval_samples, cfg.run.seed),
                                        device, progress, written if draw else None)}
    if ev.point_labels:
        summary["segmentation"] = {name: _segmentation(model, train, test, cfg, device, name)
                                   for name, model in ((label, trained), ("random init", random_init))}
    written.append(write_atomic(folder.eval / "results.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2))))
    if summary["retrieval"]:
        table += "\n\n" + format_retrieval(summary["retrieval"])
    if ev.point_labels:
        table += "\n\n" + format_segmentation(summary["segmentation"], _class_names(ev, summary["segmentation"]))
    written.append(write_atomic(folder.eval / "table.md", lambda tmp: tmp.write_text(table + "\n")))
    if draw:
        from .pictures import plot_loss_curve, plot_reconstructions

        log.info("pictures (loss curve, reconstructions) into %s", folder.eval)
        written.extend(p for p in [plot_loss_curve(folder)] if p is not None)
        written.extend(plot_reconstructions(folder, cfg, components, trained, test, device))
    summary["table"] = table
    return summary


def _segmentation(model: Backbone, train: Dataset, test: Dataset, cfg: Any, device: torch.device, name: str) -> dict[str, Any]:
    """The per-point segmentation probe of ``eval.point_labels`` on ``model``'s frozen tokens."""
    ev = cfg.eval
    x = {}
    for split, data in (("train", train), ("test", test)):
        log.info("%s: point features of the %s split (%s, up to %d points a frame)", name, split, ev.point_labels, ev.point_samples)
        x[split] = point_features(model, data, ev.point_labels, ev.batch_size, device, ev.point_sensor, ev.point_samples,
                                  cfg.run.seed)
    (xtr, ytr), (xte, yte) = x["train"], x["test"]
    classes = len(ev.point_classes) or int(max(ytr.max(), yte.max())) + 1
    if int(max(ytr.max(), yte.max())) >= classes:
        raise ValueError(f"{ev.point_labels} holds label {int(max(ytr.max(), yte.max()))} but eval.point_classes names "
                         f"{classes} classes")
    log.info("%s: segmentation probe on %d x %d point features, tested on %d points", name, *xtr.shape, len(xte))
    return segmentation_probe(xtr, ytr, xte, yte, classes, ev.probe_iters, ev.probe_l2)


def _class_names(ev: Any, results: dict[str, dict[str, Any]]) -> list[str]:
    count = len(next(iter(results.values()))["iou"])
    return list(ev.point_classes) or [str(i) for i in range(count)]


def _retrievals(folder: RunFolder, cfg: Any, components: Any, trained: Backbone, few: Dataset, device: torch.device,
                progress: bool, pictures: Optional[list[Path]] = None) -> dict[str, dict[str, float]]:
    """Retrieval of every finished stage's objective that embeds a partner (captions); with
    ``pictures``, each one's query and top-5 grid too (appended to it)."""
    out = {}
    for name, stage in cfg.recipe.stages.items():
        objectives = None
        for label, node, _ in objective_nodes(stage):
            if not hasattr(components.objective.entry(node["name"]).factory, "embed_partner"):
                continue
            objectives = objectives or stage_objectives(folder, components, trained, name, stage)
            if objectives is not None:
                log.info("retrieval of %s/%s, %d samples and their partners", name, label, len(few))
                out[f"{name}/{label}"] = retrieval(objectives[label], trained, few, cfg.eval.batch_size, device,
                                                   f"retrieval {name}/{label}" if progress else None)
                if pictures is not None:
                    from .pictures import plot_retrieval

                    grid = plot_retrieval(folder.eval / f"retrieval_{name}_{label}.png", objectives[label], trained, few, device)
                    pictures.extend([grid] if grid is not None else [])
    return out
