"""Plugins: discovery through a really installed entry point and through the config's ``plugins:``
list, every way a plugin can break the contract (each a ``PluginError`` naming the plugin), and the
registry's errors for unknown names and misspelled factory arguments.

Nothing is mocked: the entry-point package is built and installed by pip into a temporary target
folder, and the command line runs in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from anymodal.core.registry import UnknownNameError
from anymodal.core.tokens import Tokens
from anymodal.plugins import PluginError, load_components
from anymodal.plugins.manager import DISABLE_AUTOLOAD_ENV, KINDS

PLUGIN_PACKAGE = "anymodal_testplug"
PLUGIN_NAME = "testplug"

# A small plugin following the contracts in hookspecs.py and core/masking.py.
PLUGIN_SOURCE = '''
"""Test plugin: a deterministic masker and an intensity-inverting transform."""

import torch

from anymodal.core.masking import Mask
from anymodal.plugins import hookimpl


class EveryOther:
    """Each sample's real tokens in order: even places visible, odd places targets."""

    def __call__(self, tokens, generator):
        valid = tokens.valid()
        n_real = int(valid.sum(1).min())
        order = (~valid).float().argsort(dim=1, stable=True)[:, :n_real]  # real tokens first, in order
        return Mask(visible=order[:, 0::2], target=order[:, 1::2])


class Invert:
    """``x -> 1 - x`` for images in [0, 1]."""

    def __call__(self, x, generator):
        return 1.0 - x


@hookimpl
def register_maskers():
    return {"every_other": EveryOther}


@hookimpl
def register_transforms():
    return {"invert": Invert}
'''


def _write_package(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A source tree for distribution ``dist`` with top-level ``modules`` and ``anymodal`` entry points."""
    root.mkdir(parents=True)
    eps = "\n".join(f'{name} = "{value}"' for name, value in entry_points.items())
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.1.0"

        [tool.setuptools]
        py-modules = [{", ".join(repr(m) for m in modules)}]

        [project.entry-points.anymodal]
        """) + eps + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)
    return root


def _pip_install(package: Path, target: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--no-input", "--target", str(target), str(package)],
                   check=True, capture_output=True, text=True, timeout=180, cwd=package)
    return target


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``anymodal_testplug`` installed by pip (code and dist-info with its entry point)."""
    base = tmp_path_factory.mktemp("testplug")
    pkg = _write_package(base / "src", "anymodal-testplug", {PLUGIN_NAME: PLUGIN_PACKAGE},
                         {PLUGIN_PACKAGE: PLUGIN_SOURCE})
    site = _pip_install(pkg, base / "site")
    assert (site / f"{PLUGIN_PACKAGE}.py").is_file()
    return site


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A separately installed package whose entry point names a module that does not exist."""
    base = tmp_path_factory.mktemp("brokenplug")
    pkg = _write_package(base / "src", "anymodal-brokenplug", {"brokenplug": "anymodal_no_such_module"},
                         {"anymodal_brokenplug_marker": "# installed so the distribution is not empty\n"})
    return _pip_install(pkg, base / "site")


def _on_path(site: Path, modules: tuple[str, ...]) -> Iterator[None]:
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(site))
        for module in modules:
            sys.modules.pop(module, None)
        importlib.invalidate_caches()


@pytest.fixture
def installed(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``plugin_site`` importable (and its entry points visible) in this process for one test."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    yield from _on_path(plugin_site, (PLUGIN_PACKAGE,))


@pytest.fixture
def broken_installed(broken_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    yield from _on_path(broken_site, ("anymodal_brokenplug_marker",))


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(DISABLE_AUTOLOAD_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return env


def _anymodal(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anymodal", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


# ---- entry points ---------------------------------------------------------------------------------


def test_entry_point_plugin_listed_by_cli(plugin_site: Path) -> None:
    proc = _anymodal("plugins", env=_env(plugin_site))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split() == ["every_other", "from", PLUGIN_NAME, "(anymodal-testplug", "0.1.0)"] for line in lines), proc.stdout
    assert any(line.split()[:3] == ["invert", "from", PLUGIN_NAME] for line in lines), proc.stdout
    assert any(line.split()[:3] == [PLUGIN_NAME, "entry", "point"] and PLUGIN_PACKAGE in line for line in lines), proc.stdout


def test_entry_point_plugin_loaded_in_process(installed: Path) -> None:
    components = load_components()
    assert components.masker.entry("every_other").plugin == PLUGIN_NAME
    assert components.transform.entry("invert").plugin == PLUGIN_NAME
    assert PLUGIN_NAME in components.plugins
    assert components.plugins[PLUGIN_NAME].startswith(f"entry point {PLUGIN_PACKAGE} (anymodal-testplug 0.1.0")
    assert components.versions[PLUGIN_NAME] == "anymodal-testplug 0.1.0"
    assert {components.versions[name] for name in components.builtin} == {"anymodal 0.1.0"}
    assert components.builtin == {"components", "image", "video", "lidar", "audio", "text", "scenes"}
    masker = components.masker.build("every_other")
    tokens = Tokens(x=torch.zeros(2, 5, 3), pos=torch.zeros(2, 5, 1, dtype=torch.long),
                    padding=torch.tensor([[False] * 5, [False] * 4 + [True]]))
    mask = masker(tokens, torch.Generator().manual_seed(0))
    assert mask.visible.tolist() == [[0, 2], [0, 2]] and mask.target.tolist() == [[1, 3], [1, 3]]


def test_autoload_off_by_argument(installed: Path) -> None:
    components = load_components(autoload=False)
    assert "every_other" not in components.masker and PLUGIN_NAME not in components.plugins
    assert "random" in components.masker  # the built-ins are always there


def test_autoload_off_by_env(installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    components = load_components()
    assert "every_other" not in components.masker and PLUGIN_NAME not in components.plugins
    assert "random" in components.masker


def test_train_with_entry_point_masker_and_transform(plugin_site: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # the stage masker is ${modality.masker} (random, ratio 0.75); overrides merge in order, so
    # null drops that node and the next sets a fresh one without `ratio`, which EveryOther does not take
    proc = _anymodal("train", "tiny-test", "recipe.stages.pretrain.steps=3",
                     "recipe.stages.pretrain.masker=null", "recipe.stages.pretrain.masker={name: every_other}",
                     "data.transforms=[{name: invert}]", "--run-dir", str(run),
                     env=_env(plugin_site), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line) for line in lines)
    saved = (run / "config.yaml").read_text()
    assert "every_other" in saved and "invert" in saved


def test_entry_point_to_missing_module(broken_installed: Path) -> None:
    with pytest.raises(PluginError) as info:
        load_components()
    msg = str(info.value)
    assert "'brokenplug'" in msg and "anymodal_no_such_module" in msg and "anymodal-brokenplug" in msg
    assert "ModuleNotFoundError" in msg
    # turning autoload off is the way around a broken installed plugin
    assert "random" in load_components(autoload=False).masker


def test_skip_broken_records_the_failure(broken_installed: Path) -> None:
    components = load_components(skip_broken=True)
    assert "brokenplug" not in components.plugins and "random" in components.masker
    assert "ModuleNotFoundError" in components.failed["brokenplug"] and "anymodal_no_such_module" in components.failed["brokenplug"]


def test_doctor_reports_environment_and_failed_entry_point(plugin_site: Path, broken_site: Path, tmp_path: Path) -> None:
    env = _env(plugin_site)
    env["PYTHONPATH"] = os.pathsep.join([str(broken_site), env["PYTHONPATH"]])
    proc = _anymodal("doctor", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch {torch.__version__}" in out and "cuda:" in out and "optional extras:" in out
    for extra in ("timm", "av", "laspy", "xformers", "torchaudio", "tensorboard", "submitit", "open_clip vocab"):
        assert any(line.split()[:1] == extra.split()[:1] and ("present" in line or "missing" in line)
                   for line in out.splitlines()), (extra, out)
    assert any(line.split()[:2] == [PLUGIN_NAME, "entry"] and "anymodal-testplug 0.1.0" in line for line in out.splitlines()), out
    failed = out.split("entry points that failed to load:")[1]
    assert "brokenplug" in failed and "ModuleNotFoundError" in failed and "anymodal_no_such_module" in failed


# ---- modules named in the config's plugins: list -------------------------------------------------


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], str]]:
    """Write a top-level module into tmp_path (on sys.path); forgotten by sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def make(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        written.append(name)
        return name

    yield make
    for name in written:
        sys.modules.pop(name, None)


GOOD_MODULE = """
    from anymodal.plugins import hookimpl


    class Keep:
        def __call__(self, x, generator):
            return x


    @hookimpl
    def register_transforms():
        return {"keep": Keep}


    @hookimpl
    def register_teachers():
        return None  # allowed: this plugin has no teachers


    @hookimpl
    def configure(config):
        return {"run": {"seed": 7}}
"""


def test_config_module_registers_components(make_module: Callable[[str, str], str]) -> None:
    name = make_module("mymod", GOOD_MODULE)
    components = load_components([name], autoload=False)
    assert components.transform.entry("keep").plugin == "mymod"
    assert components.plugins["mymod"] == "config module mymod"
    assert components.configure({}) == [{"run": {"seed": 7}}]


def test_config_plugins_list_reaches_cli(make_module: Callable[[str, str], str], tmp_path: Path) -> None:
    make_module("mymod_cli", GOOD_MODULE)
    config = tmp_path / "with-plugin.yaml"
    config.write_text("defaults:\n  model: cpu\n  modality: digits\n  recipe: mae\nplugins: [mymod_cli]\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p))
    proc = _anymodal("plugins", str(config), env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(line.split() == ["keep", "from", "mymod_cli", "(module", "mymod_cli,", "no", "version)"]
               for line in proc.stdout.splitlines()), proc.stdout


# ---- a broken plugin is a PluginError that names it ----------------------------------------------


def test_import_failure_names_module(make_module: Callable[[str, str], str]) -> None:
    name = make_module("radar_plugin", 'raise ImportError("no radar driver")\n')
    with pytest.raises(PluginError, match=r"'radar_plugin'.*ImportError: no radar driver") as info:
        load_components([name], autoload=False)
    assert isinstance(info.value.__cause__, ImportError)


def test_hook_returning_list(make_module: Callable[[str, str], str]) -> None:
    name = make_module("listplug", """
        from anymodal.plugins import hookimpl


        @hookimpl
        def register_maskers():
            return ["every_other"]
    """)
    with pytest.raises(PluginError, match=r"plugin 'listplug': hook register_maskers returned list .*expected a mapping"):
        load_components([name], autoload=False)


def test_hook_raising_names_plugin(make_module: Callable[[str, str], str]) -> None:
    name = make_module("raiseplug", """
        from anymodal.plugins import hookimpl


        @hookimpl
        def register_datasets():
            raise RuntimeError("dataset server down")
    """)
    with pytest.raises(PluginError, match=r"plugin 'raiseplug': hook register_datasets raised RuntimeError: dataset server down"):
        load_components([name], autoload=False)


def test_name_clash_with_builtin(make_module: Callable[[str, str], str]) -> None:
    name = make_module("clashplug", """
        from anymodal.plugins import hookimpl


        class Mine:
            def __call__(self, tokens, generator):
                raise NotImplementedError


        @hookimpl
        def register_maskers():
            return {"random": Mine}
    """)
    with pytest.raises(PluginError, match=r"masker 'random' is registered by both plugin 'components' and plugin 'clashplug'"):
        load_components([name], autoload=False)


def test_name_clash_between_plugins(make_module: Callable[[str, str], str]) -> None:
    source = """
        from anymodal.plugins import hookimpl


        @hookimpl
        def register_transforms():
            return {"same": lambda: (lambda x, generator: x)}
    """
    first, second = make_module("firstplug", source), make_module("secondplug", source)
    with pytest.raises(PluginError, match=r"transform 'same' is registered by both plugin 'firstplug' and plugin 'secondplug'"):
        load_components([first, second], autoload=False)


def test_non_callable_factory(make_module: Callable[[str, str], str]) -> None:
    name = make_module("valueplug", """
        from anymodal.plugins import hookimpl


        @hookimpl
        def register_objectives():
            return {"oops": 3}
    """)
    with pytest.raises(PluginError, match=r"plugin 'valueplug' registered objective 'oops' as 3, which is not callable"):
        load_components([name], autoload=False)


def test_unknown_hook(make_module: Callable[[str, str], str]) -> None:
    name = make_module("tokplug", """
        from anymodal.plugins import hookimpl


        @hookimpl
        def register_tokeniser():
            return {}
    """)
    with pytest.raises(PluginError, match=r"plugin 'tokplug' does not match the hook contract.*register_tokeniser"):
        load_components([name], autoload=False)


def test_hook_with_wrong_argument(make_module: Callable[[str, str], str]) -> None:
    name = make_module("cfgplug", """
        from anymodal.plugins import hookimpl


        @hookimpl
        def configure(cfg):
            return None
    """)
    with pytest.raises(PluginError, match=r"plugin 'cfgplug' does not match the hook contract") as info:
        load_components([name], autoload=False)
    msg = str(info.value)
    assert "configure" in msg and "cfg" in msg


def test_api_version_mismatch(make_module: Callable[[str, str], str]) -> None:
    name = make_module("futureplug", """
        from anymodal.plugins import hookimpl

        ANYMODAL_API = 99


        @hookimpl
        def register_maskers():
            return {}
    """)
    with pytest.raises(PluginError, match=r"plugin 'futureplug' targets plugin API version 99, this anymodal provides 1"):
        load_components([name], autoload=False)


def test_cli_reports_plugin_error_without_traceback(make_module: Callable[[str, str], str], tmp_path: Path) -> None:
    make_module("radar_cli", 'raise ImportError("no radar driver")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p))
    proc = _anymodal("plugins", "--plugin", "radar_cli", env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "no radar driver" in proc.stderr and "radar_cli" in proc.stderr and "Traceback" not in proc.stderr


# ---- registry errors ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtins():
    return load_components(autoload=False)


def test_unknown_name_suggests_closest(builtins) -> None:
    with pytest.raises(UnknownNameError) as info:
        builtins.masker.build("randm")
    msg = str(info.value)
    assert "unknown masker 'randm'" in msg and "did you mean 'random'?" in msg
    assert "registered maskers: block, multiblock, random, tube" in msg


def test_unknown_name_without_close_match_lists_names(builtins) -> None:
    with pytest.raises(UnknownNameError) as info:
        builtins.objective.build("zzzz")
    msg = str(info.value)
    assert msg.startswith("unknown objective 'zzzz'; registered objectives: ") and "masked_pixel" in msg
    assert "did you mean" not in msg


def test_factory_kwarg_typo_suggests_argument(builtins) -> None:
    with pytest.raises(TypeError, match=r"masker 'random': unknown argument 'ratoi' \(did you mean 'ratio'\?\)"):
        builtins.masker.build("random", ratoi=0.5)
    assert builtins.masker.build("random", ratio=0.5).ratio == 0.5


# ---- the plugins command lists the built-ins -------------------------------------------------------


def test_cli_lists_builtin_kinds(tmp_path: Path) -> None:
    env = dict(os.environ, **{DISABLE_AUTOLOAD_ENV: "1"})
    proc = _anymodal("plugins", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for kind in KINDS.values():
        assert f"{kind}s:" in lines, proc.stdout
    for name, plugin in (("image_patch", "image"), ("digits", "image"), ("random_resized_crop", "image"),
                         ("tubelet", "video"), ("random", "components"), ("masked_pixel", "components")):
        assert any(line.split() == [name, "from", plugin, "(anymodal", "0.1.0)"] for line in lines), proc.stdout
    for plugin in ("components", "image", "video", "lidar", "audio", "text", "scenes"):  # loaded with autoload off
        assert any(line.split() == [plugin, "built", "in", "(anymodal", "0.1.0)"] for line in lines), proc.stdout


# ---- a plugin's tokenizer is checked on load against the register_tokenizers contract ------------

TOKENIZER_MODULE = """
    import torch
    from torch import nn

    from anymodal.core.tokens import Tokens
    from anymodal.plugins import hookimpl


    class Sets(nn.Module):
        \"\"\"Ragged sets [B, N, 3] -> one token per element; positions are the first two channels.\"\"\"
        pos_axes = 2
        grid_size = None
        target_dim = 3

        def __init__(self, dim, input_key="blips"):
            super().__init__()
            self.dim, self.input_key = dim, input_key
            self.embed = nn.Linear(3, dim)

        @classmethod
        def example_input(cls, batch_size):
            return [{"blips": torch.rand(4 + i, 3)} for i in range(batch_size)]

        def forward(self, x, padding=None):
            return Tokens(x=self.embed(x), pos=x[..., :2], padding=padding, targets=x)
    {broken}

    @hookimpl
    def register_tokenizers():
        return {"sets": Sets}
"""


def _tokenizer_plugin(make_module: Callable[[str, str], str], name: str, broken: str = "") -> str:
    return make_module(name, TOKENIZER_MODULE.replace("{broken}", textwrap.indent(textwrap.dedent(broken), " " * 4)))


def test_tokenizer_keeping_the_contract_loads(make_module: Callable[[str, str], str]) -> None:
    name = _tokenizer_plugin(make_module, "goodtok")
    assert load_components([name], autoload=False).tokenizer.entry("sets").plugin == "goodtok"


def test_tokenizer_contract_violations_listed(make_module: Callable[[str, str], str]) -> None:
    name = _tokenizer_plugin(make_module, "badtok", """
        Sets.pos_axes = 3  # claims 3 position axes, gives 2

        def _forward(self, x, padding=None):  # float padding, no targets
            return Tokens(x=self.embed(x), pos=x[..., :2], padding=None if padding is None else padding.float().bool(),
                          targets=None)

        Sets.forward = _forward
    """)
    with pytest.raises(PluginError) as info:
        load_components([name], autoload=False)
    msg = str(info.value)
    assert msg.startswith("plugin 'badtok': tokenizer 'sets' breaks the tokenizer contract"), msg
    assert "Tokens.pos has shape (2, 5, 2), expected [B, N, pos_axes=3]" in msg
    assert "Tokens.targets is None, expected [B, N, target_dim] = (2, 5, 3)" in msg


def test_tokenizer_wrong_width_and_dtype(make_module: Callable[[str, str], str]) -> None:
    name = _tokenizer_plugin(make_module, "widetok", """
        def _forward(self, x, padding=None):
            return Tokens(x=torch.cat([self.embed(x)] * 2, -1), pos=x[..., :2], padding=padding, targets=x)

        Sets.forward = _forward
    """)
    with pytest.raises(PluginError, match=r"plugin 'widetok': .*Tokens.x has shape \(2, 5, 32\), expected \[B=2, N, dim=16\]"):
        load_components([name], autoload=False)


def test_tokenizer_without_padding_argument(make_module: Callable[[str, str], str]) -> None:
    name = _tokenizer_plugin(make_module, "nopadtok", """
        def _forward(self, x):
            return Tokens(x=self.embed(x), pos=x[..., :2], targets=x)

        Sets.forward = _forward
    """)
    with pytest.raises(PluginError, match=r"plugin 'nopadtok': tokenizer 'sets' .*tokenizer\(x, padding=\.\.\.\) on "
                                          r"example_input\(2\) raised TypeError"):
        load_components([name], autoload=False)


def test_tokenizer_grid_positions_out_of_range(make_module: Callable[[str, str], str]) -> None:
    name = _tokenizer_plugin(make_module, "gridtok", """
        Sets.grid_size = (2, 2)

        def _forward(self, x, padding=None):
            pos = torch.full(x.shape[:2] + (2,), 5, dtype=torch.long)
            return Tokens(x=self.embed(x), pos=pos, padding=padding, targets=x)

        Sets.forward = _forward
    """)
    with pytest.raises(PluginError, match=r"plugin 'gridtok': .*Tokens.pos has coordinates outside grid_size \(2, 2\)"):
        load_components([name], autoload=False)


def test_tokenizer_without_example_input(make_module: Callable[[str, str], str]) -> None:
    name = _tokenizer_plugin(make_module, "noexample", "\ndel Sets.example_input\n")
    with pytest.raises(PluginError, match=r"plugin 'noexample': tokenizer 'sets' .*no example_input\(batch_size\)"):
        load_components([name], autoload=False)
    # nothing of a refused plugin stays behind
    assert "sets" not in load_components(autoload=False).tokenizer


@pytest.mark.parametrize("broken, expected", [
    ("\ndef _bad_init(self, dim, channels):\n    raise AssertionError\n\nSets.__init__ = _bad_init\n",
     "building it as factory(dim=16) raised TypeError"),
    ("\ndel Sets.pos_axes\n", "it has no attribute 'pos_axes'"),
    ("\nSets.grid_size = [4]\n", "grid_size is [4]; expected a tuple of positive ints or None"),
    ("\nSets.example_input = classmethod(lambda cls, n: 1 / 0)\n", "example_input(2) raised ZeroDivisionError"),
    ("\nSets.example_input = classmethod(lambda cls, n: {'other': torch.zeros(n, 3, 3)})\n",
     "example_input gave a batch without its input_key 'blips' (fields: other)"),
    ("\nSets.forward = lambda self, x, padding=None: x\n", "forward returned Tensor, expected anymodal.core.tokens.Tokens"),
    ("\nSets.forward = lambda self, x, padding=None: Tokens(x=self.embed(x) * float('nan'), pos=x[..., :2], targets=x)\n",
     "Tokens.x has NaN or infinite values"),
    ("\nSets.forward = lambda self, x, padding=None: Tokens(x=self.embed(x).detach(), pos=x[..., :2], targets=x)\n",
     "Tokens.x does not depend on the tokenizer's parameters"),
    ("\nSets.reconstruction_loss = lambda self, pred, target: (pred - target).abs()\n",
     "reconstruction_loss returned torch.Size([2, 5, 3]), expected a scalar tensor"),
])
def test_tokenizer_contract_each_rule(make_module: Callable[[str, str], str], broken: str, expected: str) -> None:
    name = _tokenizer_plugin(make_module, f"rule{abs(hash(expected)) % 10**8}", broken)
    with pytest.raises(PluginError) as info:
        load_components([name], autoload=False)
    assert f"plugin {name!r}: tokenizer 'sets' breaks the tokenizer contract" in str(info.value)
    assert expected in str(info.value), str(info.value)


def test_cli_names_the_broken_package_and_the_way_around(broken_site: Path, tmp_path: Path) -> None:
    proc = _anymodal("plugins", env=_env(broken_site), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "installed package anymodal-brokenplug" in proc.stderr and f"{DISABLE_AUTOLOAD_ENV}=1" in proc.stderr
    assert "anymodal doctor" in proc.stderr
