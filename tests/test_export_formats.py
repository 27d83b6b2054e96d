"""Deployment formats of a pre-trained encoder: ONNX (run with onnxruntime), a torch.export
program, a timm ViT state dict, and `anymodal.load_backbone` in a fresh process; each compared with
the encoder in eager mode on batches it was not traced on."""

import json
import subprocess
import sys

import pytest
import torch

from anymodal import load_backbone
from anymodal.core.build import build_backbone
from anymodal.core.config import compose
from anymodal.core.export import export_onnx, export_program
from anymodal.core.pretrained import PretrainedEncoder, example_input
from anymodal.core.timm_compat import import_timm
from anymodal.plugins.manager import load_components
from anymodal.plugins.audio.data import SMALL_SPOKEN_DIGITS
from helpers import anymodal

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
SMALL_AUDIO = [f"data.train.root={SMALL_SPOKEN_DIGITS}", f"data.test.root={SMALL_SPOKEN_DIGITS}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "run"
    anymodal("train", "tiny-test", "--run-dir", folder, "recipe.stages.pretrain.steps=6")
    return folder


@pytest.fixture(scope="module")
def encoder(run):
    return load_backbone(run)


@pytest.fixture(scope="module")
def batch(run, encoder):
    from anymodal.core.config import load_run_config

    x = example_input(load_run_config(run), encoder, 8)[0]
    return x[3:8]  # five samples: another batch size and other samples than the three the export checks on


def test_onnx_export_runs_in_onnxruntime_like_the_encoder(run, encoder, batch):
    proc = anymodal("export", run, "--format", "onnx")
    assert proc.stdout.splitlines()[-1] == f"exported {run / 'export' / 'encoder.onnx'}"
    assert "largest absolute error" in proc.stdout and proc.stderr == ""
    report = json.loads((run / "export" / "encoder.onnx.check.json").read_text())
    assert report["batch_sizes"] == [2, 3, 3] and max(report["max_abs_error"].values()) < 1e-4
    assert report["input_sizes"] == {"x": [[1, 65536], [1, 1], [16, 16], [16, 16]]}  # a dynamic batch of 1x16x16 digits
    session = onnxruntime.InferenceSession(str(run / "export" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    tokens, padding, features = session.run(None, {"x": batch.numpy()})
    with torch.no_grad():
        want = encoder.outputs(batch)
    assert tokens.shape == tuple(want[0].shape) and not padding.any()
    assert (torch.from_numpy(tokens) - want[0]).abs().max() < 1e-4
    assert (torch.from_numpy(features) - want[2]).abs().max() < 1e-4
    assert not list((run / "export").glob(".tmp-*"))


def test_torch_export_program_loads_and_matches(run, encoder, batch):
    anymodal("export", run, "--format", "torch")
    program = torch.export.load(str(run / "export" / "encoder.pt2")).module()
    with torch.no_grad():
        tokens, _, features = program(batch)
        assert torch.allclose(tokens, encoder(batch), atol=1e-5)
        assert torch.allclose(features, encoder.features(batch), atol=1e-5)


def test_timm_export_loads_strictly_into_timm(run, encoder, batch):
    timm = import_timm()
    anymodal("export", run, "--format", "timm")
    kwargs = json.loads((run / "export" / "timm_vit.json").read_text())
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    model.load_state_dict(load_file(run / "export" / "timm_vit.safetensors"), strict=True)
    with torch.no_grad():
        got = model.forward_features(batch)
        tokens = encoder(batch)
        start = 1 if kwargs["class_token"] else 0
        assert got.shape[1] == tokens.shape[1] + start
        assert (got[:, start:] - tokens).abs().max() < 1e-4
        assert (model.forward_head(got, pre_logits=True) - encoder.features(batch)).abs().max() < 1e-4


@pytest.mark.parametrize("pool,cls_token", [("cls", True), ("mean", False)])
def test_timm_export_of_other_pooling(tmp_path, pool, cls_token):
    """The class token's and the mean's pooling both carry over to timm's ``global_pool``."""
    from anymodal.core.export import export_timm

    timm = import_timm()
    cfg = compose("tiny-test", [f"model.pool={pool}", f"model.cls_token={str(cls_token).lower()}"]).cfg
    torch.manual_seed(0)
    encoder = PretrainedEncoder(build_backbone(cfg, load_components(cfg.plugins)), "digits").eval()
    report = export_timm(encoder.backbone, tmp_path)
    from safetensors.torch import load_file

    model = timm.create_model("vit_small_patch16_224", pretrained=False, **report["create_model_kwargs"]).eval()
    model.load_state_dict(load_file(tmp_path / "timm_vit.safetensors"), strict=True)
    x = example_input(cfg, encoder, 4)[0]
    with torch.no_grad():
        assert (model.forward_head(model.forward_features(x), pre_logits=True) - encoder.features(x)).abs().max() < 1e-4


def test_load_backbone_in_a_fresh_process(run, encoder, batch, tmp_path):
    """What a downstream user runs: no trainer, optimizer, evaluation or command-line code imported
    (the plugin registry's objectives are, as components), no timm or ONNX; the same features."""
    torch.save(batch, tmp_path / "batch.pt")
    script = (
        "import sys, torch, anymodal\n"
        f"encoder = anymodal.load_backbone({str(run)!r})\n"
        f"x = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        f"torch.save(encoder.features(x).detach(), {str(tmp_path / 'features.pt')!r})\n"
        "heavy = [m for m in sys.modules if m.startswith(('anymodal.core.trainer', 'anymodal.core.stage', "
        "'anymodal.core.schedule', 'anymodal.core.evaluate', 'anymodal.app', 'timm', 'onnx', 'submitit'))]\n"
        "assert not heavy, heavy\n"
        "print(encoder.modality, encoder.dim, encoder.input_key)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [encoder.modality, str(encoder.dim), encoder.input_key]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "features.pt"), encoder.features(batch))


def test_load_backbone_from_an_export_folder_and_a_checkpoint(run, encoder, batch, tmp_path):
    out = tmp_path / "deploy"
    anymodal("export", run, "--out", out)
    with torch.no_grad():
        want = encoder.features(batch)
        assert torch.equal(load_backbone(out).features(batch), want)
        assert torch.equal(load_backbone(run / "checkpoints" / "last.pt").features(batch), want)
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        load_backbone(tmp_path / "nothing")


def test_timm_export_of_a_non_image_run_is_one_error_line(tmp_path):
    folder = tmp_path / "audio"
    anymodal("train", "tiny-test", "--run-dir", folder, "modality=audio", "recipe.stages.pretrain.steps=2",
             "data.batch_size=4", *SMALL_AUDIO)
    proc = anymodal("export", folder, "--format", "timm", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anymodal export: error: timm export needs"), proc.stderr
    assert not (folder / "export" / "timm_vit.safetensors").exists()


def test_too_few_samples_for_a_batch_is_one_error_line(tmp_path):
    proc = anymodal("train", "tiny-test", "--run-dir", tmp_path / "r", "data.batch_size=5000", check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("INFO")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("anymodal train: error:") and "fewer than one batch of 5000" in lines[0]


MODALITIES = {
    "video": ["modality=video", "data.train.size=4", "data.test.size=4"],
    "audio, ragged": ["modality=audio", *SMALL_AUDIO],
    "lidar points": ["modality=lidar", "data.train.size=4", "data.test.size=4"],
    "lidar pillars": ["modality=lidar_sweep", "data.train.size=4", "data.test.size=4"],
    "scene camera": ["modality=street_scenes", "data.train.size=4", "data.test.size=4", "data.train.beams=8",
                     "data.test.beams=8", "data.train.azimuth_steps=64", "data.test.azimuth_steps=64", "+sensor=cam_front"],
}


@pytest.mark.parametrize("overrides", MODALITIES.values(), ids=MODALITIES.keys())
@pytest.mark.parametrize("writer", [export_onnx, export_program], ids=["onnx", "torch"])
def test_every_modality_exports(tmp_path, overrides, writer):
    sensor = next((o.split("=")[1] for o in overrides if o.startswith("+sensor=")), None)
    cfg = compose("tiny-test", [o for o in overrides if not o.startswith("+")] + ["data.batch_size=2"]).cfg
    torch.manual_seed(0)
    backbone = build_backbone(cfg, load_components(cfg.plugins)).eval()
    encoder = PretrainedEncoder(backbone, str(cfg.modality.name), sensor)
    samples = example_input(cfg, encoder, 4)
    report = writer(encoder, tuple(t[:2] for t in samples), tmp_path, [samples])
    assert report["batch_sizes"] == [2, 3, 4]
    assert max(report["max_abs_error"].values()) < 1e-4, report
    assert (tmp_path / report["file"]).is_file() and not list(tmp_path.glob(".tmp-*"))
    if writer is export_onnx:  # onnxruntime's CPU ScatterND add races on repeated indices across threads
        import onnx
        nodes = onnx.load(str(tmp_path / report["file"])).graph.node
        assert not [n.name for n in nodes if n.op_type == "ScatterND"
                    and any(a.name == "reduction" and a.s != b"none" for a in n.attribute)]


def test_export_of_an_unknown_sensor_is_one_error_line(run):
    proc = anymodal("export", run, "--format", "torch", "--sensor", "cam_rear", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("anymodal export: error: --sensor cam_rear:") and "sensors: image" in lines[0]
