"""`model.init`: a run starts from weights trained elsewhere (an anymodal export, run or checkpoint; a
timm ViT checkpoint), loading what fits, interpolating position tables to a new grid, and reporting
the rest; bad sources are one error line and run no code."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from anymodal.core.build import build_backbone
from anymodal.core.config import compose
from anymodal.core.init_weights import InitError, init_backbone
from anymodal.core.timm_compat import import_timm
from anymodal.plugins.manager import load_components
from helpers import anymodal

TINY = ["recipe.stages.pretrain.steps=2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A short run on digits: its folder, export and checkpoint are init sources."""
    folder = tmp_path_factory.mktemp("init") / "source"
    anymodal("train", "tiny-test", "--run-dir", folder, "recipe.stages.pretrain.steps=4")
    return folder


def _backbone(*overrides):
    cfg = compose("tiny-test", list(overrides)).cfg
    return build_backbone(cfg, load_components(cfg.plugins))


def _errors(proc):
    return [line for line in proc.stderr.strip().splitlines() if not line.startswith(("INFO", "WARNING"))]


@pytest.mark.parametrize("where", ["export", "run", "checkpoint"])
def test_init_from_anymodal_weights_loads_every_tensor(source, where):
    path = {"export": source / "export", "run": source, "checkpoint": source / "checkpoints" / "last.pt"}[where]
    torch.manual_seed(1)
    backbone = _backbone()
    report = init_backbone(backbone, str(path))
    want = load_file(source / "export" / "backbone.safetensors")
    assert report.layout == "anymodal" and len(report.loaded) == len(want)
    assert not (report.missing or report.unexpected or report.skipped or report.resized)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_a_run_starts_from_init_and_records_it(source, tmp_path):
    run = tmp_path / "run"
    proc = anymodal("train", "tiny-test", "--run-dir", run, *TINY, f"model.init={source / 'export'}")
    assert "30 tensors loaded, 0 resized, 0 skipped for their shape, 0 missing, 0 unused" in proc.stderr
    report = json.loads((run / "init.json").read_text())
    assert report["layout"] == "anymodal" and len(report["loaded"]) == 30 and report["missing"] == []
    # the first loss is the pre-trained encoder's, not a random one's: lower than a run from scratch
    scratch = tmp_path / "scratch"
    anymodal("train", "tiny-test", "--run-dir", scratch, *TINY)
    first = [json.loads(line)["loss"] for line in ((r / "metrics.jsonl").read_text().splitlines()[0] for r in (run, scratch))]
    assert first[0] < first[1], first


def test_resume_reads_the_checkpoint_not_the_init(source, tmp_path):
    """A resumed run continues from its checkpoint: the init file may be gone by then."""
    init = tmp_path / "init.safetensors"
    init.write_bytes((source / "export" / "backbone.safetensors").read_bytes())
    run = tmp_path / "run"
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=4", "run.checkpoint_every=2",
             f"model.init={init}")
    init.unlink()
    anymodal("train", "tiny-test", "--run-dir", run, "recipe.stages.pretrain.steps=6", "run.checkpoint_every=2",
             f"model.init={init}", "--resume", "--allow-changes")


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A timm ViT on 1-channel 32x32 images (8x8 patches of 4) with the tiny-test encoder's width and
    depth and a 10-class head, its weights nudged off their init, saved as timm saves them."""
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, in_chans=1,
                              embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("timm")
    save_file(model.state_dict(), folder / "model.safetensors")
    torch.save({"model": model.state_dict(), "epoch": 3}, folder / "checkpoint.pth")
    return model, folder


@pytest.mark.parametrize("file", ["model.safetensors", "checkpoint.pth"])
def test_init_from_timm_resizes_the_position_table(timm_checkpoint, file):
    model, folder = timm_checkpoint
    backbone = _backbone("model.posenc=learned")  # digits: 16x16 images, a 4x4 grid of patches
    report = init_backbone(backbone, str(folder / file))
    assert report.layout == "timm"
    assert report.resized == ["encoder.posenc.table: (64, 64) -> (16, 64)"]
    assert sorted(report.unexpected) == ["head.bias", "head.weight"] and report.missing == report.skipped == []
    state = backbone.state_dict()
    timm_state = model.state_dict()
    assert torch.equal(state["encoder.blocks.1.attn.qkv.weight"], timm_state["blocks.1.attn.qkv.weight"])
    assert torch.equal(state["tokenizer.proj.weight"], timm_state["patch_embed.proj.weight"])
    grid = timm_state["pos_embed"][0, 1:].reshape(8, 8, 64).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)[0]
    assert torch.allclose(state["encoder.posenc.table"], want.permute(1, 2, 0).reshape(16, 64), atol=1e-6)


def test_sincos_backbone_reports_the_unused_table(timm_checkpoint):
    _, folder = timm_checkpoint
    report = init_backbone(_backbone(), str(folder / "model.safetensors"))
    assert "encoder.posenc.table" in report.unexpected and report.loaded


def test_weights_of_another_model_are_one_error_line(source, tmp_path):
    proc = anymodal("train", "tiny-test", "--run-dir", tmp_path / "r", *TINY, "model.dim=32",
                    f"model.init={source / 'export'}", check=False)
    errors = _errors(proc)
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert errors[0].startswith("anymodal train: error: model.init") and "weights of another model" in errors[0]
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("source_text, why", [
    ("{tmp}/nothing.safetensors", "no such file or folder"),
    ("{tmp}", "holds no backbone.safetensors"),
    ("timm:vit_tiny_patch16_224.augreg_in21k", "cannot get model.safetensors of timm/vit_tiny_patch16_224.augreg_in21k"),
])
def test_unreadable_sources_are_one_error_line(tmp_path, source_text, why):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # no cached copy, no network
    proc = anymodal("train", "tiny-test", "--run-dir", tmp_path / "r", *TINY,
                    f"model.init={source_text.format(tmp=tmp_path)}", env_extra=env, check=False)
    errors = _errors(proc)
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert errors[0].startswith("anymodal train: error: model.init") and why in errors[0], errors[0]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    marker, crafted = tmp_path / "pwned", tmp_path / "evil.pth"
    with open(crafted, "wb") as f:
        pickle.dump({"model": Payload(marker)}, f)
    with pytest.raises(InitError, match="cannot be read"):
        init_backbone(_backbone(), str(crafted))
    assert not marker.exists()


def test_init_from_scratch_returns_to_the_init_weights(tmp_path):
    """A later stage with ``init_from: scratch`` starts again from the ``model.init`` weights."""
    first = tmp_path / "first"
    anymodal("train", "tiny-two-stage", "--run-dir", first, "recipe.stages.*.steps=2")
    run = tmp_path / "run"
    anymodal("train", "tiny-two-stage", "--run-dir", run, "recipe.stages.contrastive.steps=2",
             "recipe.stages.distill.steps=1", "recipe.stages.distill.init_from=scratch",
             "recipe.stages.distill.optim.lr=0.0", "recipe.stages.distill.optim.warmup_steps=0", f"model.init={first}")
    from anymodal.core.checkpoint import load_checkpoint

    init = load_file(first / "export" / "backbone.safetensors")
    second = load_checkpoint(run / "checkpoints" / "distill-final.pt")["backbone"]
    assert init.keys() == second.keys()
    for key in init:
        assert torch.equal(second[key], init[key]), key
