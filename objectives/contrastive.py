"""Contrastive learning with a symmetric InfoNCE loss (CLIP: Radford et al., 2021, "Learning
Transferable Visual Models From Natural Language Supervision"; reference code github.com/openai/CLIP,
and github.com/mlfoundations/open_clip's ``ClipLoss`` for negatives gathered across ranks).

Each sample is embedded by the student and paired with a partner: its caption (a small text tower
owned by this objective), a second augmented view of it (SimCLR-style), or a second modality of it
encoded by the same shared encoder. Matching pairs are positives; every other pair in the global
batch is a negative. With ``mask_ratio`` the student sees only a random subset of its tokens (FLIP:
Li et al., 2023, "Scaling Language-Image Pre-training via Masking"), which is what makes
contrastive training on long videos affordable.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.build import init_component
from ..core.distributed import all_gather_with_grad, rank
from ..core.encoder import Encoded
from ..core.masking import RandomMasker
from ..core.objective import Batch, ObjectiveOutput
from ..core.posenc import build_posenc
from ..core.registry import check_kwargs
from ..core.tokens import Tokens
from .text_tower import TextEncoder

__all__ = ["Contrastive", "AttentivePool", "info_nce", "PAIRS", "POOLS"]

PAIRS = ("text", "views", "modality", "sensor")
POOLS = ("mean", "attentive")
VIEW2_SUFFIX = "_view2"  # batch[<student input key> + this] holds the second view (pair=views)


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, a_all: Optional[Tensor] = None,
             b_all: Optional[Tensor] = None, offset: int = 0) -> Tensor:
    """Symmetric InfoNCE: the mean of the cross-entropies a -> b and b -> a, ``a[i] <-> b[i]`` positive.

    Args:
        a: ``[B, E]`` L2-normalized embeddings of the samples.
        b: ``[B, E]`` L2-normalized embeddings of their partners.
        logit_scale: scalar inverse temperature.
        a_all: ``[N, E]`` the samples of the whole global batch (every rank's), ``a`` at rows
            ``offset:offset + B``; default ``a``.
        b_all: the same for the partners; default ``b``.
        offset: where this rank's rows start in ``a_all`` and ``b_all``.

    Returns:
        The loss averaged over the ``B`` rows of both directions (a scalar).

    Raises:
        ValueError: ``a`` and ``b`` differ in shape.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"info_nce needs two [B, E] embeddings of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    labels = torch.arange(a.shape[0], device=a.device) + offset
    loss_ab = F.cross_entropy(logit_scale * a @ b_all.T, labels)
    loss_ba = F.cross_entropy(logit_scale * b @ a_all.T, labels)
    return (loss_ab + loss_ba) / 2


class AttentivePool(nn.Module):
    """One learned query cross-attends to a token set: a learned weighted average per head.

    As in the attentive probes of V-JEPA and the pooling by multihead attention of Set Transformer.
    Padding slots (``padding`` True) get no weight.

    Args:
        dim: token width.
        num_heads: attention heads; ``dim`` must divide evenly.
    """

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attentive pooling: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, x: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, D]``, ``padding [B, N]`` -> ``[B, D]``."""
        b, n, d = x.shape
        hd = d // self.num_heads
        q = self.q(self.query.to(x.dtype)).reshape(1, 1, self.num_heads, hd).permute(0, 2, 1, 3).expand(b, -1, -1, -1)
        k, v = self.kv(self.norm(x)).reshape(b, n, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        keep = None if padding is None else (~padding)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # [B, H, 1, hd]
        return self.proj(out.reshape(b, d))


class Contrastive(nn.Module):
    """CLIP-style contrastive objective between each sample and its partner.

    The student's side: the encoder's tokens pooled (``mean`` over real tokens or a learned
    ``attentive`` query), then a linear projection and L2 normalization. The partner's side has its
    own projection (shared with the student's for ``views``, whose two sides are alike). Loss:
    `info_nce` with a learnable temperature, initialized as CLIP's and kept in
    ``[1, max_logit_scale]`` on the logit scale (the parameter is clamped at each forward, as CLIP
    clamps it after each step).

    Negatives from every rank: each rank scores its own samples against the partners of the whole
    global batch (``all_gather_with_grad``; labels offset by rank x local batch), so its loss is its
    share of the global-batch loss and, under DDP's gradient averaging, the parameters receive the
    gradient of the global-batch loss exactly. Local batches must be the same size on every rank.

    Args:
        dim: the student's width (given by the trainer).
        tokenizer: the student's tokenizer (given by the trainer); only its ``input_key`` is used.
        pair: ``text`` (the captions in ``batch[text input key]``, through a text tower), ``views``
            (a second augmented view in ``batch[input_key + "_view2"]``, encoded by the student) or
            ``modality`` (``batch[other_key]`` through ``other_tokenizer`` and the student's encoder)
            or ``sensor`` (another sensor of a scene sample, ``other_sensor``, through the student's
            own tokenizer of it: camera and lidar of one frame are the positives).
        embed_dim: width of the shared embedding space.
        pool: ``mean`` or ``attentive``, for the sides the student encodes.
        temperature: initial softmax temperature.
        learn_temperature: learn it (else it stays fixed).
        max_logit_scale: upper bound of the inverse temperature.
        mask_ratio: fraction of each sample's real tokens the student does not see during training
            (0 = all); a stage masker, when there is one, chooses instead (``batch.mask.visible``).
        gather: use the other ranks' samples as negatives.
        text: keyword arguments of the `TextEncoder` (``pair=text``), its ``tokenizer`` a built text
            tokenizer (in a config, a node such as ``tokenizer: {name: byte_text}``, built by
            ``core.build`` at ``text.dim``).
        other_key: batch field of the second modality (``pair=modality``; default the other
            tokenizer's ``input_key``).
        other_tokenizer: the second modality's tokenizer, built (in a config, a node
            ``{name: ..., **kwargs}``, built by ``core.build`` at the encoder's width)
            (``pair=modality``).
        other_posenc: the positional encoding of the second modality's tokens in the shared
            encoder (``sincos``, ``learned``, ``mlp``), built for that tokenizer's position axes,
            so the two modalities need not share a kind of position (2-D patches and 3-D points).
        other_sensor: the partner sensor (``pair=sensor``), one of the backbone's sensors.
        sensor: the stage's sensor, whose tokens the batch holds (given by the trainer).

    Raises:
        ValueError: an unknown pair or pooling, a temperature out of bounds, a bad mask ratio, a
            missing or unbuilt tokenizer, or arguments that belong to another pair.
    """

    needs_mask = False
    sensor_args = ("other_sensor",)  # checked against the modality's sensors when the config loads
    components: ClassVar[Mapping[str, str]] = {"text.tokenizer": "tokenizer", "other_tokenizer": "tokenizer"}

    def __init__(self, dim: int, tokenizer: nn.Module, pair: str = "text", embed_dim: int = 128, pool: str = "mean",
                 temperature: float = 0.07, learn_temperature: bool = True, max_logit_scale: float = 100.0,
                 mask_ratio: float = 0.0, gather: bool = True, text: Optional[Mapping[str, Any]] = None,
                 other_key: Optional[str] = None, other_tokenizer: Optional[nn.Module] = None,
                 other_posenc: str = "sincos", other_sensor: Optional[str] = None, sensor: Optional[str] = None) -> None:
        super().__init__()
        if pair not in PAIRS:
            raise ValueError(f"unknown contrastive pair {pair!r}; choose one of {', '.join(PAIRS)}")
        if pool not in POOLS:
            raise ValueError(f"unknown contrastive pool {pool!r}; choose one of {', '.join(POOLS)}")
        if max_logit_scale <= 1.0:
            raise ValueError(f"contrastive max_logit_scale must be above 1, got {max_logit_scale}")
        if not 1.0 / max_logit_scale <= temperature <= 1.0:
            raise ValueError(f"contrastive temperature must be in [1/max_logit_scale, 1] = [{1.0 / max_logit_scale:.4g}, 1], "
                             f"got {temperature}")
        if text is not None and pair != "text":
            raise ValueError(f"contrastive text= configures the text tower of pair=text; this objective has pair={pair}")
        if (other_key is not None or other_tokenizer is not None) != (pair == "modality"):
            raise ValueError("contrastive pair=modality needs other_tokenizer (and optionally other_key); "
                             f"other pairs take neither (pair={pair}, other_key={other_key!r}, "
                             f"other_tokenizer={'set' if other_tokenizer is not None else None})")
        if (other_sensor is not None) != (pair == "sensor"):
            raise ValueError(f"contrastive pair=sensor needs other_sensor, the partner sensor; other pairs take none "
                             f"(pair={pair}, other_sensor={other_sensor!r})")
        if other_sensor is not None and other_sensor == sensor:
            raise ValueError(f"contrastive other_sensor {other_sensor!r} is the stage's own sensor; name another one")
        # the stage's field: a scene sensor's name, else the tokenizer's own field
        self.pair, self.gather, self.input_key = pair, gather, sensor or tokenizer.input_key
        self.sensor, self.other_sensor = sensor, other_sensor
        self.masker = RandomMasker(mask_ratio) if mask_ratio > 0 else None  # RandomMasker checks the ratio
        self.learn_temperature = learn_temperature
        self.max_log_scale = math.log(max_logit_scale)
        log_scale = torch.tensor([math.log(1.0 / temperature)])  # 1-D: FSDP shards no 0-D parameter
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        heads = math.gcd(dim, 4)
        self.sample_pool = AttentivePool(dim, heads) if pool == "attentive" else None
        self.sample_proj = nn.Linear(dim, embed_dim)
        self.text: Optional[TextEncoder] = None
        self.other_tokenizer: Optional[nn.Module] = None
        self.partner_pool: Optional[AttentivePool] = None
        self.partner_proj: Optional[nn.Linear] = None  # None: the partner uses the sample's head (views)
        if pair == "text":
            kwargs = dict(text or {})
            if not isinstance(kwargs.get("tokenizer"), nn.Module):
                raise ValueError("contrastive pair=text needs text.tokenizer, a built text tokenizer (in a config: "
                                 f"`text: {{tokenizer: {{name: byte_text}}}}`, or clip_bpe), got {kwargs.get('tokenizer')!r}")
            check_kwargs(TextEncoder, kwargs, "contrastive text")
            kwargs["tokenizer"] = init_component(kwargs["tokenizer"])
            self.text = TextEncoder(**kwargs)
            self.partner_proj = nn.Linear(self.text.dim, embed_dim)
        elif pair == "sensor":
            self.partner_pool = AttentivePool(dim, heads) if pool == "attentive" else None
            self.partner_proj = nn.Linear(dim, embed_dim)
        elif pair == "modality":
            if not isinstance(other_tokenizer, nn.Module):
                raise ValueError("contrastive pair=modality needs other_tokenizer, a built tokenizer (in a config: "
                                 f"`other_tokenizer: {{name: <registered tokenizer>, ...}}`), got {other_tokenizer!r}")
            built = init_component(other_tokenizer)
            self.other_tokenizer = built
            self.other_key = other_key if other_key is not None else built.input_key
            self.other_posenc = build_posenc(other_posenc, dim, built.pos_axes, getattr(built, "grid_size", None))
            self.partner_pool = AttentivePool(dim, heads) if pool == "attentive" else None
            self.partner_proj = nn.Linear(dim, embed_dim)

    @property
    def partner_key(self) -> str:
        """The batch field holding the partners (captions, second view or second modality)."""
        if self.text is not None:
            return self.text.input_key
        if self.pair == "sensor":
            return self.other_sensor
        return self.input_key + VIEW2_SUFFIX if self.pair == "views" else self.other_key

    def logit_scale(self) -> Tensor:
        """The inverse temperature, within ``[1, max_logit_scale]``."""
        return self.log_scale.clamp(0.0, self.max_log_scale).exp().squeeze(0)

    def _field(self, raw: Mapping[str, Any], key: str) -> Any:
        if key not in raw:
            raise KeyError(f"contrastive pair={self.pair} needs batch field {key!r}; the batch has: {', '.join(sorted(raw))}")
        return raw[key]

    def _embed(self, encoded: Encoded, pool: Optional[AttentivePool], proj: nn.Linear) -> Tensor:
        pooled = encoded.pool("mean") if pool is None else pool(encoded.tokens.x, encoded.tokens.padding)
        return F.normalize(proj(pooled).float(), dim=-1)

    def _partner_tokens(self, raw: Mapping[str, Any], student: Any) -> Tokens:
        partners = self._field(raw, self.partner_key)
        if self.pair == "sensor":
            return student.tokenize(raw, self.other_sensor)
        if self.pair == "views":
            return student.tokenize({self.input_key: partners}, self.sensor)
        return self.other_tokenizer(partners)

    def _partner(self, raw: Mapping[str, Any], student: Any, generator: Optional[torch.Generator]) -> Tensor:
        """The partners' normalized embeddings ``[B, embed_dim]``; masked when a generator is given."""
        if self.text is not None:
            return F.normalize(self.partner_proj(self.text(self._field(raw, self.partner_key))).float(), dim=-1)
        tokens = self._partner_tokens(raw, student)
        index = self.masker(tokens, generator).visible if self.masker is not None and generator is not None else None
        proj = self.sample_proj if self.partner_proj is None else self.partner_proj
        pool = self.sample_pool if self.pair == "views" else self.partner_pool
        posenc = self.other_posenc if self.pair == "modality" else None
        return self._embed(student.encode(tokens, index, posenc=posenc), pool, proj)

    def embed_sample(self, raw: Mapping[str, Any], student: Any) -> Tensor:
        """Samples' normalized embeddings ``[B, embed_dim]`` from all their tokens (retrieval evaluation).

        The caller chooses eval mode and ``torch.no_grad``.
        """
        return self._embed(student.encode(student.tokenize(raw, self.sensor)), self.sample_pool, self.sample_proj)

    def embed_partner(self, raw: Mapping[str, Any], student: Any) -> Tensor:
        """Partners' normalized embeddings ``[B, embed_dim]`` (caption, second view or second
        modality), unmasked (retrieval evaluation)."""
        return self._partner(raw, student, None)

    def forward(self, batch: Batch, student: Any, teacher: Any = None) -> ObjectiveOutput:
        if self.learn_temperature:
            with torch.no_grad():
                self.log_scale.clamp_(0.0, self.max_log_scale)
        if batch.mask is not None:
            index = batch.mask.visible
        else:
            index = self.masker(batch.tokens, batch.generator).visible if self.masker is not None else None
        a = self._embed(student.encode(batch.tokens, index), self.sample_pool, self.sample_proj)
        b = self._partner(batch.raw, student, batch.generator)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"contrastive pair={self.pair}: {a.shape[0]} samples but {b.shape[0]} partners in the batch")
        scale = self.logit_scale()
        if self.gather:
            a_all, b_all, offset = all_gather_with_grad(a), all_gather_with_grad(b), rank() * a.shape[0]
        else:
            a_all, b_all, offset = a, b, 0
        loss = info_nce(a, b, scale, a_all, b_all, offset)
        with torch.no_grad():
            labels = torch.arange(a.shape[0], device=a.device) + offset
            acc = ((a @ b_all.T).argmax(1) == labels).float().mean()
        # detached 0-d tensors: the trainer reads every metric of a step in its one host sync
        return ObjectiveOutput(loss, {"infonce": loss.detach(), "temperature": 1.0 / scale.detach(), "acc": acc})
