"""Correctness on a CUDA device, before timing anything there: the fused attention paths against
the explicit one, ragged (padded and packed) batches, activation checkpointing, every speed switch
at once against the eager fp32 path, and masking with a CUDA generator. Prints one line per check; exits non-zero when one fails.

    python benchmarks/gpu_checks.py
"""

from __future__ import annotations

import sys

import torch

from anymodal.core.device import compile_blocks, sdpa_kernels
from anymodal.core.encoder import Encoder
from anymodal.core.masking import RandomMasker
from anymodal.core.posenc import build_posenc
from anymodal.core.tokens import Tokens

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tokens(b: int, n_side: int, dim: int, padded: bool, counts: tuple[int, ...] = ()) -> Tokens:
    """``b`` samples on an ``n_side`` grid; padded: sample i keeps its first ``counts[i]`` tokens
    (default: n - 7*i)."""
    pos = torch.stack(torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij"), -1).reshape(1, -1, 2)
    x = torch.randn(b, n_side * n_side, dim, device="cuda")
    padding = None
    if padded:
        kept = torch.tensor(counts or [n_side * n_side - 7 * i for i in range(b)], device="cuda")
        padding = torch.arange(n_side * n_side, device="cuda")[None] >= kept[:, None]
    return Tokens(x=x, pos=pos.expand(b, -1, -1).cuda(), padding=padding)


def features_and_grads(model: Encoder, t: Tokens, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-token features and the parameter gradients of a loss over them."""
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = model(t).tokens.x.float() * t.valid().unsqueeze(-1)
    out.pow(2).mean().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def check_xformers(math_encoder: Encoder, dim: int) -> None:
    """xformers on a lidar-like ragged batch (1,600 down to 37 real tokens): packed through its
    block-diagonal kernel and padded through a materialized bias, each against the padded fp32
    math path, features and gradients."""
    try:
        xformers_encoder = Encoder(dim, 4, 6, build_posenc("sincos", dim, 2), attn_backend="xformers").cuda()
    except ImportError as err:
        print(f"skip xformers: {err}")
        return
    import xformers
    from xformers.ops import fmha

    xformers_encoder.load_state_dict(math_encoder.state_dict())
    math_encoder.train()
    t = tokens(4, 40, dim, True, counts=(1600, 900, 250, 37))
    ref, ref_grads = features_and_grads(math_encoder, t, amp=False)
    for packed in (True, False):
        xformers_encoder.pack_ragged = packed
        name = f"xformers {xformers.__version__} {'packed (block-diagonal)' if packed else 'padded (tensor bias)'} bf16"
        try:
            out, grads = features_and_grads(xformers_encoder, t, amp=True)
        except Exception as err:  # noqa: BLE001 - no kernel for these inputs: a failed check, and the rest still run
            check(name, False, str(err).splitlines()[0][:200])
            continue
        check(name, rel_err(out, ref) < 2e-2 and rel_err(grads, ref_grads) < 5e-2,
              f"features rel err vs padded fp32 math {rel_err(out, ref):.2e} (bound 2e-2), grads {rel_err(grads, ref_grads):.2e} (5e-2)")
    try:  # which kernel xformers picked for the packed layout (a private helper: report, never fail)
        q = torch.zeros(1, 2787, 6, dim // 6, device="cuda", dtype=torch.bfloat16)
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens([1600, 900, 250, 37], device=q.device)
        print(f"xformers dispatches packed bf16 to {fmha.dispatch._dispatch_fw(fmha.Inputs(q, q, q, bias), True).NAME}")
    except Exception as err:  # noqa: BLE001
        print(f"xformers dispatch not reported: {str(err).splitlines()[0]}")


def main() -> None:
    torch.manual_seed(0)
    dim = 384
    encoder = Encoder(dim, 4, 6, build_posenc("sincos", dim, 2)).cuda().eval()
    math_encoder = Encoder(dim, 4, 6, build_posenc("sincos", dim, 2), attn_backend="math").cuda().eval()
    math_encoder.load_state_dict(encoder.state_dict())
    for padded in (False, True):
        t = tokens(4, 14, dim, padded)
        keep = t.valid().unsqueeze(-1)
        with torch.no_grad():
            ref = (math_encoder(t).tokens.x * keep).double()
            for kernel in ("auto", "flash", "cudnn", "efficient"):
                if padded and kernel == "flash":
                    continue  # FlashAttention takes no mask; sdpa refuses rather than ignore it
                for dtype in (torch.float32, torch.bfloat16):
                    try:
                        with sdpa_kernels(kernel), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                            out = encoder(t).tokens.x.float() * keep
                    except RuntimeError as err:  # a kernel that does not take these inputs
                        print(f"skip sdpa={kernel} {dtype} padded={padded}: {str(err).splitlines()[0][:120]}")
                        continue
                    err = rel_err(out, ref)
                    bound = 2e-2 if dtype == torch.bfloat16 else 1e-3
                    check(f"sdpa={kernel} {str(dtype)[6:]} padded={padded}", err < bound and out.isfinite().all().item(),
                          f"rel err vs math {err:.2e} (bound {bound:.0e})")
    check_xformers(math_encoder, dim)

    encoder.train()
    t = tokens(4, 14, dim, True)
    grads = []
    for ckpt in (False, True):
        encoder.grad_checkpointing = ckpt
        encoder.zero_grad()
        encoder(t).tokens.x.float().pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    check("activation checkpointing grads", rel_err(grads[1], grads[0]) < 1e-5, f"rel err {rel_err(grads[1], grads[0]):.2e}")

    # every speed switch at once (bf16 autocast, compiled blocks, activation checkpointing, the auto
    # SDPA kernel) against the eager fp32 math path: features and gradients
    fast = Encoder(dim, 4, 6, build_posenc("sincos", dim, 2), grad_checkpointing=True).cuda().train()
    fast.load_state_dict(math_encoder.state_dict())
    compile_blocks(fast)
    math_encoder.train()
    for padded in (False, True):
        t = tokens(4, 14, dim, padded)
        keep = t.valid().unsqueeze(-1)
        outs, grads = [], []
        for model, amp in ((math_encoder, False), (fast, True)):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model(t).tokens.x.float() * keep
            out.pow(2).mean().backward()
            outs.append(out.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        check(f"all speed switches on, padded={padded}", rel_err(outs[1], outs[0]) < 1e-2 and rel_err(grads[1], grads[0]) < 5e-2,
              f"features rel err {rel_err(outs[1], outs[0]):.2e} (bound 1e-2), grads {rel_err(grads[1], grads[0]):.2e} (5e-2)")

    g = torch.Generator(device="cuda").manual_seed(0)
    t = tokens(8, 14, dim, False)
    mask = RandomMasker(0.75)(t, g)
    union = torch.cat([mask.visible, mask.target], 1).sort(1).values
    check("RandomMasker with a CUDA generator", mask.visible.is_cuda and mask.visible.shape[1] == 49
          and bool((union == torch.arange(196, device="cuda")).all()), "49 visible + 147 targets partition 196 tokens")
    if FAILED:
        sys.exit(f"{len(FAILED)} check(s) failed: {', '.join(FAILED)}")
    print("all GPU checks passed")


if __name__ == "__main__":
    main()
