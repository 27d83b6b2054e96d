"""``anymodal plugin new NAME``: write the skeleton of an outside sensor plugin package.

The skeleton is a working package: an entry point in the ``anymodal`` group, hook implementations
targeting plugin API 1, a tokenizer producing ``Tokens`` (a multichannel signal cut into chunks),
a dataset of generated signals with labels and captions, a modality config, and a test that loads
the plugin (so its tokenizer passes the contract check) and trains it a few steps.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

__all__ = ["new_plugin", "next_steps", "NAME_PATTERN"]

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")

_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "anymodal-$name"
version = "0.1.0"
description = "The $name sensor for anymodal."
requires-python = ">=3.10"
dependencies = ["anymodal"]

[project.entry-points.anymodal]
$name = "anymodal_$name"

[tool.setuptools]
packages = ["anymodal_$name"]

[tool.setuptools.package-data]
"anymodal_$name" = ["configs/*.yaml", "configs/*/*.yaml"]
'''

_INIT = '''\
"""anymodal plugin: the $name sensor (plugin API 1, see anymodal.plugins.hookspecs)."""

from pathlib import Path

from anymodal.plugins import hookimpl

from .dataset import ${title}Signals
from .tokenizer import ${title}Tokenizer

ANYMODAL_API = 1
CONFIG = Path(__file__).parent / "configs" / "$name.yaml"  # anymodal train <CONFIG>


@hookimpl
def register_tokenizers():
    return {"${name}_chunks": ${title}Tokenizer}


@hookimpl
def register_datasets():
    return {"${name}_signals": ${title}Signals}
'''

_TOKENIZER = '''\
"""Signals [B, T, C] -> one token per chunk of ``chunk`` time steps."""

import torch
from torch import nn

from anymodal.core.tokens import Tokens


class ${title}Tokenizer(nn.Module):
    """Chunks of ``chunk`` steps embedded linearly; positions are chunk indices, targets the raw chunks."""

    pos_axes = 1

    def __init__(self, dim, length=64, channels=2, chunk=8, input_key="$name"):
        super().__init__()
        self.dim, self.chunk, self.channels, self.input_key = dim, chunk, channels, input_key
        self.grid_size = (length // chunk,)
        self.target_dim = chunk * channels
        self.embed = nn.Linear(self.target_dim, dim)

    @classmethod
    def example_input(cls, batch_size):
        """Samples the load-time contract check runs this tokenizer on."""
        from .dataset import ${title}Signals

        data = ${title}Signals("train", size=batch_size)
        return [data[i] for i in range(batch_size)]

    def forward(self, x, padding=None):
        b, t, c = x.shape
        chunks = x[:, : t - t % self.chunk].reshape(b, -1, self.chunk * c).float()
        pos = torch.arange(chunks.shape[1], device=x.device).reshape(1, -1, 1).expand(b, -1, -1)
        return Tokens(x=self.embed(chunks), pos=pos, targets=chunks, modality="$name")
'''

_DATASET = '''\
"""Generated $name signals: noisy sines whose frequency is the class."""

import math

import torch
from torch.utils.data import Dataset

CLASSES = ["slow", "medium", "fast"]


class ${title}Signals(Dataset):
    """``size`` signals ``[length, 2]`` (a sine and its cosine); label = frequency class."""

    def __init__(self, split, size=256, length=64, seed=0):
        self.size, self.length, self.seed = size, length, seed * 2 + (split == "test")

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % len(CLASSES)
        t = torch.arange(self.length) / self.length
        phase = 2 * math.pi * (t * 2 ** (label + 1) + torch.rand(1, generator=g))
        signal = torch.stack([phase.sin(), phase.cos()], -1) + 0.1 * torch.randn(self.length, 2, generator=g)
        return {"$name": signal, "label": label, "text": f"a {CLASSES[label]} $name signal"}
'''

_MODALITY = '''\
modality:
  name: $name
  tokenizer:
    name: ${name}_chunks
    length: 64
    channels: 2
    chunk: 8
  masker:
    name: random
    ratio: 0.5
data:
  train: {name: ${name}_signals, split: train}
  test: {name: ${name}_signals, split: test, size: 96}
  transforms: []
'''

_CONFIG = '''\
# anymodal train <this file>: a seconds-long MAE run on the generated $name signals
defaults:
  model: cpu
  modality: $name  # configs/modality/$name.yaml beside this file
  recipe: mae
run: {name: $name, log_every: 1, checkpoint_every: 100, progress: false, tensorboard: false}
model: {dim: 32, depth: 1, num_heads: 2}
data: {batch_size: 16}
recipe:
  stages:
    "*": {steps: 3}
eval: {probe_iters: 20}
'''

_TEST = '''\
"""The $name plugin: its tokenizer passes anymodal's load-time contract check, and it trains."""

import subprocess
import sys

import anymodal_$name
from anymodal.core.data import collate
from anymodal.plugins import load_components


def test_registered_and_checked():
    components = load_components(["anymodal_$name"], autoload=False)
    assert components.tokenizer.entry("${name}_chunks").plugin == "anymodal_$name"
    assert "${name}_signals" in components.dataset


def test_tokens():
    tok = anymodal_$name.${title}Tokenizer(dim=32)
    tokens = tok(collate(tok.example_input(4))["$name"])
    assert tokens.x.shape == (4, 8, 32) and tokens.targets.shape == (4, 8, tok.target_dim)


def test_trains(tmp_path):
    # plugins= loads it from source too; installed, the entry point has loaded it already
    proc = subprocess.run([sys.executable, "-m", "anymodal", "train", str(anymodal_$name.CONFIG),
                           "plugins=[anymodal_$name]", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
'''

_README = '''\
# anymodal-$name

The $name sensor for anymodal: a tokenizer (`${name}_chunks`) and a
generated dataset (`${name}_signals`), registered through the `anymodal` entry point.

```bash
pip install -e .
anymodal plugins                               # lists ${name}_chunks from $name (anymodal-$name 0.1.0)
anymodal train anymodal_$name/configs/$name.yaml --run-dir runs/$name   # a seconds-long MAE run
anymodal eval runs/$name --no-pictures         # linear probe and k-NN of the frequency class
anymodal train tiny-two-stage modality=$name recipe=videoprism --run-dir runs/$name-vp  # any recipe
```

Its tests need pytest (`scripts/install.sh --dev` in anymodal's checkout installs it; otherwise
`pip install pytest`): `python -m pytest -q tests`.

Replace the dataset with your recordings and the tokenizer with your own; keep `example_input`,
which anymodal uses to check the tokenizer's output when it loads the plugin.
'''


def next_steps(root: Path) -> str:
    """What to run after ``new_plugin`` wrote ``root``: commands that work after a plain install of
    anymodal (``scripts/install.sh``, no test tools); the package's own tests last, with pytest."""
    root = Path(root)
    name = root.name.removeprefix("anymodal-")
    shown = root.as_posix() if root.is_absolute() or root.as_posix().startswith(".") else f"./{root.as_posix()}"
    config = f"{shown}/anymodal_{name}/configs/{name}.yaml"
    return "\n".join([
        f"wrote {shown}",
        "next:",
        f"  pip install -e {shown}",
        f"  anymodal plugins                    # lists {name}_chunks from {name} (anymodal-{name} 0.1.0)",
        f"  anymodal train {config} --run-dir runs/{name}",
        f"  anymodal eval runs/{name} --no-pictures",
        f"its tests, with pytest (pip install pytest): python -m pytest -q {shown}/tests",
    ])


def new_plugin(name: str, folder: Path) -> Path:
    """Write the package ``anymodal-<name>`` under ``folder``; return its root.

    Raises:
        ValueError: ``name`` is not a lower-case identifier.
        FileExistsError: the package folder already exists.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"plugin name {name!r} must be a lower-case identifier (letters, digits, _; a letter first)")
    root = Path(folder) / f"anymodal-{name}"
    if root.exists():
        raise FileExistsError(f"{root} already exists; choose another name or --dir")
    package = root / f"anymodal_{name}"
    files = {
        root / "pyproject.toml": _PYPROJECT, root / "README.md": _README, root / "tests" / f"test_{name}.py": _TEST,
        package / "__init__.py": _INIT, package / "tokenizer.py": _TOKENIZER, package / "dataset.py": _DATASET,
        package / "configs" / f"{name}.yaml": _CONFIG, package / "configs" / "modality" / f"{name}.yaml": _MODALITY,
    }
    title = "".join(part.title() for part in name.split("_"))
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(name=name, title=title))
    return root
