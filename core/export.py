"""Export a pre-trained backbone: safetensors plus the config that rebuilds it (anymodal's own
format), an ONNX graph checked with onnxruntime, a ``torch.export`` program, or a timm ViT state dict."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Backbone
from .checkpoint import CheckpointError, load_model_state
from .runfolder import RunFolder

__all__ = ["export_backbone", "load_exported", "read_exported", "export_onnx", "export_program", "export_timm", "FORMATS"]

WEIGHTS = "backbone.safetensors"
CONFIG = "config.yaml"
ONNX, PROGRAM, TIMM_WEIGHTS, TIMM_ARGS = "encoder.onnx", "encoder.pt2", "timm_vit.safetensors", "timm_vit.json"
FORMATS = ("safetensors", "onnx", "torch", "timm")
_REPEATS = 4  # runs of each checked input


def export_backbone(backbone: Backbone, cfg: DictConfig, folder: Path) -> Path:
    """Write ``backbone.safetensors`` and ``config.yaml`` (model, modality, plugins) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "anymodal-backbone", "modality": str(cfg.modality.name)})
    tmp.replace(folder / WEIGHTS)
    part = OmegaConf.create({"plugins": cfg.plugins, "model": cfg.model, "modality": cfg.modality})
    (folder / CONFIG).write_text(OmegaConf.to_yaml(part, resolve=True))
    return folder / WEIGHTS


def load_exported(backbone: Backbone, folder: Path) -> Backbone:
    """Load exported weights into a backbone built from the same model and modality config."""
    path = Path(folder) / WEIGHTS
    load_model_state(backbone, read_exported(path), f"exported backbone {path}")
    return backbone


def read_exported(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an exported ``backbone.safetensors``.

    Raises:
        CheckpointError: the file is missing, or corrupt or truncated (the message says how to write it again).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported backbone {path} does not exist; {_export_again(path.parent)}")
    try:
        return load_file(str(path))
    except SafetensorError as e:  # the header or the tensors it lists do not fit the file
        raise CheckpointError(f"exported backbone {path} is corrupt or truncated ({e}); {_export_again(path.parent)}") from e


def _export_again(folder: Path) -> str:
    if folder.name == "export" and RunFolder(folder.parent).config.is_file():  # a run folder's export/
        return f"write it from the run's last checkpoint with: anymodal export {folder.parent}"
    return f"write it from a run's checkpoint with: anymodal export RUN_DIR --out {folder}"


def _dynamic_shapes(encoder: Any, example: tuple[Tensor, ...]) -> tuple[dict[int, Any], ...]:
    """A dynamic batch dimension for every input; ragged input also a dynamic length."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 16)
    if len(example) == 1:
        return ({0: batch},)
    # the length's range is the tokenizer's to set (a longest clip, a smallest cloud): inferred
    return ({0: batch, 1: Dim.DYNAMIC}, {0: batch, 1: Dim.DYNAMIC})


def _checks(run: Any, encoder: Any, example: tuple[Tensor, ...], others: Sequence[tuple[Tensor, ...]] = ()) -> dict[str, Any]:
    """``run(*inputs) -> (tokens, token_padding, features)`` against the encoder in eager mode, on
    the example, on the example and one sample more (the dynamic batch dimension in use) and on
    ``others``: the largest absolute errors, over real tokens (a padding token's output means nothing).
    Each input is run `_REPEATS` times and must give the same bits each time: a runtime kernel that
    races on duplicate scatter indices (onnxruntime's multi-threaded ScatterND add) differs between runs."""
    worst = {"tokens": 0.0, "features": 0.0}
    sizes = []
    for inputs in (example, tuple(torch.cat([t, t[:1]]) for t in example), *others):
        with torch.no_grad():
            tokens, token_padding, features = encoder.outputs(*inputs)
        got = [torch.as_tensor(t) for t in run(*inputs)]
        for _ in range(_REPEATS - 1):
            if not all(torch.equal(a, torch.as_tensor(b)) for a, b in zip(got, run(*inputs))):
                raise RuntimeError(f"the exported graph gives different outputs on one batch of {int(inputs[0].shape[0])} "
                                   f"run twice (a nondeterministic kernel in the runtime)")
        for name, a, b in zip(("tokens", "token_padding", "features"), got, (tokens, token_padding, features)):
            if tuple(a.shape) != tuple(b.shape):
                raise RuntimeError(f"the exported {name} have shape {tuple(a.shape)}, the encoder's {tuple(b.shape)}")
        if not torch.equal(got[1], token_padding):
            raise RuntimeError("the exported graph pads other tokens than the encoder")
        worst["tokens"] = max(worst["tokens"], float((got[0] - tokens)[~token_padding].abs().max()))
        worst["features"] = max(worst["features"], float((got[2] - features).abs().max()))
        sizes.append(int(inputs[0].shape[0]))
    return {"max_abs_error": worst, "batch_sizes": sizes, "input_shape": list(example[0].shape[1:]),
            "inputs": ["x", "padding"][:len(example)], "outputs": ["tokens", "token_padding", "features"]}


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' own chatter (hundreds of INFO lines of graph passes, warnings about optional
    torchvision ops) kept off the user's terminal; errors still raise."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _input_ranges(program: Any) -> dict[str, list[list[Any]]]:
    """Per input, per dimension, the sizes the graph was exported for: ``[n, n]`` for a fixed one,
    ``[lowest, highest]`` for a dynamic one (``None``: no upper bound). The graph took one branch
    of any code that depends on a size (the points tokenizer's exact kNN up to 8192 points): a size
    outside is refused by a ``torch.export`` program and unchecked in ONNX."""
    from torch.utils._sympy.numbers import int_oo

    names = set(program.graph_signature.user_inputs)
    ranges: dict[str, list[list[Any]]] = {}
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        dims = []
        for size in node.meta["val"].shape:
            if isinstance(size, torch.SymInt):
                bound = program.range_constraints[size.node.expr]
                upper = None if bound.upper == int_oo else int(bound.upper)
                dims.append([int(bound.lower), upper])
            else:
                dims.append([int(size), int(size)])
        ranges[node.name] = dims
    return ranges


class _AllOutputs(nn.Module):
    """An encoder's ``outputs`` (see `PretrainedEncoder`) as ``forward``: the graph exporters trace ``forward``."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor, padding: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        return self.encoder.outputs(x, padding)


def export_onnx(encoder: Any, example: tuple[Tensor, ...], folder: Path,
                others: Sequence[tuple[Tensor, ...]] = ()) -> dict[str, Any]:
    """``encoder.onnx`` (torch's dynamo exporter; inputs ``x`` [and ``padding``], outputs ``tokens``,
    ``token_padding`` and ``features``, dynamic batch), run with onnxruntime against the encoder: the report
    (largest absolute errors, see `_checks`; ``others``: more inputs to check on) is also written to
    ``encoder.onnx.check.json``.

    Raises:
        ImportError: onnx, onnxscript or onnxruntime missing (``pip install 'anymodal[export]'``).
    """
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise ImportError(f"ONNX export needs {module}: pip install 'anymodal[export]'") from None
    import onnxruntime

    def save(path: Path) -> dict[str, Any]:
        graph = torch.onnx.export(_AllOutputs(encoder).eval(), example, input_names=["x", "padding"][:len(example)],
                                  output_names=["tokens", "token_padding", "features"],
                                  dynamic_shapes=_dynamic_shapes(encoder, example), dynamo=True, verbose=False)
        graph.save(str(path))
        return {"input_sizes": _input_ranges(graph.exported_program)}

    def runner(path: Path) -> Callable[..., list[Tensor]]:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *inputs: [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]

    return _write_checked(Path(folder), ONNX, save, runner, {"format": "onnx", "onnxruntime": onnxruntime.__version__},
                          encoder, example, others)


def export_program(encoder: Any, example: tuple[Tensor, ...], folder: Path,
                   others: Sequence[tuple[Tensor, ...]] = ()) -> dict[str, Any]:
    """``encoder.pt2``: a ``torch.export`` ExportedProgram (dynamic batch), loaded back with
    ``torch.export.load`` and checked against the encoder (``encoder.pt2.check.json``)."""
    def save(path: Path) -> dict[str, Any]:
        program = torch.export.export(_AllOutputs(encoder).eval(), example, dynamic_shapes=_dynamic_shapes(encoder, example))
        torch.export.save(program, str(path))
        return {"input_sizes": _input_ranges(program)}

    def runner(path: Path) -> Callable[..., list[Tensor]]:
        loaded = torch.export.load(str(path)).module()

        def run(*inputs: Tensor) -> list[Tensor]:
            with torch.no_grad():
                return list(loaded(*inputs))
        return run

    return _write_checked(Path(folder), PROGRAM, save, runner, {"format": "torch", "torch": torch.__version__},
                          encoder, example, others)


def _write_checked(folder: Path, name: str, save: Callable[[Path], dict[str, Any]], runner: Callable[[Path], Callable[..., Any]],
                   report: dict[str, Any], encoder: Any, example: tuple[Tensor, ...],
                   others: Sequence[tuple[Tensor, ...]]) -> dict[str, Any]:
    """``save`` the graph to a temporary name (it returns what it adds to the report), check what
    ``runner`` makes of it against the encoder, and only then give it ``name`` and write the report
    beside it (``NAME.check.json``): a failed export or check leaves no file behind."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{name}"  # the ending kept: torch.export.save wants .pt2
    try:
        with _quiet_exporters():
            saved = save(tmp)
        report = {**report, "file": name, **saved, **_checks(runner(tmp), encoder, example, others)}
        tmp.replace(folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    (folder / f"{name}.check.json").write_text(json.dumps(report, indent=2))
    return report


def export_timm(backbone: Backbone, folder: Path) -> dict[str, Any]:
    """``timm_vit.safetensors`` and ``timm_vit.json`` (the ``timm.create_model`` kwargs) for an
    image backbone; see `anymodal.core.timm_compat.timm_vit_from_backbone`."""
    from .timm_compat import timm_vit_from_backbone

    state, kwargs = timm_vit_from_backbone(backbone)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{TIMM_WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "timm-vit"})
    tmp.replace(folder / TIMM_WEIGHTS)
    (folder / TIMM_ARGS).write_text(json.dumps(kwargs, indent=2))
    return {"format": "timm", "file": TIMM_WEIGHTS, "create_model_kwargs": kwargs}
