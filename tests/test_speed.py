"""Speed switches: activation checkpointing, the SDPA kernel choice, compiled blocks. Each must
change speed or memory only, never the numbers."""

import pytest
import torch

from anymodal.core.checkpoint import load_checkpoint
from anymodal.core.device import SDPA_KERNELS, sdpa_kernels
from anymodal.core.encoder import Encoder
from anymodal.core.posenc import build_posenc
from anymodal.core.tokens import Tokens
from helpers import anymodal, losses


def _tokens(b=3, side=4, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(1, -1, 2)
    return Tokens(x=torch.randn(b, side * side, dim, generator=g), pos=pos.expand(b, -1, -1))


def _grads(encoder, tokens):
    encoder.zero_grad()
    encoder(tokens).tokens.x.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in encoder.named_parameters()}


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    encoder = Encoder(32, 3, 2, build_posenc("sincos", 32, 2))
    tokens = _tokens()
    plain = _grads(encoder, tokens)
    encoder.grad_checkpointing = True
    recomputed = _grads(encoder, tokens)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sdpa_kernel_choice_keeps_outputs_and_rejects_unknown_names():
    torch.manual_seed(0)
    encoder = Encoder(32, 2, 2, build_posenc("sincos", 32, 2)).eval()
    tokens = _tokens()
    ref = encoder(tokens).tokens.x
    with sdpa_kernels("math"):
        torch.testing.assert_close(encoder(tokens).tokens.x, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="run.sdpa_kernel must be one of auto, flash"):
        sdpa_kernels("flash2")
    assert "cudnn" in SDPA_KERNELS


def test_unknown_compile_mode_is_a_clear_error(tmp_path):
    proc = anymodal("train", "tiny-test", "--run-dir", tmp_path / "run", "run.compile=fast", check=False)
    assert proc.returncode != 0 and "run.compile must be one of none, blocks, objectives, got 'fast'" in proc.stderr


def test_compile_modes_choose_what_is_compiled():
    from anymodal.core.device import compile_for
    from anymodal.core.layers import Block

    torch.manual_seed(0)
    student = torch.nn.ModuleDict({"encoder": Encoder(32, 2, 2, build_posenc("sincos", 32, 2))})
    objectives = torch.nn.ModuleDict({"head": torch.nn.Sequential(Block(32, 2), torch.nn.Linear(32, 4))})
    model = torch.nn.ModuleDict({"backbone": student, "objectives": objectives})  # as the trainer builds it

    def compiled(module):  # nn.Module.compile() sets the compiled call in place; compilation itself is lazy
        return module._compiled_call_impl is not None

    compile_for("none", model, objectives, None)
    assert not any(compiled(m) for m in [*student.modules(), *objectives.modules()])
    compile_for("objectives", model, objectives, None)
    assert compiled(objectives["head"]) and not any(compiled(m) for m in student.modules())
    compile_for("blocks", model, objectives, None)
    blocks = [m for m in [*student.modules(), *objectives.modules()] if isinstance(m, Block)]
    assert len(blocks) == 3 and all(compiled(b) for b in blocks)
    with pytest.raises(ValueError, match="run.cuda_graphs=true replays compiled code: set run.compile"):
        compile_for("none", model, objectives, None, cuda_graphs=True)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["blocks"])  # objectives mode: wiring above, GPU timing in the README
def test_compiled_checkpointed_run_trains_and_writes_plain_parameter_names(tmp_path, mode):
    # torch.compile, activation checkpointing and a pinned SDPA kernel, through the trainer
    fast = tmp_path / "fast"
    anymodal("train", "tiny-test", "--run-dir", fast, "recipe.stages.pretrain.steps=4", f"run.compile={mode}",
             "model.grad_checkpointing=true", "run.sdpa_kernel=math", timeout=600)
    plain = tmp_path / "plain"
    anymodal("train", "tiny-test", "--run-dir", plain, "recipe.stages.pretrain.steps=4")
    fast_losses, plain_losses = losses(fast), losses(plain)
    assert len(fast_losses) == 4
    # same seed, same batches, same arithmetic up to kernel rounding
    for (_, _, a), (_, _, b) in zip(fast_losses, plain_losses):
        assert a == pytest.approx(b, rel=1e-3)
    fast_state = load_checkpoint(fast / "checkpoints" / "last.pt")["backbone"]
    plain_state = load_checkpoint(plain / "checkpoints" / "last.pt")["backbone"]
    assert fast_state.keys() == plain_state.keys()


@pytest.mark.parametrize("kind", ["image", "video", "audio"])
def test_tokenizers_skip_targets_when_told_and_nothing_else_changes(kind):
    from anymodal.tokenizers.audio import SpectrogramPatchTokenizer
    from anymodal.tokenizers.image import ImagePatchTokenizer
    from anymodal.tokenizers.video import TubeletTokenizer

    torch.manual_seed(0)
    tokenizer, raw = {
        "image": (ImagePatchTokenizer(16, image_size=8, patch_size=4, channels=1), (torch.randn(2, 1, 8, 8),)),
        "video": (TubeletTokenizer(16, frames=4, image_size=8, tubelet=(2, 4, 4), channels=1), (torch.randn(2, 1, 4, 8, 8),)),
        "audio": (SpectrogramPatchTokenizer(16, max_seconds=1.0), (0.1 * torch.randn(2, 16000),)),
    }[kind]
    full = tokenizer(*raw)
    tokenizer.make_targets = False
    lean = tokenizer(*raw)
    assert full.targets is not None and lean.targets is None
    assert torch.equal(full.x, lean.x) and torch.equal(full.pos, lean.pos)


def test_trainer_makes_targets_only_for_stages_that_read_them(tmp_path):
    """A contrastive stage turns the tokenizer's targets off; a masked-reconstruction stage needs them."""
    from anymodal.app.cli import load_config
    from anymodal.core.trainer import Trainer
    from anymodal.objectives.masked_pixel import MaskedPixel

    for recipe, wanted in (("clip", False), ("mae", True)):
        composed, components = load_config("tiny-test", [f"recipe={recipe}", "recipe.stages.*.steps=1",
                                                         "run.progress=false", "run.tensorboard=false"])
        trainer = Trainer(composed.cfg, components, tmp_path / recipe)
        trainer.run()
        assert trainer.backbone.tokenizer.make_targets is wanted, recipe
    assert MaskedPixel.needs_targets


def test_unavailable_attention_backend_is_one_error_line(tmp_path):
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("xformers imports here: the backend is available")
    proc = anymodal("train", "tiny-test", "--run-dir", tmp_path / "run", "model.attn_backend=xformers", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.attn_backend=xformers" in proc.stderr and "attn_backend=sdpa" in proc.stderr, proc.stderr
