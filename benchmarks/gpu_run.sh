#!/bin/bash
# Everything this project checks and times on a lent GPU, in one call of the device tool:
#   bash benchmarks/gpu_wheels.sh   (here, once: the wheels that machine lacks, into .whl)
#   run: command="bash benchmarks/gpu_run.sh", carry=[".whl"]
# Results land in $OUT: nvidia-smi.txt, gpu_checks.txt, lidar_ops.txt, train.txt, suite.json, suite.txt (with the ViT-L profiles).
set -u
OUT=${OUT:-/tmp/anymodal-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  for w in .whl/*.whl; do  # one at a time: a wheel that does not fit that Python skips only its rows
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$w" || echo "could not install $w"
  done
fi
mkdir -p /tmp/pp && ln -sfn "$PWD" /tmp/pp/anymodal  # the repository root is the package
# the built-in plugins are entry points: a dist-info beside the link registers them as an install would
python3 - <<'PY'
import pathlib, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path("/tmp/pp/anymodal-%s.dist-info" % project["version"])
info.mkdir(exist_ok=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: anymodal\nVersion: %s\n" % project["version"])
(info / "entry_points.txt").write_text("".join(
    "[%s]\n%s\n" % (group, "".join("%s = %s\n" % kv for kv in points.items()))
    for group, points in project["entry-points"].items()))
PY
export PYTHONPATH=/tmp/pp:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/nvidia-smi.txt"
python3 benchmarks/gpu_checks.py 2>&1 | tee "$OUT/gpu_checks.txt"
timeout 120 python3 benchmarks/lidar_ops.py --gpu 2>&1 | tee "$OUT/lidar_ops.txt"
timeout 150 python3 -m anymodal train tiny-test --run-dir /tmp/gpu-train run.device=cuda run.progress=false \
  recipe.stages.pretrain.steps=60 2>&1 | tail -4 | tee "$OUT/train.txt"
tail -2 /tmp/gpu-train/metrics.jsonl | tee -a "$OUT/train.txt"
# the ViT-L rows (the MFU floor) are profiled too: where their step time goes, kernel by kernel
python3 benchmarks/suite.py --gpu --budget "${BUDGET:-380}" --json "$OUT/suite.json" --profile "dense-L anymodal" --profile "dense-L anymodal compile full" --profile "2x batch" 2>&1 | tee "$OUT/suite.txt"
