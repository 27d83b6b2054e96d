"""A dry run of one small batch through the stage (tokenizer, masker, objectives) before the first step:
a batch field nobody provides, or a plugin's objective that fails, is one clear error line at once."""

from helpers import anymodal

OBJECTIVE = '''
import torch
from torch import nn
from anymodal.plugins import hookimpl
from anymodal.core.objective import ObjectiveOutput


class NeedsDepth(nn.Module):
    def __init__(self, dim, tokenizer):
        super().__init__()
        self.head = nn.Linear(dim, 1)

    def forward(self, batch, student, teacher=None):
        depth = batch.raw["depth"]  # a field the digits dataset does not have
        return ObjectiveOutput(self.head(depth).mean(), {})


class Broken(nn.Module):
    def __init__(self, dim, tokenizer):
        super().__init__()

    def forward(self, batch, student, teacher=None):
        raise ValueError("this objective is broken")


@hookimpl
def register_objectives():
    return {"needs_depth": NeedsDepth, "broken": Broken}
'''


def _train(tmp_path, objective):
    (tmp_path / "depthplug.py").write_text(OBJECTIVE)
    return anymodal("train", "tiny-test", "--run-dir", tmp_path / "run", "plugins=[depthplug]",
                    f"recipe.stages.pretrain.objectives={{{objective}: {{}}}}", check=False,
                    env_extra={"PYTHONPATH": str(tmp_path)})


def test_missing_batch_field_is_named_before_training(tmp_path):
    proc = _train(tmp_path, "needs_depth")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "needs batch field 'depth'" in proc.stderr and "image" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step ran


def test_plugin_objective_failure_names_its_file_and_line(tmp_path):
    proc = _train(tmp_path, "broken")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "plugin 'depthplug'" in proc.stderr and "this objective is broken" in proc.stderr, proc.stderr
    assert "depthplug.py:" in proc.stderr


DATASET = '''
import torch
from anymodal.core.errors import DataError
from anymodal.plugins import hookimpl


class Flaky:
    """64 images; sample 40 is unreadable (as a file that went bad after the scan)."""

    def __init__(self, split="train"):
        pass

    def __len__(self):
        return 64

    def __getitem__(self, index):
        if index == 40:
            raise DataError("sample 40 of the flaky set cannot be read")
        return {"image": torch.rand(1, 16, 16), "label": index % 10}


@hookimpl
def register_datasets():
    return {"flaky": Flaky}
'''


def test_user_error_in_a_loader_worker_is_one_line(tmp_path):
    (tmp_path / "flakyplug.py").write_text(DATASET)
    proc = anymodal("train", "tiny-test", "--run-dir", tmp_path / "run", "plugins=[flakyplug]",
                    "data.train={name: flaky, _replace_: true}", "data.num_workers=1", "data.batch_size=64",
                    check=False, env_extra={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["anymodal train: error: sample 40 of the flaky set cannot be read"], proc.stderr
    assert "Traceback" not in proc.stderr
