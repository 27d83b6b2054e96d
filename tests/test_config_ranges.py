"""Bad config values are config errors at config time: ranges and choices of every schema field,
model shape, masker arguments, wrong types, unreadable YAML, and replacing a node whole."""

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from anymodal.core.config import PACKAGE_CONFIGS, ConfigError, compose, validate

PLUGINS = PACKAGE_CONFIGS.parent / "plugins"
from anymodal.core.data import StepBatchSampler
from anymodal.core.masking import BlockMasker, MultiBlockMasker, RandomMasker, TubeMasker
from anymodal.core.registry import ArgumentError
from anymodal.plugins import load_components

from helpers import anymodal

README = Path(__file__).resolve().parent.parent / "README.md"
STAGE = "recipe.stages.pretrain"


@pytest.fixture(scope="module")
def components():
    return load_components(autoload=False)


def config_errors(components, overrides, config="tiny-test") -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(compose(config, overrides), components)
    return e.value.errors


# (override, the key the error names, what it says is allowed)
RANGES = [
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("data.batch_size=-4", "data.batch_size", ">= 1"),
    (f"{STAGE}.batch_size=0", f"{STAGE}.batch_size", ">= 1"),
    ("eval.batch_size=0", "eval.batch_size", ">= 1"),
    ("run.log_every=0", "run.log_every", ">= 1"),
    ("run.checkpoint_every=0", "run.checkpoint_every", ">= 1"),
    ("run.threads=-1", "run.threads", ">= 0"),
    ("run.seed=-1", "run.seed", "in [0, "),
    ("data.num_workers=-1", "data.num_workers", ">= 0"),
    ("data.views=3", "data.views", "one of 1, 2"),
    (f"{STAGE}.optim.lr=-0.001", f"{STAGE}.optim.lr", ">= 0"),
    (f"{STAGE}.optim.lr=.nan", f"{STAGE}.optim.lr", "finite"),
    (f"{STAGE}.optim.min_lr=-0.5", f"{STAGE}.optim.min_lr", ">= 0"),
    (f"{STAGE}.optim.weight_decay=-0.1", f"{STAGE}.optim.weight_decay", ">= 0"),
    (f"{STAGE}.optim.betas=[0.9,1.0]", f"{STAGE}.optim.betas", "in [0, 1)"),
    (f"{STAGE}.optim.betas=[-0.1,0.9]", f"{STAGE}.optim.betas", "in [0, 1)"),
    (f"{STAGE}.optim.betas=[0.9]", f"{STAGE}.optim.betas", "a list of 2 items"),
    (f"{STAGE}.optim.warmup_steps=-1", f"{STAGE}.optim.warmup_steps", ">= 0"),
    (f"{STAGE}.optim.clip_grad=-1", f"{STAGE}.optim.clip_grad", ">= 0"),
    (f"{STAGE}.optim.fused=maybe", f"{STAGE}.optim.fused", "one of auto, true, false"),
    (f"{STAGE}.steps=0", f"{STAGE}.steps", ">= 1"),
    (f"{STAGE}.steps=-5", f"{STAGE}.steps", ">= 1"),
    (f"{STAGE}.epochs=0", f"{STAGE}.epochs", "> 0"),
    ("model.drop_path=1.0", "model.drop_path", "in [0, 1)"),
    ("model.drop_path=-0.1", "model.drop_path", "in [0, 1)"),
    ("model.mlp_ratio=0", "model.mlp_ratio", "> 0"),
    ("model.depth=0", "model.depth", ">= 1"),
    ("model.num_heads=0", "model.num_heads", ">= 1"),
    ("model.dim=0", "model.dim", ">= 1"),
    ("model.size=huge", "model.size", "one of tiny, small, base, large"),
    ("model.size=smal", "model.size", "did you mean 'small'"),
    ("model.attn_backend=flash", "model.attn_backend", "one of sdpa, math, xformers"),
    ("model.posenc=rope", "model.posenc", "one of sincos, learned, mlp"),
    ("model.pool=max", "model.pool", "one of mean, cls"),
    ("run.precision=fp64", "run.precision", "one of auto, fp32, bf16, fp16"),
    ("run.device=gpu", "run.device", "a torch device"),
    ("run.compile=full", "run.compile", "one of none, blocks, objectives"),
    ("run.sdpa_kernel=flash2", "run.sdpa_kernel", "one of auto, flash, cudnn, efficient, math"),
    ("run.parallel=zero", "run.parallel", "one of ddp, fsdp"),
    ("eval.max_train=0", "eval.max_train", ">= 1"),
    ("eval.max_test=0", "eval.max_test", ">= 1"),
    ("eval.probe_iters=0", "eval.probe_iters", ">= 1"),
    ("eval.probe_l2=-1", "eval.probe_l2", ">= 0"),
    ("eval.knn_k=0", "eval.knn_k", ">= 1"),
    ("eval.retrieval_samples=0", "eval.retrieval_samples", ">= 1"),
    ("eval.monitor_every=-1", "eval.monitor_every", ">= 0"),
    ("eval.monitor_samples=1", "eval.monitor_samples", ">= 2"),
    ("eval.labels=[]", "eval.labels", "at least 1 item"),
    ("launcher.nodes=0", "launcher.nodes", ">= 1"),
    ("launcher.tasks_per_node=0", "launcher.tasks_per_node", ">= 1"),
    ("launcher.gpus_per_node=-1", "launcher.gpus_per_node", ">= 0"),
    ("launcher.cpus_per_task=0", "launcher.cpus_per_task", ">= 1"),
    ("launcher.mem_gb=0", "launcher.mem_gb", "> 0"),
    ("launcher.timeout_min=0", "launcher.timeout_min", ">= 1"),
    ("launcher.signal_delay_s=-1", "launcher.signal_delay_s", ">= 0"),
    ("launcher.max_requeues=-1", "launcher.max_requeues", ">= 0"),
    ("launcher.array_parallelism=0", "launcher.array_parallelism", ">= 1"),
    ("modality.masker.ratio=1.0", "modality.masker.ratio", "in [0, 1)"),
    ("modality.masker.ratio=-0.5", "modality.masker.ratio", "in [0, 1)"),
    (f"{STAGE}.masker={{name: block, ratio: 0.5, block_scale: [0.5, 0.2]}}", f"{STAGE}.masker.block_scale", "low <= high"),
    (f"{STAGE}.objectives.masked_pixel.weight=-1", f"{STAGE}.objectives.masked_pixel.weight", ">= 0"),
    (f"{STAGE}.objectives.masked_pixel.weight=abc", f"{STAGE}.objectives.masked_pixel.weight", "a number >= 0"),
]


@pytest.mark.parametrize("override,key,allowed", RANGES, ids=[r[0] for r in RANGES])
def test_out_of_range_value_names_key_source_value_and_range(components, override, key, allowed):
    errors = config_errors(components, [override])
    assert len(errors) == 1, errors
    value = override.split("=", 1)[1]
    assert errors[0].startswith(f"{key} ") and "(from command line)" in errors[0] and allowed in errors[0], errors
    if value[0] not in "[{.":
        assert value in errors[0], errors


@pytest.mark.parametrize("override", ["run.precision=bf16", "run.device=cuda:1", "run.device=cpu", "data.views=2",
                                      f"{STAGE}.optim.fused=true", f"{STAGE}.optim.lr=0 {STAGE}.optim.min_lr=0", "model.drop_path=0.5",
                                      "modality.masker.ratio=0.0", "eval.monitor_every=0", f"{STAGE}.epochs=0.5"])
def test_values_at_the_edges_of_their_range_are_accepted(components, override):
    validate(compose("tiny-test", override.split()), components)


def test_width_must_divide_over_the_heads_after_the_size_defaults(components):
    errors = config_errors(components, ["model.num_heads=5"])  # tiny-test: dim 64
    assert errors == [f"model width 64 (from {PACKAGE_CONFIGS / 'tiny-test.yaml'}) is not divisible by "
                      "model.num_heads 5 (from command line): each head takes width / num_heads channels"]
    errors = config_errors(components, ["model.size=tiny", "model.dim=null", "model.num_heads=5"])
    assert "model width 192 (model.size 'tiny')" in errors[0], errors  # ViT-Tiny's 192 over 5 heads
    validate(compose("tiny-test", ["model.size=small", "model.dim=null", "model.num_heads=null"]), components)


def test_every_bad_value_is_reported_at_once(components):
    errors = config_errors(components, ["data.batch_size=-4", "run.precision=fp64", f"{STAGE}.steps=0",
                                        "modality.masker.ratio=1.5", "model.size=huge"])
    assert [e.split(" ")[0] for e in errors] == ["run.precision", "model.size", "data.batch_size", f"{STAGE}.steps",
                                                 "modality.masker.ratio"]


def test_a_bad_value_in_a_file_names_the_file(components, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("defaults:\n  model: cpu\n  modality: digits\n  recipe: mae\ndata:\n  batch_size: 0\n")
    assert config_errors(components, [], str(path)) == [f"data.batch_size must be >= 1, got 0 (from {path})"]


def test_a_stage_masker_of_its_own_is_checked_and_named(components):
    errors = config_errors(components, ["recipe=jepa", f"{STAGE}.masker.num_targets=0"])
    assert errors == [f"{STAGE}.masker.num_targets must be >= 1, got 0 (from command line)"]


def test_the_tokenizer_is_built_at_config_time_so_its_argument_errors_are_config_errors(components):
    errors = config_errors(components, ["modality.tokenizer.patch_size=5"])  # digits at 16x16
    assert errors == ["modality.tokenizer (tokenizer 'image_patch', from command line): "
                      "image_size 16 is not a multiple of patch_size 5"]


@pytest.mark.parametrize("make,argument", [
    (lambda: RandomMasker(ratio=1.0), "ratio"),
    (lambda: RandomMasker(ratio="half"), "ratio"),
    (lambda: TubeMasker(ratio=-0.1), "ratio"),
    (lambda: BlockMasker(ratio=1.2), "ratio"),
    (lambda: BlockMasker(block_scale=(0.0, 0.3)), "block_scale"),
    (lambda: BlockMasker(aspect=3.0), "aspect"),
    (lambda: BlockMasker(max_blocks=0), "max_blocks"),
    (lambda: MultiBlockMasker(num_targets=0), "num_targets"),
    (lambda: MultiBlockMasker(num_targets=2.5), "num_targets"),
    (lambda: MultiBlockMasker(target_scale=(0.3, 0.1)), "target_scale"),
    (lambda: MultiBlockMasker(context_scale=(0.85, 1.5)), "context_scale"),
    (lambda: MultiBlockMasker(target_aspect=(0.0, 1.5)), "target_aspect"),
    (lambda: MultiBlockMasker(min_context=0), "min_context"),
    (lambda: MultiBlockMasker(max_tries=0), "max_tries"),
])
def test_masker_factories_reject_out_of_range_arguments_by_name(make, argument):
    with pytest.raises(ArgumentError) as e:
        make()
    assert e.value.argument == argument and str(e.value).startswith(f"{argument} ") and " must be " in str(e.value)


@pytest.mark.parametrize("batch_size", [0, -4])
def test_the_batch_sampler_refuses_a_batch_size_below_one(batch_size):
    with pytest.raises(ValueError, match="batch size must be a positive integer"):
        StepBatchSampler(100, batch_size, seed=0)


# wrong types: one line naming the key, the file, the value and the expected type (no OmegaConf internals)
TYPES = [
    (f"{STAGE}.steps=many", f"{STAGE}.steps (from command line): expected an integer, got 'many' (str)"),
    (f"{STAGE}=5", f"{STAGE} (from command line): expected a mapping, got 5 (int)"),
    ("run=3", "run (from command line): expected a mapping, got 3 (int)"),
    ("model.cls_token=maybe", "model.cls_token (from command line): expected true or false, got 'maybe' (str)"),
    ("data.transforms=5", "data.transforms (from command line): expected a list, got 5 (int)"),
    (f"{STAGE}.optim.betas=[0.9,a]", f"{STAGE}.optim.betas[1] (from command line): expected a number, got 'a' (str)"),
    ("data.train=3", "data.train (from command line): expected a mapping, got 3 (int)"),
    (f"{STAGE}.objectives.masked_pixel=5", f"{STAGE}.objectives.masked_pixel (from command line): expected a mapping, "
                                           "got 5 (int)"),
    ("run.name=null", "run.name (from command line): expected a string, got null"),
    ("data.train._replace_=maybe", "data.train._replace_ (from command line): expected true or false, got 'maybe' (str)"),
]


@pytest.mark.parametrize("override,message", TYPES, ids=[t[0] for t in TYPES])
def test_wrong_type_is_one_clear_line(override, message):
    with pytest.raises(ConfigError) as e:
        compose("tiny-test", [override])
    assert e.value.errors == [message]


def test_wrong_type_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("defaults:\n  model: cpu\nrun:\n  log_every: often\n")
    with pytest.raises(ConfigError) as e:
        compose(str(path))
    assert e.value.errors == [f"run.log_every (from {path}): expected an integer, got 'often' (str)"]


# unreadable files: one error naming the file (and the line and column of a YAML syntax error)
def test_a_binary_config_file_names_the_file(tmp_path):
    path = tmp_path / "photo.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ConfigError) as e:
        compose(str(path))
    assert e.value.errors == [f"{path}: not a YAML text file: byte 0x89 at offset 0 is not UTF-8"]


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\n\tseed: 3\n")
    with pytest.raises(ConfigError) as e:
        compose(str(path))
    assert e.value.errors[0].startswith(f"{path}, line 3, column 1: not valid YAML: ")


def test_a_bad_group_file_named_in_defaults_names_that_file(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("dim: \x00\n")
    (tmp_path / "run.yaml").write_text("defaults:\n  model: mine\n")
    with pytest.raises(ConfigError) as e:
        compose(str(tmp_path / "run.yaml"))
    assert e.value.errors == [f"{tmp_path / 'model' / 'mine.yaml'}, line 1, column 6: not valid YAML: "
                              "special characters are not allowed: '\\x00'"]


def test_defaults_that_are_not_a_mapping_are_an_error(tmp_path):
    path = tmp_path / "hydra_style.yaml"
    path.write_text("defaults:\n  - model: tiny\n")
    with pytest.raises(ConfigError, match=r"defaults in .*hydra_style.yaml must be a mapping of group to name"):
        compose(str(path))


# replacing a node whole
def test_replace_in_a_file_drops_the_modality_dataset_keys(components, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("defaults:\n  model: cpu\n  modality: digits\n  recipe: mae\n"
                    "data:\n  train: {_replace_: true, name: digits}\n")
    composed = compose(str(path))
    assert OmegaConf.to_container(composed.cfg.data.train) == {"name": "digits"}  # no split, no size
    assert composed.cfg.data.test.size == 16  # the node beside it still merges
    validate(composed, components)  # the builder gives the dataset its split


def test_without_replace_the_modality_keys_leak_and_the_error_says_how_to_replace(components):
    errors = config_errors(components, ["modality=digits", "data.train.name=image_folder", "data.train.root=photos"])
    assert any("unknown argument 'size'" in e for e in errors), errors
    assert errors[-1] == (f"data.train: 'size' came from {PLUGINS / 'image' / 'configs' / 'modality' / 'digits.yaml'}, merged under "
                          "the name from command line; add `_replace_: true` to the node to replace it whole")


@pytest.mark.parametrize("overrides", [
    ["data.train={_replace_: true, name: image_folder, root: photos}"],
    ["data.train._replace_=true", "data.train.name=image_folder", "data.train.root=photos"],
])
def test_replace_on_the_command_line(components, overrides):
    composed = compose("tiny-test", overrides)
    assert OmegaConf.to_container(composed.cfg.data.train) == {"name": "image_folder", "root": "photos"}
    assert composed.source("data.train.root") == "command line"
    validate(composed, components)


def test_replace_after_the_nodes_own_overrides_is_an_error():
    with pytest.raises(ConfigError, match=r"data.train._replace_=true on the command line comes after data.train.name"):
        compose("tiny-test", ["data.train.name=digits", "data.train._replace_=true"])


def test_replace_a_schema_section_restarts_it_from_its_defaults():
    cfg = compose("tiny-test", ["run={_replace_: true, seed: 3}"]).cfg
    assert (cfg.run.name, cfg.run.seed, cfg.run.log_every) == ("run", 3, 10)  # tiny-test's name and log_every gone


# through the real command line: exit 2, one error line, no traceback, nothing created
def assert_one_error_line(proc, command, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("anymodal ")]
    assert len(lines) == 1 and lines[0].startswith(f"anymodal {command}: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.mark.parametrize("override,fragment", [
    ("data.batch_size=-4", "data.batch_size must be >= 1, got -4 (from command line)"),
    ("model.size=huge", "model.size must be one of tiny, small, base, large, got 'huge' (from command line)"),
])
def test_train_rejects_bad_values_before_creating_the_run_folder(tmp_path, override, fragment):
    run_dir = tmp_path / "run"
    # a regression to the spinning batch sampler must fail, not hang the suite
    proc = anymodal("train", "tiny-test", override, "--run-dir", run_dir, check=False, timeout=120)
    assert_one_error_line(proc, "train", fragment)
    assert not run_dir.exists()


@pytest.mark.parametrize("override,fragment", [
    ("run.precision=fp64", "run.precision must be one of auto, fp32, bf16, fp16, got 'fp64' (from command line); did you mean 'fp16'?"),
    ("modality.masker.ratio=1.5", "modality.masker.ratio must be in [0, 1), got 1.5 (from command line)"),
    (f"{STAGE}.steps=many", f"{STAGE}.steps (from command line): expected an integer, got 'many' (str)"),
])
def test_config_command_rejects_what_train_would(override, fragment):
    assert_one_error_line(anymodal("config", "tiny-test", override, check=False, timeout=120), "config", fragment)


def test_config_command_on_a_binary_file(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(128, 256)))
    proc = anymodal("config", path, check=False, timeout=120)
    assert_one_error_line(proc, "config", f"{path}: not a YAML text file")


def test_training_with_a_replaced_dataset_node(tmp_path):
    run_dir = tmp_path / "run"
    anymodal("train", "tiny-test", "data.train={_replace_: true, name: digits, size: 16}", "recipe.stages.*.steps=2",
             "eval.max_train=64", "--run-dir", run_dir, timeout=300)
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert OmegaConf.to_container(saved.data.train) == {"name": "digits", "size": 16}


# the README's quick start
def quick_start_commands() -> list[list[str]]:
    section = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#")[0])[3:] for line in block.splitlines() if line.startswith("python -m anymodal")]


def run_folder(args: list[str]) -> str:
    if "--run-dir" in args:
        return args[args.index("--run-dir") + 1]
    config, overrides = args[1], [a for a in args[2:] if "=" in a]
    run = compose(config, overrides).cfg.run
    return str(Path(run.out_dir) / run.name)


def test_quick_start_commands_each_write_their_own_run_folder():
    commands = quick_start_commands()
    trains = [args for args in commands if args[0] == "train"]
    fresh = [run_folder(args) for args in trains if "--resume" not in args]
    assert len(trains) >= 2 and len(fresh) == len(set(fresh)), fresh  # a second fresh run into one folder fails
    assert all(run_folder(args) in fresh for args in trains if "--resume" in args)  # a resume continues one of them
    assert all(args[1] in fresh for args in commands if args[0] in ("eval", "export"))
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "--run-dir" in section and "run.name=" in section


def test_packaged_configs_validate_under_the_ranges(components):
    # tests/test_config.py composes every packaged file (rglob) the same way; this also runs each recipe
    # on the test config, whose small batches and steps are where a range would bite
    recipes = sorted(p.stem for p in (PACKAGE_CONFIGS / "recipe").rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        # a recipe that addresses sensors by name runs on the scene modality that has them
        scene = "sensor:" in (PACKAGE_CONFIGS / "recipe" / f"{recipe}.yaml").read_text()
        validate(compose("tiny-test", [f"recipe={recipe}", *(["modality=street_scenes"] if scene else [])]), components)
