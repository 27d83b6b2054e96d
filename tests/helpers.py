"""Shared helpers for tests that run the real command line in subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path


def anymodal(*args, env_extra=None, check=True, **kwargs):
    """Run ``python -m anymodal ARGS`` and return the CompletedProcess."""
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "anymodal", *map(str, args)], capture_output=True, text=True, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"anymodal {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def spawn(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "anymodal", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def losses(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]
