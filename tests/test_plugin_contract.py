"""The plugin contract's load-time checks, past the basics of ``test_plugins.py``: the tokens'
dtype and scale, hook names that are not hooks, where in a plugin's code an exception was raised,
and the arguments anymodal always passes to each kind of factory.

Every plugin here is a real module written into a temporary folder; the command line runs in a
subprocess and must answer a broken plugin with one ``anymodal <cmd>: error:`` line, exit status 2.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from test_plugins import _anymodal, _tokenizer_plugin, make_module  # noqa: F401 (make_module is a fixture)

from anymodal.core.build import build_dataset
from anymodal.core.config import compose
from anymodal.core.data import collate
from anymodal.app.scaffold import new_plugin
from anymodal.plugins import PluginError, load_components
from anymodal.plugins.contract import CHECK_BATCH, CHECK_DIM, token_scale_note
from anymodal.plugins.manager import component_failure

MakeModule = Callable[[str, str], str]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RADAR = Path(__file__).resolve().parent.parent / "examples" / "anymodal-radar"


def _importable(folder: Path) -> dict[str, str]:
    """The environment for a subprocess that can import the modules written into ``folder``."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p))


def _cli_error(tmp_path: Path, *args: str) -> str:
    """Run ``anymodal ARGS`` with tmp_path importable; the one error line it must print."""
    proc = _anymodal(*args, env=_importable(tmp_path), cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"anymodal {args[0]}: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def _load_error(name: str) -> str:
    with pytest.raises(PluginError) as info:
        load_components([name], autoload=False)
    return str(info.value)


def _line_of(path: Path, text: str) -> int:
    """The 1-based line of ``path`` holding ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def _scale_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "positional encoding" in r.getMessage()]


# ---- dtype: the model's, not any floating type ----------------------------------------------------


def test_float64_tokens_refused_on_load(make_module: MakeModule, tmp_path: Path) -> None:
    broken = """
        def _forward(self, x, padding=None):
            return Tokens(x=self.embed(x).double(), pos=x[..., :2], padding=padding, targets=x)

        Sets.forward = _forward
    """
    msg = _load_error(_tokenizer_plugin(make_module, "f64tok", broken))
    assert msg.startswith("plugin 'f64tok': tokenizer 'sets' breaks the tokenizer contract"), msg
    assert "Tokens.x has dtype torch.float64, expected torch.float32" in msg
    line = _cli_error(tmp_path, "plugins", "--plugin", _tokenizer_plugin(make_module, "f64tok_cli", broken))
    assert "plugin 'f64tok_cli': tokenizer 'sets'" in line and "torch.float64, expected torch.float32" in line


def test_float64_parameters_refused_on_load(make_module: MakeModule) -> None:
    msg = _load_error(_tokenizer_plugin(make_module, "f64param", """
        _plain_init = Sets.__init__

        def _init(self, dim, input_key="blips"):
            _plain_init(self, dim, input_key)
            self.embed.double()

        def _forward(self, x, padding=None):  # float32 out, float64 inside
            return Tokens(x=self.embed(x.double()).float(), pos=x[..., :2], padding=padding, targets=x)

        Sets.__init__, Sets.forward = _init, _forward
    """))
    assert "parameter 'embed.weight' is torch.float64, expected torch.float32" in msg, msg


# ---- scale: tokens drowned by (or drowning) the positional encoding --------------------------------


def _scaled_tokenizer(make_module: MakeModule, name: str, factor: float) -> str:
    return _tokenizer_plugin(make_module, name, f"""
        def _forward(self, x, padding=None):
            return Tokens(x=self.embed(x) * {factor}, pos=x[..., :2], padding=padding, targets=x)

        Sets.forward = _forward
    """)


def test_tiny_tokens_warn_with_the_numbers(make_module: MakeModule, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        components = load_components([_scaled_tokenizer(make_module, "tinytok", 0.15)], autoload=False)
    assert "sets" in components.tokenizer  # a warning, not a refusal
    [note] = _scale_warnings(caplog)
    assert note.startswith("plugin 'tinytok': tokenizer 'sets': ") and "small next to the positional encoding" in note
    measured = re.search(r"its largest token has RMS (0\.\d{3}) \(median (0\.\d{3})\), the sin-cos positional "
                         r"encoding has RMS 0\.71", note)
    assert measured and float(measured[2]) <= float(measured[1]) < 0.2, note


def test_huge_tokens_warn(make_module: MakeModule, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load_components([_scaled_tokenizer(make_module, "hugetok", 100.0)], autoload=False)
    [note] = _scale_warnings(caplog)
    assert note.startswith("plugin 'hugetok': tokenizer 'sets': ") and "large next to the positional encoding" in note, note


def test_tiny_tokens_warning_reaches_the_cli(make_module: MakeModule, tmp_path: Path) -> None:
    name = _scaled_tokenizer(make_module, "tinytok_cli", 0.15)
    proc = _anymodal("plugins", "--plugin", name, env=_importable(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "plugin 'tinytok_cli': tokenizer 'sets'" in proc.stderr and "largest token has RMS" in proc.stderr


def test_well_scaled_plugin_tokenizer_does_not_warn(make_module: MakeModule, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load_components([_tokenizer_plugin(make_module, "finetok")], autoload=False)
    assert not _scale_warnings(caplog)


@pytest.mark.parametrize("modality", sorted(p.stem for p in (CONFIGS / "modality").glob("*.yaml")))
def test_builtin_modality_tokenizers_are_well_scaled(modality: str) -> None:
    """Each built-in sensor tokenizer, built as the check builds it, on two samples of its own data."""
    assert len(list((CONFIGS / "modality").glob("*.yaml"))) >= 6
    torch.manual_seed(0)
    components = load_components(autoload=False)
    cfg = compose("tiny-test", [f"modality={modality}"]).cfg
    node = dict(cfg.modality.tokenizer)
    tokenizer = components.tokenizer.build(node.pop("name"), dim=CHECK_DIM, **node)
    dataset = build_dataset(cfg, "train", components)
    batch = collate([dataset[i] for i in range(CHECK_BATCH)])
    key = tokenizer.input_key
    padding = batch.get(f"{key}_padding")
    with torch.no_grad():
        tokens = tokenizer(batch[key]) if padding is None else tokenizer(batch[key], padding=padding)
    assert token_scale_note(tokens) is None


@pytest.mark.xfail(strict=True, reason="byte_text and clip_bpe initialize their embeddings at std 0.02 (CLIP's "
                                       "convention, made for learned positions of std 0.01), while the text tower "
                                       "adds sin-cos positions of RMS 0.71")
@pytest.mark.parametrize("name", ["byte_text"])
def test_builtin_text_tokenizers_are_well_scaled(name: str) -> None:
    torch.manual_seed(0)
    tokenizer = load_components(autoload=False).tokenizer.build(name, dim=CHECK_DIM)
    with torch.no_grad():
        assert token_scale_note(tokenizer(["a spoken seven", "a radar return of a cyclist"])) is None


def test_example_and_skeleton_plugins_load_without_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    root = new_plugin("sonar", tmp_path)
    monkeypatch.syspath_prepend(str(RADAR))
    monkeypatch.syspath_prepend(str(root))
    try:
        with caplog.at_level(logging.WARNING):
            components = load_components(["anymodal_radar", "anymodal_sonar"], autoload=False)
    finally:
        for module in [m for m in sys.modules if m.startswith(("anymodal_radar", "anymodal_sonar"))]:
            del sys.modules[module]
    assert "radar_bev" in components.tokenizer and "sonar_chunks" in components.tokenizer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


# ---- hook names: an unknown one is refused with the closest hook -----------------------------------


@pytest.mark.parametrize("hook, closest", [("register_tokenizer", "register_tokenizers"),
                                           ("registr_datasets", "register_datasets")])
@pytest.mark.parametrize("marked", [True, False])
def test_unknown_hook_names_the_closest(make_module: MakeModule, hook: str, closest: str, marked: bool) -> None:
    name = make_module(f"hookmod_{hook}_{marked}", f"""
        from anymodal.plugins import hookimpl


        {"@hookimpl" if marked else ""}
        def {hook}():
            return {{}}
    """)
    msg = _load_error(name)
    assert msg.startswith(f"plugin {name!r} does not match the hook contract: "), msg
    assert f"{hook!r}" in msg and f"did you mean {closest!r}?" in msg, msg
    assert f"{name}.py:" in msg  # where the function is


def test_hook_without_marker_refused(make_module: MakeModule) -> None:
    name = make_module("unmarked", """
        def register_transforms():
            return {"keep": lambda: (lambda x, generator: x)}
    """)
    msg = _load_error(name)
    assert msg.startswith("plugin 'unmarked' does not match the hook contract: ") and "register_transforms" in msg, msg
    assert "@anymodal.plugins.hookimpl" in msg, msg


def test_other_functions_and_optional_hooks_allowed(make_module: MakeModule) -> None:
    name = make_module("helpers_ok", """
        from anymodal.plugins import hookimpl


        def configure_logging():  # a helper, not a hook
            pass


        def register_all():
            pass


        def _register_datasets(table):  # private: not a hook by its name
            pass


        @hookimpl(optionalhook=True)
        def register_radar_modes():  # a hook of a later API, optional by the plugin's choice
            return {}


        @hookimpl
        def register_transforms():
            return {"keep": lambda: (lambda x, generator: x)}
    """)
    assert "keep" in load_components([name], autoload=False).transform


def test_unknown_hook_through_the_cli(make_module: MakeModule, tmp_path: Path) -> None:
    name = make_module("hookmod_cli", """
        from anymodal.plugins import hookimpl


        @hookimpl
        def register_tokenizer():
            return {}
    """)
    line = _cli_error(tmp_path, "config", "tiny-test", f"plugins=[{name}]")
    assert "plugin 'hookmod_cli'" in line and "'register_tokenizer'" in line and "did you mean 'register_tokenizers'?" in line


# ---- an exception in a plugin's code names the file and line it was raised at ----------------------


@pytest.mark.parametrize("broken, raised, where", [
    ("\ndef _forward(self, x, padding=None):\n    raise ValueError('radar frame has no returns')\n\nSets.forward = _forward\n",
     "ValueError: radar frame has no returns", "raise ValueError('radar frame"),
    # raised inside torch: the innermost frame of the plugin's own code is the one named
    ("\ndef _forward(self, x, padding=None):\n    return Tokens(x=self.embed(x[..., :2]), pos=x[..., :2])\n\nSets.forward = _forward\n",
     "RuntimeError: mat1 and mat2 shapes cannot be multiplied", "self.embed(x[..., :2])"),
    ("\ndef _example(cls, n):\n    raise OSError('no recording found')\n\nSets.example_input = classmethod(_example)\n",
     "OSError: no recording found", "raise OSError"),
    ("\ndef _init(self, dim, input_key='blips'):\n    raise KeyError('calibration')\n\nSets.__init__ = _init\n",
     "KeyError: 'calibration'", "raise KeyError"),
], ids=["forward", "inside-torch", "example_input", "factory"])
def test_tokenizer_exception_names_file_and_line(make_module: MakeModule, tmp_path: Path,
                                                 broken: str, raised: str, where: str) -> None:
    name = _tokenizer_plugin(make_module, f"boom{abs(hash(where)) % 10**6}", broken)
    msg = _load_error(name)
    path = tmp_path / f"{name}.py"
    assert msg.startswith(f"plugin {name!r}: tokenizer 'sets' "), msg
    assert raised in msg and f"{path}:{_line_of(path, where)}" in msg, msg


def test_tokenizer_exception_through_the_cli(make_module: MakeModule, tmp_path: Path) -> None:
    name = _tokenizer_plugin(make_module, "boom_cli", """
        def _forward(self, x, padding=None):
            raise ValueError('radar frame has no returns')

        Sets.forward = _forward
    """)
    line = _cli_error(tmp_path, "plugins", "--plugin", name)
    path = tmp_path / f"{name}.py"
    assert "plugin 'boom_cli': tokenizer 'sets'" in line and "ValueError: radar frame has no returns" in line
    assert f"{path}:{_line_of(path, 'radar frame')}" in line, line


def test_component_failure_at_training_time(make_module: MakeModule, tmp_path: Path) -> None:
    """What a training step reports when a plugin's tokenizer raises on a batch the check never saw."""
    name = _tokenizer_plugin(make_module, "laterboom", """
        def _forward(self, x, padding=None):
            if x.shape[1] > 100:
                raise ValueError(f'{x.shape[1]} returns, at most 100')
            return Tokens(x=self.embed(x), pos=x[..., :2], padding=padding, targets=x)

        Sets.forward = _forward
    """)
    components = load_components([name], autoload=False)
    tokenizer = components.tokenizer.build("sets", dim=8)
    with pytest.raises(ValueError) as info:
        tokenizer(torch.rand(2, 101, 3))
    error = component_failure(components, "tokenizer", "sets", info.value)
    path = tmp_path / f"{name}.py"
    assert isinstance(error, PluginError)
    assert str(error) == (f"plugin 'laterboom': tokenizer 'sets' raised ValueError: 101 returns, at most 100 "
                          f"(at {path}:{_line_of(path, 'raise ValueError')})")
    # the built-in plugin's own failures are bugs, kept as they are
    builtin = components.tokenizer.build("image_patch", dim=8, image_size=16, patch_size=4, channels=1)
    with pytest.raises(ValueError) as info:
        builtin(torch.rand(2, 3, 16, 16))
    assert component_failure(components, "tokenizer", "image_patch", info.value) is None


# ---- the other kinds and hooks --------------------------------------------------------------------


def test_configure_raising_names_plugin_and_line(make_module: MakeModule, tmp_path: Path) -> None:
    name = make_module("cfgboom", """
        from anymodal.plugins import hookimpl


        @hookimpl
        def configure(config):
            raise RuntimeError("site config unreadable")
    """)
    path = tmp_path / f"{name}.py"
    with pytest.raises(PluginError) as info:
        load_components([name], autoload=False).configure({})
    assert str(info.value) == (f"plugin 'cfgboom': hook configure raised RuntimeError: site config unreadable "
                               f"(at {path}:{_line_of(path, 'raise RuntimeError')})")
    line = _cli_error(tmp_path, "config", "tiny-test", f"plugins=[{name}]")
    assert "plugin 'cfgboom': hook configure raised RuntimeError: site config unreadable" in line


def test_registration_hook_and_import_failures_name_the_line(make_module: MakeModule, tmp_path: Path) -> None:
    name = make_module("regboom", """
        from anymodal.plugins import hookimpl


        @hookimpl
        def register_datasets():
            raise RuntimeError("dataset server down")
    """)
    path = tmp_path / f"{name}.py"
    assert f"(at {path}:{_line_of(path, 'raise RuntimeError')})" in _load_error(name)
    name = make_module("importboom", 'import torch\n\nraise ImportError("no radar driver")\n')
    assert f"ImportError: no radar driver (at {tmp_path / 'importboom.py'}:3)" in _load_error(name)


@pytest.mark.parametrize("hook, factory, component, argument", [
    ("register_datasets", "class Data:\n    def __init__(self, root='.'):\n        pass", "Data", "split"),
    ("register_objectives", "class Loss:\n    def __init__(self, dim, weight=1.0):\n        pass", "Loss", "tokenizer"),
    ("register_teachers", "def teacher(name='vit'):\n    pass", "teacher", "student"),
], ids=["dataset", "objective", "teacher"])
def test_factory_missing_an_argument_anymodal_passes(make_module: MakeModule, hook: str, factory: str,
                                                     component: str, argument: str) -> None:
    name = make_module(f"argmod_{argument}", f"""
from anymodal.plugins import hookimpl

{factory}


@hookimpl
def {hook}():
    return {{"mine": {component}}}
""")
    msg = _load_error(name)
    assert msg.startswith(f"plugin {name!r}: ") and "'mine'" in msg, msg
    assert f"does not take {argument!r}" in msg and hook in msg, msg


def test_non_string_name_refused(make_module: MakeModule) -> None:
    name = make_module("intname", """
        from anymodal.plugins import hookimpl


        @hookimpl
        def register_maskers():
            return {3: lambda: None}
    """)
    assert "plugin 'intname' registered a masker with name 3; names are non-empty strings" in _load_error(name)
