"""JEPA and distillation objectives on a tiny image backbone (CPU, seconds)."""

import copy

import pytest
import torch
from torch import nn

from anymodal.core.backbone import Backbone
from anymodal.core.encoder import Encoded, Encoder
from anymodal.core.masking import MultiBlockMasker, RandomMasker
from anymodal.core.objective import Batch
from anymodal.core.posenc import build_posenc
from anymodal.core.teachers import BackboneTeacher, EmaTeacher
from anymodal.core.tokens import gather_tokens
from anymodal.objectives.distill import (MaskedDistill, UnmaskedTokenDistill, arrange_visible, normalize_features,
                                         normalized_mse, teacher_targets)
from anymodal.objectives.jepa import Jepa, variance_hinge
from anymodal.tokenizers.image import ImagePatchTokenizer

DIM = 32
B = 4


def tiny_backbone(dim=DIM, seed=0):
    torch.manual_seed(seed)
    return Backbone(ImagePatchTokenizer(dim=dim, image_size=16, patch_size=4, channels=1),
                    Encoder(dim, 2, 2, build_posenc("sincos", dim, 2)))


def images(seed=0):
    return torch.randn(B, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def make_batch(student, masker, raw=None, seed=0):
    """A fresh batch (empty teacher cache); the same seed gives the same mask and the same shuffle."""
    raw = {"image": images() if raw is None else raw}
    generator = torch.Generator().manual_seed(seed)
    tokens = student.tokenize(raw)
    return Batch(raw, tokens, masker(tokens, generator), generator)


def jepa_masker():
    return MultiBlockMasker(min_context=2)


class EditedTeacher(nn.Module):
    """A frozen backbone teacher whose final token features are replaced by noise at ``index [B, M]``."""

    def __init__(self, backbone, index=None):
        super().__init__()
        self.inner = BackboneTeacher(copy.deepcopy(backbone))
        self.dim = self.inner.dim
        self.index = index

    def forward(self, batch, layers=0):
        encoded = self.inner(batch, layers)
        if self.index is None:
            return encoded
        x = encoded.tokens.x.clone()
        noise = torch.randn(*self.index.shape, x.shape[-1], generator=torch.Generator().manual_seed(7))
        x.scatter_(1, self.index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), noise)
        return Encoded(encoded.tokens.with_x(x), encoded.cls, encoded.layers)


# ---------------------------------------------------------------------------------------------- jepa


def test_jepa_predictor_queries_exactly_the_target_positions():
    student = tiny_backbone()
    objective = Jepa(DIM, student.tokenizer)
    batch = make_batch(student, jepa_masker())
    seen = []
    objective.predictor.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    pred = objective.predict(batch, student)
    assert len(seen) == 1
    assert torch.equal(seen[0], gather_tokens(batch.tokens.pos, batch.mask.target))
    assert pred.shape == (B, batch.mask.target.shape[1], DIM)


def test_jepa_gradients_reach_student_and_predictor_not_teacher():
    student = tiny_backbone()
    teacher = EmaTeacher(student)
    objective = Jepa(DIM, student.tokenizer)
    out = objective(make_batch(student, jepa_masker()), student, teacher)
    out.loss.backward()
    assert set(out.metrics) == {"loss", "pred_std"} and out.metrics["pred_std"] > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert student.tokenizer.proj.weight.grad is not None and student.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is not None for p in objective.parameters())


def test_jepa_loss_decreases_on_a_fixed_batch():
    student = tiny_backbone()
    teacher = EmaTeacher(student)
    objective = Jepa(DIM, student.tokenizer)
    optimizer = torch.optim.AdamW([*student.parameters(), *objective.parameters()], lr=2e-3)
    losses = []
    for _ in range(30):
        out = objective(make_batch(student, jepa_masker()), student, teacher)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_jepa_norm_targets_layer_normalizes_the_teacher_features():
    student = tiny_backbone()
    teacher = EmaTeacher(student)
    batch = make_batch(student, jepa_masker())
    normed = Jepa(DIM, student.tokenizer, norm_targets=True).targets(batch, teacher)
    raw = Jepa(DIM, student.tokenizer, norm_targets=False).targets(batch, teacher)
    assert torch.equal(raw, gather_tokens(teacher(batch).tokens.x, batch.mask.target))
    assert not torch.allclose(normed, raw)
    assert torch.allclose(normed, torch.nn.functional.layer_norm(raw, (DIM,)), atol=1e-5)


def test_jepa_l1_loss_and_bad_loss_name():
    student = tiny_backbone()
    out = Jepa(DIM, student.tokenizer, loss="l1")(make_batch(student, jepa_masker()), student, EmaTeacher(student))
    assert out.loss.item() > 0
    with pytest.raises(ValueError, match="smooth_l1, l1"):
        Jepa(DIM, student.tokenizer, loss="mse")


# ---------------------------------------------------------------------------------------------- umt


def test_umt_aligns_exactly_the_visible_tokens():
    student = tiny_backbone()
    masker = RandomMasker(0.75)
    objective = UnmaskedTokenDistill(DIM)
    base = make_batch(student, masker)
    mask = base.mask
    loss = objective(base, student, EditedTeacher(student)).loss
    at_targets = objective(make_batch(student, masker), student, EditedTeacher(student, mask.target)).loss
    at_one_visible = objective(make_batch(student, masker), student, EditedTeacher(student, mask.visible[:, :1])).loss
    assert torch.allclose(loss, at_targets)
    assert not torch.allclose(loss, at_one_visible)


def test_umt_loss_is_normalized_mse_through_the_projection():
    student = tiny_backbone()
    teacher = EmaTeacher(student)
    objective = UnmaskedTokenDistill(DIM)
    batch = make_batch(student, RandomMasker(0.75))
    pred = objective.proj[0](student.encode(batch.tokens, batch.mask.visible).tokens.x)
    target = gather_tokens(teacher(batch).tokens.x, batch.mask.visible)
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1)
    expected = (2 - 2 * cos).mean()
    assert torch.allclose(objective(batch, student, teacher).loss, expected, atol=1e-5)
    assert torch.allclose(normalized_mse(pred, target), expected, atol=1e-5)


def test_umt_last_k_layers_each_get_a_projection():
    student = tiny_backbone()
    objective = UnmaskedTokenDistill(DIM, layers=2)
    assert len(objective.proj) == 2
    out = objective(make_batch(student, RandomMasker(0.75)), student, EmaTeacher(student))
    out.loss.backward()
    assert {"loss", "layer0", "layer1"} <= set(out.metrics)
    assert abs(out.metrics["loss"] - (out.metrics["layer0"] + out.metrics["layer1"]) / 2) < 1e-5
    assert all(p.grad is not None for p in objective.parameters())
    with pytest.raises(ValueError, match="last 3 blocks"):
        UnmaskedTokenDistill(DIM, layers=3)(make_batch(student, RandomMasker(0.75)), student, EmaTeacher(student))
    with pytest.raises(ValueError, match="at least 1"):
        UnmaskedTokenDistill(DIM, layers=0)


def test_umt_teacher_width_differs_from_student():
    student = tiny_backbone()
    teacher = BackboneTeacher(tiny_backbone(dim=48, seed=1))
    objective = UnmaskedTokenDistill(DIM, teacher_dim=teacher.dim)
    batch = make_batch(student, RandomMasker(0.75))
    preds, targets = objective.features(batch, student, teacher)
    assert preds[0].shape == targets[0].shape == (B, batch.mask.visible.shape[1], 48)
    objective(batch, student, teacher).loss.backward()
    with pytest.raises(ValueError, match="teacher_dim to 48"):
        UnmaskedTokenDistill(DIM)(make_batch(student, RandomMasker(0.75)), student, teacher)


# ---------------------------------------------------------------------------------------------- videoprism


def test_arrange_visible_identity_without_shuffle_and_a_derangement_with():
    features = torch.randn(B, 10, 8)
    same, perm = arrange_visible(features, torch.Generator().manual_seed(0), shuffle=False)
    assert torch.equal(same, features) and torch.equal(perm, torch.arange(10).expand(B, 10))
    moved, perm = arrange_visible(features, torch.Generator().manual_seed(0), shuffle=True)
    assert torch.equal(perm.sort(1).values, torch.arange(10).expand(B, 10))  # a permutation per sample
    assert (perm != torch.arange(10)).all()  # every feature lands at another slot
    assert torch.equal(moved, gather_tokens(features, perm))
    assert not torch.equal(perm[0], perm[1])  # drawn per sample


@pytest.mark.parametrize("shuffle", [False, True])
def test_masked_distill_shuffle_moves_features_not_positions(shuffle):
    student = tiny_backbone()
    objective = MaskedDistill(DIM, student.tokenizer, shuffle=shuffle)
    batch = make_batch(student, RandomMasker(0.5))
    seen = []
    objective.token_decoder.register_forward_pre_hook(lambda module, args: seen.append(args))
    _, token_pred, perm = objective.predict(batch, student)
    context, context_pos, target_pos, _ = seen[0]
    encoded = student.encode(batch.tokens, batch.mask.visible)
    assert torch.equal(context_pos, gather_tokens(batch.tokens.pos, batch.mask.visible))  # slots keep their positions
    assert torch.equal(target_pos, gather_tokens(batch.tokens.pos, batch.mask.target))
    assert torch.allclose(context, gather_tokens(encoded.tokens.x, perm))
    identity = torch.arange(perm.shape[1]).expand_as(perm)
    assert torch.equal(perm, identity) != shuffle
    assert torch.allclose(context, encoded.tokens.x) != shuffle
    assert token_pred.shape == (B, batch.mask.target.shape[1], DIM)


def test_masked_distill_token_loss_is_at_targets_and_global_target_is_teacher_mean():
    student = tiny_backbone()
    masker = RandomMasker(0.5)  # visible and target together cover every token
    objective = MaskedDistill(DIM, student.tokenizer)
    mask = make_batch(student, masker).mask
    teacher = EditedTeacher(student)
    batch = make_batch(student, masker)
    global_target, token_target = objective.targets(batch, teacher)
    full = teacher(batch)
    assert torch.allclose(global_target, full.pool("mean")) and torch.allclose(global_target, full.tokens.x.mean(1))
    assert torch.equal(token_target, gather_tokens(full.tokens.x, mask.target))

    base = objective(make_batch(student, masker), student, teacher).metrics
    at_visible = objective(make_batch(student, masker), student, EditedTeacher(student, mask.visible)).metrics
    at_target = objective(make_batch(student, masker), student, EditedTeacher(student, mask.target[:, :1])).metrics
    assert at_visible["token"] == pytest.approx(base["token"], abs=1e-6)
    assert at_visible["global"] != pytest.approx(base["global"], abs=1e-6)
    assert at_target["token"] != pytest.approx(base["token"], abs=1e-6)


def test_masked_distill_backward_reaches_both_decoders_and_student():
    student = tiny_backbone()
    teacher = BackboneTeacher(tiny_backbone(dim=48, seed=1))
    objective = MaskedDistill(DIM, student.tokenizer, teacher_dim=48, decoder_dim=32, decoder_heads=2,
                              global_weight=0.5, token_weight=2.0)
    out = objective(make_batch(student, RandomMasker(0.75)), student, teacher)
    out.loss.backward()
    assert out.metrics["loss"] == pytest.approx(0.5 * out.metrics["global"] + 2.0 * out.metrics["token"], rel=1e-5)
    assert all(p.grad is not None for p in objective.global_decoder.parameters())
    assert all(p.grad is not None for p in objective.token_decoder.parameters())
    assert student.encoder.blocks[-1].mlp.fc2.weight.grad is not None
    with pytest.raises(ValueError, match="teacher_dim to 48"):
        MaskedDistill(DIM, student.tokenizer)(make_batch(student, RandomMasker(0.75)), student, teacher)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("build", [
    lambda tok: Jepa(DIM, tok),
    lambda tok: UnmaskedTokenDistill(DIM, tok),
    lambda tok: MaskedDistill(DIM, tok),
], ids=["jepa", "umt", "masked_distill"])
def test_objectives_need_a_mask_and_a_teacher(build):
    student = tiny_backbone()
    objective = build(student.tokenizer)
    assert objective.needs_mask and objective.needs_teacher
    batch = make_batch(student, RandomMasker(0.5))
    with pytest.raises(ValueError, match="teacher"):
        objective(batch, student, None)
    unmasked = Batch(batch.raw, batch.tokens, None, batch.generator)
    with pytest.raises(ValueError, match="masker"):
        objective(unmasked, student, EmaTeacher(student))


@pytest.mark.parametrize("objective_class", [Jepa, MaskedDistill])
def test_predict_needs_a_mask(objective_class):
    student = tiny_backbone()
    batch = make_batch(student, RandomMasker(0.5))
    with pytest.raises(ValueError, match="masker"):
        objective_class(DIM, student.tokenizer).predict(Batch(batch.raw, batch.tokens, None, batch.generator), student)


# ---------------------------------------------------------------------------------------------- data2vec targets


class CountingTeacher(BackboneTeacher):
    """A backbone teacher that counts its runs."""

    def __init__(self, backbone):
        super().__init__(copy.deepcopy(backbone))
        self.calls = 0

    def forward(self, batch, layers=0):
        self.calls += 1
        return super().forward(batch, layers)


def test_normalize_features_instance_is_instance_norm_over_the_tokens():
    x = torch.randn(B, 10, 6) * 3 + 1
    expected = torch.nn.functional.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(normalize_features(x, "instance"), expected, atol=1e-5)
    assert torch.allclose(normalize_features(x, "layer"), torch.nn.functional.layer_norm(x, (6,)))
    assert torch.equal(normalize_features(x, "none"), x)
    # padded tokens take no part in the statistics
    valid = torch.ones(B, 10, dtype=torch.bool)
    valid[:, 7:] = False
    padded = normalize_features(x, "instance", valid)
    assert torch.allclose(padded[:, :7], normalize_features(x[:, :7], "instance"), atol=1e-5)
    with pytest.raises(ValueError, match="none, layer, instance"):
        normalize_features(x, "batch")


def test_teacher_targets_average_the_instance_normalized_last_blocks():
    student = tiny_backbone()
    teacher = CountingTeacher(student)
    batch = make_batch(student, RandomMasker(0.5))
    got = teacher_targets(batch, teacher, layers=2, norm="instance")
    blocks = teacher.backbone.encode(batch.tokens, None, 2).layers  # the same tokens, run directly
    direct = [torch.nn.functional.instance_norm(h.transpose(1, 2)).transpose(1, 2) for h in blocks]
    assert torch.allclose(got, (direct[0] + direct[1]) / 2, atol=1e-5)
    assert teacher_targets(batch, teacher, layers=1, norm="instance").shape == got.shape
    assert teacher.calls == 1  # one teacher run serves every layer count up to 2
    with pytest.raises(ValueError, match="last 3 blocks"):
        teacher_targets(make_batch(student, RandomMasker(0.5)), teacher, layers=3)


def test_masked_distill_defaults_keep_the_final_feature_targets_and_normalized_mse():
    student = tiny_backbone()
    teacher = EmaTeacher(student)
    objective = MaskedDistill(DIM, student.tokenizer, global_weight=0.0)
    batch = make_batch(student, RandomMasker(0.75))
    _, token_target = objective.targets(batch, teacher)
    assert torch.equal(token_target, gather_tokens(teacher(batch).tokens.x, batch.mask.target))
    _, token_pred, _ = objective.predict(batch, student)
    assert objective(batch, student, teacher).loss.item() == pytest.approx(
        normalized_mse(token_pred, token_target).item(), rel=1e-5)


@pytest.mark.parametrize("loss", ["mse", "smooth_l1"])
def test_masked_distill_data2vec_targets_and_loss(loss):
    student = tiny_backbone()
    teacher = CountingTeacher(student)
    objective = MaskedDistill(DIM, student.tokenizer, global_weight=0.0, target_layers=2, target_norm="instance",
                              loss=loss)
    batch = make_batch(student, RandomMasker(0.75))
    _, token_target = objective.targets(batch, teacher)
    assert teacher.calls == 1  # the global and the token targets share one teacher run
    assert torch.allclose(token_target, gather_tokens(teacher_targets(batch, teacher, 2, "instance"), batch.mask.target))
    _, token_pred, _ = objective.predict(batch, student)
    fn = torch.nn.functional.mse_loss if loss == "mse" else torch.nn.functional.smooth_l1_loss
    out = objective(batch, student, teacher)
    assert out.loss.item() == pytest.approx(fn(token_pred, token_target).item(), rel=1e-5)
    out.loss.backward()
    assert student.encoder.blocks[-1].mlp.fc2.weight.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"target_layers": -1}, "target_layers"),
    ({"target_norm": "batch"}, "target_norm must be one of none, layer, instance"),
    ({"loss": "huber"}, "loss must be one of normalized_mse, mse, smooth_l1"),
])
def test_masked_distill_rejects_bad_target_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedDistill(DIM, tiny_backbone().tokenizer, **kwargs)


def test_jepa_layer_averaged_targets_and_variance_hinge():
    student = tiny_backbone()
    teacher = EmaTeacher(student)
    batch = make_batch(student, jepa_masker())
    objective = Jepa(DIM, student.tokenizer, norm_targets="instance", target_layers=2, var_weight=0.5)
    expected = gather_tokens(teacher_targets(batch, teacher, 2, "instance"), batch.mask.target)
    assert torch.allclose(objective.targets(batch, teacher), expected)
    out = objective(batch, student, teacher)
    out.loss.backward()
    assert "var_hinge" in out.metrics and out.metrics["var_hinge"] > 0
    assert student.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_variance_hinge_is_zero_above_unit_std_and_positive_for_a_collapse():
    spread = torch.randn(256, 8) * 3
    assert variance_hinge(spread).item() == 0.0
    assert variance_hinge(torch.ones(256, 8)).item() == pytest.approx(1 - 1e-2, rel=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"norm_targets": "batch"}, "norm_targets must be true, false or one of none, layer, instance"),
    ({"target_layers": -1}, "target_layers"),
    ({"var_weight": -0.1}, "var_weight"),
])
def test_jepa_rejects_bad_target_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Jepa(DIM, tiny_backbone().tokenizer, **kwargs)
