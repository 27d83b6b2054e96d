"""The performance suite runs end to end on CPU and writes the fields its table is made of."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_suite_measures_anymodal_and_the_timm_peer(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--only", "dense-B anymodal", "--only", "mae-B timm",
                           "--only", "video-B mask 0.75", "--only", "audio mae step + loader", "--steps", "2", "--warmup", "1", "--json", str(out)],
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
