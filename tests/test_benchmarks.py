"""The performance suite runs end to end on CPU and writes the fields its table is made of."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
from step_profile import CATEGORIES, category, format_profile, profile_step  # noqa: E402


def assert_well_formed(name, profile):
    """Every category and the gap present, nothing negative, shares adding up to 100%, the report
    naming each. Which share is largest is a measurement (the benchmark report's), not asserted:
    under load the optimizer's share has outgrown the matmuls' on this CPU."""
    entries = {**profile["categories"], profile["gap"]["label"]: profile["gap"]}
    assert list(profile["categories"]) == [label for label, _ in CATEGORIES] + ["other"]
    assert profile["step_ms"] > 0 and profile["timed_step_ms"] > 0
    assert all(e["ms"] >= 0 and e["share"] >= 0 for e in entries.values()), entries
    assert sum(e["share"] for e in entries.values()) == pytest.approx(1.0, abs=0.01), entries
    report = format_profile(name, profile)
    assert report.startswith(f"where the time of '{name}' goes")
    assert all(f"  {label} " in report for label in entries), report


def test_suite_measures_anymodal_and_the_timm_peer(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--only", "dense-B anymodal", "--only", "mae-B timm",
                           "--only", "video-B mask 0.75", "--only", "audio mae step + loader", "--steps", "2", "--warmup", "1", "--json", str(out),
                           "--profile", "dense-B anymodal"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["mae-B timm", "video-B mask 0.75", "audio mae step + loader", "dense-B anymodal"]
    for r in rows:
        assert "skipped" not in r, r
        assert r["step_ms"] > 0 and r["throughput"] > 0 and r["tflop_per_step"] > 0 and r["peak_mem_gib"] >= 0
    assert "| mae-B timm (tiny) | 32 |" in proc.stdout
    # a modality's own config and data: its MAE step, and its loader alone next to it
    audio = rows[2]
    assert audio["batch"] == 128 and audio["loader_throughput"] > 0 and audio["unit"] == "samples/s"
    assert "samples/s (2 workers) |" in proc.stdout
    # the profiled row: where its time goes, printed under the table
    assert [r["name"] for r in rows if "profile" in r] == ["dense-B anymodal"]
    assert_well_formed("dense-B anymodal", rows[3]["profile"])
    assert format_profile("dense-B anymodal", rows[3]["profile"]) in proc.stdout


def test_profile_of_a_real_step_is_well_formed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(32, 16, 64)

    def step():
        q = model(x).unflatten(-1, (4, 16)).transpose(1, 2)
        loss = torch.nn.functional.scaled_dot_product_attention(q, q, q).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    profile = profile_step(step, gpu=False, step_s=0.01, flops={"matmul": 10**9}, steps=3)
    assert_well_formed("tiny step", profile)
    assert profile["gap"]["label"] == "no operator" and profile["timed_step_ms"] == 10.0
    assert "tflops" in profile["categories"]["matmul"] and profile["top"]


@pytest.mark.parametrize("kernel, expected", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("triton_per_fused_native_layer_norm_0", "other"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
])
def test_profile_groups_gpu_kernels_by_what_they_compute(kernel, expected):
    assert category(kernel) == expected


def test_scene_geometry_benchmark_reports_every_op(tmp_path):
    out = tmp_path / "geometry.md"
    proc = subprocess.run([sys.executable, str(BENCH / "scene_geometry.py"), "--points", "3000", "--size", "64",
                           "128", "--repeats", "2", "--dim", "16", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for op in ("check_calibration", "project_points", "points_to_patches", "link_tokens_to_patches", "pool_patch_features"):
        assert f"| {op}" in table, table
