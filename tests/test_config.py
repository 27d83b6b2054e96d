"""Config composition, validation errors and the `anymodal config` command."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from anymodal.core.config import GROUPS, PACKAGE_CONFIGS, ConfigError, compose, plugin_config_dirs, validate
from anymodal.plugins import load_components


@pytest.fixture(scope="module")
def components():
    return load_components(autoload=False)


def test_every_packaged_config_composes_and_validates(components):
    files = sorted(p for p in PACKAGE_CONFIGS.rglob("*.yaml") if p.parent == PACKAGE_CONFIGS)
    assert len(files) >= 2
    for path in files:
        validate(compose(str(path)), components)


def test_every_group_file_composes_with_default(components):
    # the core's groups, and the modality files each built-in plugin ships in its own configs/
    folders = [PACKAGE_CONFIGS, *plugin_config_dirs()]
    groups = [(p.parent.name, p.stem) for base in folders for group in GROUPS for p in (base / group).glob("*.yaml")]
    assert {name for group, name in groups if group == "modality"} >= {"image", "digits", "video", "lidar", "lidar_sweep", "audio"}
    for group, name in groups:
        # a recipe that addresses sensors by name composes with the scene modality that has them
        scene = group == "recipe" and "sensor:" in (PACKAGE_CONFIGS / "recipe" / f"{name}.yaml").read_text()
        validate(compose("default", [f"{group}={name}", *(["modality=street_scenes"] if scene else [])]), components)


def test_overrides_apply_last_and_parse_as_yaml():
    cfg = compose("default", ["run.seed=7", "model.drop_path=0.1", "recipe.stages.pretrain.optim.betas=[0.9,0.99]"]).cfg
    assert cfg.run.seed == 7 and cfg.model.drop_path == 0.1
    assert list(cfg.recipe.stages.pretrain.optim.betas) == [0.9, 0.99]


def test_group_swap_on_command_line():
    cfg = compose("default", ["model=small"]).cfg
    assert cfg.model.size == "small"


def test_typo_in_file_names_key_file_and_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  model: tiny\nrun:\n  seeed: 3\nmodel:\n  drop_pth: 0.1\n")
    with pytest.raises(ConfigError) as e:
        compose(str(bad))
    msg = str(e.value)
    assert "run.seeed" in msg and str(bad) in msg and "'seed'" in msg
    assert "model.drop_pth" in msg and "'drop_path'" in msg  # every error at once


def test_typo_on_command_line_names_command_line():
    with pytest.raises(ConfigError, match=r"unknown key 'recipe.stages.pretrain.stepz' in command line; did you mean 'steps'"):
        compose("default", ["recipe.stages.pretrain.stepz=3"])


def test_unknown_group_choice_lists_options():
    with pytest.raises(ConfigError, match=r"no modality config named 'imgae'; did you mean 'image'"):
        compose("default", ["modality=imgae"])


def test_wrong_type_is_an_error_naming_the_source():
    with pytest.raises(ConfigError, match="command line"):
        compose("default", ["recipe.stages.pretrain.steps=many"])


def test_unknown_component_and_argument_are_reported_together(components):
    composed = compose("default", ["recipe.stages.pretrain.objectives.masked_pixel.decoder_dpth=2",
                                   "modality.tokenizer.name=image_pach"])
    with pytest.raises(ConfigError) as e:
        validate(composed, components)
    msg = str(e.value)
    assert "unknown tokenizer 'image_pach'" in msg and "did you mean 'image_patch'" in msg
    assert "'decoder_dpth'" in msg and "'decoder_depth'" in msg and "command line" in msg


def test_misspelled_objective_lists_registered(components):
    composed = compose("default", ["recipe.stages.pretrain.objectives={masked_pixle: {weight: 1.0}}"])
    with pytest.raises(ConfigError, match=r"unknown objective 'masked_pixle' \(from command line\); did you mean "
                                          r"'masked_pixel'\?; registered: contrastive, distill, image_to_lidar, jepa, masked_distill, "
                                          r"masked_pixel"):
        validate(composed, components)


def test_config_command_prints_resolved_config():
    out = subprocess.run([sys.executable, "-m", "anymodal", "config", "default", "run.seed=5"],
                         capture_output=True, text=True, check=True).stdout
    cfg = OmegaConf.create(out)
    assert cfg.run.seed == 5
    assert cfg.recipe.stages.pretrain.masker.name == "random"  # interpolation resolved


def test_config_command_error_is_clean():
    proc = subprocess.run([sys.executable, "-m", "anymodal", "config", "default", "run.sed=5"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'seed'" in proc.stderr and "Traceback" not in proc.stderr


def test_wildcard_sets_every_stage():
    cfg = compose("default", ["recipe=videoprism", "recipe.stages.*.steps=7"]).cfg
    assert [s.steps for s in cfg.recipe.stages.values()] == [7, 7]
    assert cfg.recipe.stages.distill.teacher.stage == "contrastive"  # the rest of each stage is kept


def test_a_stage_the_recipe_lacks_is_an_error():
    with pytest.raises(ConfigError, match=r"recipe.stages.pretrain \(from command line\) is not a stage of the recipe "
                                          r".*clip.yaml; stages: contrastive"):
        compose("default", ["recipe=clip", "recipe.stages.pretrain.steps=3"])
