"""Component nodes nested in an objective's section (the contrastive objective's ``text.tokenizer``
and ``other_tokenizer``): built by core.build from the registries of the config's plugins, checked by
core.config.validate, and drawn from the run's seed in the objective's own order."""

import json
import os
import textwrap

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from anymodal.core.backbone import Backbone
from anymodal.core.build import build_objectives, init_component
from anymodal.core.checkpoint import load_checkpoint
from anymodal.core.config import ConfigError, compose, validate
from anymodal.core.encoder import Encoder
from anymodal.core.posenc import build_posenc
from anymodal.plugins.manager import Components, load_components
from anymodal.tokenizers.image import ImagePatchTokenizer
from anymodal.tokenizers.text import ByteTextTokenizer
from helpers import anymodal

DIM = 32
CONTRASTIVE = "recipe.stages.contrastive.objectives.contrastive"

# an outside plugin, named only in the config, whose tokenizer is the other side of a contrastive
# pair: each row of a digit image is one token (the student sees 4x4 patches of the same image)
ROWS_PLUGIN = '''
    import torch
    from torch import nn

    from anymodal.core.tokens import Tokens
    from anymodal.plugins import hookimpl


    class ImageRows(nn.Module):
        pos_axes = 1

        def __init__(self, dim, size=16, channels=1, input_key="image"):
            super().__init__()
            self.dim, self.input_key, self.grid_size = dim, input_key, (size,)
            self.proj = nn.Linear(channels * size, dim)

        @classmethod
        def example_input(cls, batch_size):
            return {"image": torch.rand(batch_size, 1, 16, 16)}

        def forward(self, image):
            b, c, h, w = image.shape
            pos = torch.arange(h, device=image.device).expand(b, h).unsqueeze(-1)
            return Tokens(x=self.proj(image.permute(0, 2, 1, 3).reshape(b, h, c * w)), pos=pos, grid=(h,))


    @hookimpl
    def register_tokenizers():
        return {"image_rows": ImageRows}
'''

ROWS_CONFIG = """
    defaults: {model: cpu, modality: digits, recipe: clip}
    plugins: [rows_plugin]
    run: {name: rows, log_every: 1, checkpoint_every: 100, progress: false, tensorboard: false}
    model: {dim: 32, depth: 1, num_heads: 2}
    data: {batch_size: 16}
    recipe:
      stages:
        contrastive:
          steps: 2
          objectives:
            contrastive:
              _replace_: true
              pair: modality
              embed_dim: 16
              other_tokenizer: {name: image_rows, size: 16}
              other_posenc: learned
          optim: {warmup_steps: 0}
    eval: {probe_iters: 5, max_train: 64, max_test: 64, retrieval_samples: 64, pictures: false}
"""


@pytest.fixture(scope="module")
def components():
    return load_components(autoload=False)


def _backbone(seed=0):
    torch.manual_seed(seed)
    tok = ImagePatchTokenizer(DIM, image_size=16, patch_size=4, channels=1)
    return Backbone(tok, Encoder(DIM, 1, 2, build_posenc("sincos", DIM, 2), cls_token=False))


def _stage(**objectives):
    return OmegaConf.create({"objectives": objectives, "masker": None})


# ---------------------------------------------------------------- a config-named plugin's tokenizer


def test_config_named_plugins_tokenizer_is_the_other_side_of_a_contrastive_pair(tmp_path):
    (tmp_path / "rows_plugin.py").write_text(textwrap.dedent(ROWS_PLUGIN))
    (tmp_path / "rows.yaml").write_text(textwrap.dedent(ROWS_CONFIG))
    run = tmp_path / "run"
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    anymodal("train", tmp_path / "rows.yaml", "--run-dir", run, env_extra={"PYTHONPATH": path}, cwd=tmp_path)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r["contrastive/infonce"], float) for r in records)
    state = load_checkpoint(run / "checkpoints" / "contrastive-final.pt")["objectives"]
    # built at the encoder's width, with a learned table over the plugin tokenizer's 16 rows
    assert state["contrastive.other_tokenizer.proj.weight"].shape == (DIM, 16)
    assert state["contrastive.other_posenc.table"].shape == (16, DIM)


# ---------------------------------------------------------------- build


def test_text_tokenizer_is_built_at_the_text_towers_width(components):
    cfg = compose("tiny-two-stage").cfg
    bb = _backbone()
    objectives, _ = build_objectives(cfg.recipe.stages.contrastive, components, bb)
    text = objectives["contrastive"].text
    assert isinstance(text.tokenizer, ByteTextTokenizer) and text.tokenizer.dim == text.dim == 32
    bb = Backbone(bb.tokenizer, Encoder(48, 1, 2, build_posenc("sincos", 48, 2)))  # another student width
    node = {"pair": "modality", "other_tokenizer": {"name": "image_patch", "image_size": 8, "patch_size": 4, "input_key": "rgb"}}
    objectives, _ = build_objectives(_stage(contrastive=node), components, bb)
    assert objectives["contrastive"].other_tokenizer.dim == 48  # no dim of its own: the encoder's


def test_nested_weights_come_in_the_objectives_own_order(components):
    # as when the objective built its text tower itself: its projection, the text tokenizer, the text
    # encoder, the partner projection, all from one seeded stream
    node = {"pair": "text", "embed_dim": 16,
            "text": {"dim": 24, "depth": 1, "num_heads": 2, "tokenizer": {"name": "byte_text", "max_len": 16}}}
    bb = _backbone()
    torch.manual_seed(3)
    objectives, _ = build_objectives(_stage(contrastive=node), components, bb)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    reference = nn.ModuleList([nn.Linear(DIM, 16), ByteTextTokenizer(24, max_len=16),
                               Encoder(24, 1, 2, build_posenc("sincos", 24, 1), cls_token=False), nn.Linear(24, 16)])
    torch.testing.assert_close(torch.get_rng_state(), after)
    obj = objectives["contrastive"]
    built = nn.ModuleList([obj.sample_proj, obj.text.tokenizer, obj.text.encoder, obj.partner_proj])
    for (name, a), b in zip(built.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


class _Holder(nn.Module):
    """An objective that declares a nested tokenizer and does not initialize it itself."""

    components = {"inner.tokenizer": "tokenizer"}

    def __init__(self, dim, tokenizer, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 4)
        self.inner = inner["tokenizer"]


def test_a_nested_component_is_initialized_after_its_holder_when_the_holder_does_not():
    comps = Components()
    comps.objective.add("holder", _Holder, "test")
    comps.tokenizer.add("image_patch", ImagePatchTokenizer, "test")
    node = {"inner": {"dim": 8, "tokenizer": {"name": "image_patch", "image_size": 8, "patch_size": 4}}}
    bb = _backbone()
    torch.manual_seed(5)
    holder = build_objectives(_stage(holder=node), comps, bb)[0]["holder"]
    torch.manual_seed(5)
    proj, inner = nn.Linear(DIM, 4), ImagePatchTokenizer(8, image_size=8, patch_size=4)
    torch.testing.assert_close(holder.proj.weight, proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(holder.inner.proj.weight, inner.proj.weight, rtol=0, atol=0)  # at the holder's `dim: 8`
    assert init_component(holder.inner) is holder.inner  # once only: now it is an ordinary module
    torch.testing.assert_close(holder.inner.proj.weight, inner.proj.weight, rtol=0, atol=0)


def test_nested_node_without_a_name_is_an_error(components):
    node = {"pair": "modality", "other_tokenizer": {"image_size": 8}}
    with pytest.raises(ValueError, match=r"objectives.contrastive.other_tokenizer must be a mapping with a 'name'"):
        build_objectives(_stage(contrastive=node), components, _backbone())


# ---------------------------------------------------------------- validate


def test_misspelled_nested_tokenizer_names_key_file_and_closest(components):
    with pytest.raises(ConfigError) as e:
        validate(compose("tiny-two-stage", [f"{CONTRASTIVE}.text.tokenizer.name=byte_txt"]), components)
    assert (f"{CONTRASTIVE}.text.tokenizer.name: unknown tokenizer 'byte_txt' (from command line); "
            "did you mean 'byte_text'?") in str(e.value)
    assert "registered: " in str(e.value) and "clip_bpe" in str(e.value)


def test_nested_errors_name_the_file_and_the_argument(components, tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(textwrap.dedent("""
        defaults: {model: cpu, modality: digits, recipe: clip}
        recipe:
          stages:
            contrastive:
              objectives:
                contrastive: {text: {tokenizer: {name: byte_text, max_lenn: 8}}}
    """))
    with pytest.raises(ConfigError) as e:
        validate(compose(str(cfg)), components)
    assert f"{CONTRASTIVE}.text.tokenizer (tokenizer 'byte_text', from {cfg}): unknown argument 'max_lenn' " \
           "(did you mean 'max_len'?)" in str(e.value)
    assert "'dim'" not in str(e.value)  # given by the builder


def test_nested_tokenizer_of_an_unlisted_plugin_is_a_config_error(components):
    node = "{_replace_: true, pair: modality, other_tokenizer: {name: image_rows}}"
    with pytest.raises(ConfigError, match=rf"{CONTRASTIVE}.other_tokenizer.name: unknown tokenizer 'image_rows' "
                                          r"\(from command line\)"):
        validate(compose("tiny-two-stage", [f"{CONTRASTIVE}={node}"]), components)
