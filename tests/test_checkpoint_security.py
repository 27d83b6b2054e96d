"""Loading a checkpoint runs no code from it: crafted files at every entry point that loads one.

Each hostile file carries a pickle whose loading would create a marker file (``os.system``). A
safe loader refuses it with one clear error line; the marker never appears.
"""

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from anymodal.core.checkpoint import CheckpointError, load_checkpoint, read_weights_file, save_atomic, shard_folder
from helpers import anymodal


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sec") / "run"
    anymodal("train", "tiny-test", "--run-dir", folder, "recipe.stages.pretrain.steps=4", "run.checkpoint_every=2")
    return folder


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a crafted checkpoint ran code"


def _run_copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _sharded_pointer(run: Path, shards: str) -> Path:
    """``last.pt`` as FSDP writes it: plain data that passes ``weights_only``, naming a shard folder."""
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    pointer = {k: state[k] for k in ("stage", "step", "scaler", "rng")}
    save_atomic({**pointer, "shards": shards}, run / "checkpoints" / "last.pt")
    return run / "checkpoints" / "last.pt"


def _evil_metadata(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def _every_loader(run: Path) -> list[list[str]]:
    return [["export", run, "--out", run / "exported"],
            ["export", run, "--checkpoint", run / "checkpoints" / "last.pt", "--out", run / "exported"],
            ["train", "--resume", "--run-dir", run]]


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink", "not-a-string"])
def test_shard_folder_outside_the_checkpoints_is_refused(tmp_path, marker, where):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "shards-pretrain-00000002"
    _evil_metadata(outside, marker)
    names = {"absolute": str(outside), "dotdot": "shards-x/../../../elsewhere/shards-pretrain-00000002",
             "symlink": "shards-link", "not-a-string": ["shards-pretrain-00000002"]}
    (checkpoints / "shards-link").symlink_to(outside)
    with pytest.raises(CheckpointError, match="refusing to read it"):
        shard_folder(checkpoints / "last.pt", {"shards": names[where]})


def test_every_command_refuses_a_shard_folder_outside_the_run(run, tmp_path, marker):
    run = _run_copy(run, tmp_path)
    outside = tmp_path / "elsewhere"
    _evil_metadata(outside, marker)
    _sharded_pointer(run, str(outside))
    for args in _every_loader(run):
        proc = anymodal(*args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "refusing to read it" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_metadata_naming_files_outside_its_folder_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    from anymodal.core.parallel import load_backbone_from_shards

    folder = tmp_path / "shards-a-00000001"
    net = torch.nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... saving in a single process"
        dcp.save({"model": {f"backbone.{k}": v for k, v in net.state_dict().items()}}, checkpoint_id=str(folder))
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # written by us a moment ago: trusted here
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="not a file of its own folder"):
        load_backbone_from_shards(folder, net)


def test_crafted_non_tensor_value_in_shards_is_refused(tmp_path, marker):
    """DCP's own planner loads non-tensor values with weights_only=False; ours does not."""
    import torch.distributed.checkpoint as dcp

    from anymodal.core.parallel import _load

    folder = tmp_path / "shards-a-00000001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.zeros(3), "lr": Payload(marker)}, checkpoint_id=str(folder))
        with pytest.raises(CheckpointError, match="cannot be read safely"):
            _load({"w": torch.ones(3), "lr": 0.1}, folder)
        assert not marker.exists()
        dcp.load({"w": torch.ones(3), "lr": 0.1}, checkpoint_id=str(folder))  # the attack is real: torch's loader runs it
    assert marker.exists()
    marker.unlink()


def test_sharded_checkpoint_round_trip_through_the_safe_reader(tmp_path):
    """What save_shards writes, the safe reader and planner load: tensors and plain values."""
    import torch.distributed.checkpoint as dcp

    from anymodal.core.parallel import _load

    folder = tmp_path / "shards-a-00000001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(3.0), "group": {"lr": 0.5, "betas": (0.9, 0.95), "name": None}},
                 checkpoint_id=str(folder))
        state = {"w": torch.zeros(3), "group": {"lr": 0.0, "betas": (0.0, 0.0), "name": "x"}}
        _load(state, folder)
    assert torch.equal(state["w"], torch.arange(3.0))
    assert state["group"] == {"lr": 0.5, "betas": (0.9, 0.95), "name": None}


def test_crafted_whole_checkpoints_are_refused_at_every_entry_point(run, tmp_path, marker):
    run = _run_copy(run, tmp_path)
    evil = pickle.dumps(Payload(marker))
    (run / "checkpoints" / "last.pt").write_bytes(evil)
    for args in _every_loader(run):
        proc = anymodal(*args, check=False)
        assert proc.returncode == 2 and "cannot be read" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # eval and the stage teacher read the stage's final checkpoint
    (run / "checkpoints" / "pretrain-final.pt").write_bytes(evil)
    proc = anymodal("eval", run, "--no-pictures", "eval.max_train=64", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_stage_and_timm_teachers_refuse_crafted_files(run, tmp_path, marker):
    from anymodal.core.build import build_backbone
    from anymodal.core.config import load_run_config
    from anymodal.core.runfolder import RunFolder
    from anymodal.core.teachers import StageTeacher
    from anymodal.plugins import load_components

    evil = tmp_path / "teacher.pt"
    evil.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_weights_file(evil)  # what the timm teacher's `checkpoint:` goes through
    folder = RunFolder(tmp_path / "r")
    folder.checkpoints.mkdir(parents=True)
    folder.final("first").write_bytes(evil.read_bytes())
    student = build_backbone(load_run_config(run), load_components(autoload=False))
    with pytest.raises(CheckpointError, match="cannot be read"):
        StageTeacher(student, folder, "first")
    save_atomic({"weights": torch.zeros(2)}, folder.final("first"))  # plain data, but not a stage's final weights
    with pytest.raises(CheckpointError, match="has no 'backbone' entry"):
        StageTeacher(student, folder, "first")
