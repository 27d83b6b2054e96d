"""Outside plugin packages, as a newcomer meets them: ``examples/anymodal-radar`` installed by pip
trains through the two-stage recipe and is evaluated with no change to this repository, and the
skeleton ``anymodal plugin new`` writes passes its own test once installed.

pip installs into temporary target folders put on PYTHONPATH of subprocesses, so the shared
environment is never modified; the entry points are found through the installed dist-info.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_plugins import _anymodal, _env, _pip_install

RADAR = Path(__file__).resolve().parent.parent / "examples" / "anymodal-radar"
NEWCOMER_LINES = 60  # the promise: a sensor plugin in under this many lines of the newcomer's code


def code_lines(path: Path) -> int:
    """Lines that are neither blank nor comments (docstrings count)."""
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#"))


@pytest.fixture(scope="module")
def radar_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example copied out of the checkout, so building it leaves no build/ or egg-info behind."""
    return Path(shutil.copytree(RADAR, tmp_path_factory.mktemp("radar") / "anymodal-radar",
                                ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")))


@pytest.fixture(scope="module")
def radar_site(radar_copy: Path) -> Path:
    site = _pip_install(radar_copy, radar_copy.parent / "site")
    assert (site / "anymodal_radar" / "configs" / "modality" / "radar.yaml").is_file()  # package data shipped
    return site


def test_newcomer_code_is_short() -> None:
    python = sorted((RADAR / "anymodal_radar").glob("*.py"))
    assert [p.name for p in python] == ["__init__.py"]
    assert code_lines(python[0]) < NEWCOMER_LINES


def test_radar_components_listed_with_version(radar_site: Path, tmp_path: Path) -> None:
    proc = _anymodal("plugins", env=_env(radar_site), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert ["radar_bev", "from", "radar", "(anymodal-radar", "0.1.0)"] in lines, proc.stdout
    assert ["radar_objects", "from", "radar", "(anymodal-radar", "0.1.0)"] in lines, proc.stdout


def test_radar_two_stage_then_eval(radar_site: Path, tmp_path: Path) -> None:
    # this repository's own tiny two-stage config with the modality file the installed plugin
    # ships, chosen by name: one key changes the sensor
    run = tmp_path / "run"
    proc = _anymodal("train", "tiny-two-stage", "modality=radar", "recipe=videoprism", "recipe.stages.*.steps=4",
                     "--run-dir", str(run), env=_env(radar_site), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["contrastive"] * 4 + ["distill"] * 4
    proc = _anymodal("eval", str(run), "--no-pictures", env=_env(radar_site), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pre-trained (videoprism)" in proc.stdout and "contrastive/contrastive" in proc.stdout, proc.stdout


def test_radar_is_a_sensor_of_a_street_scene(radar_site: Path, tmp_path: Path) -> None:
    # the scenes' own front radar, tokenized by the installed plugin's radar_bev, trains beside the
    # lidar (lidar-radar contrastive) through the shared encoder; nothing in anymodal names radar
    config = RADAR / "anymodal_radar" / "configs" / "street_radar.yaml"
    run = tmp_path / "run"
    proc = _anymodal("train", str(config), "recipe.stages.contrastive.steps=4", "--run-dir", str(run),
                     env=_env(radar_site), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0 <= r["contrastive/acc"] <= 1 for r in rows)
    proc = _anymodal("eval", str(run), "--no-pictures", env=_env(radar_site), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "eval" / "results.json").read_text())
    assert set(summary["retrieval"]["contrastive/contrastive"]) >= {"sample_to_partner_r1", "partner_to_sample_r1"}
    assert "| encoder | mIoU | road |" in proc.stdout and "contrastive/contrastive" in proc.stdout
    # a typo in the partner sensor is named with the sensors the scene has, radar among them
    bad = _anymodal("train", str(config), "recipe.stages.contrastive.objectives.contrastive.other_sensor=radar_frnt",
                    "--run-dir", str(tmp_path / "bad"), env=_env(radar_site), cwd=tmp_path)
    assert bad.returncode == 2 and "radar_frnt" in bad.stderr and "radar_front" in bad.stderr, bad.stderr


def test_radar_own_tests_pass(radar_copy: Path, radar_site: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          capture_output=True, text=True, env=_env(radar_site), cwd=radar_copy, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_plugin_new_skeleton_passes_its_test(tmp_path: Path) -> None:
    proc = _anymodal("plugin", "new", "sonar", "--dir", "src", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "src" / "anymodal-sonar"
    site = _pip_install(root, tmp_path / "site")  # what the printed `pip install -e` does, kept out of this env
    # every printed `anymodal` step runs as printed, from the folder `plugin new` ran in; none needs pytest
    steps = [shlex.split(line.split("#")[0]) for line in proc.stdout.splitlines() if line.startswith("  anymodal ")]
    assert [s[1] for s in steps] == ["plugins", "train", "eval"], proc.stdout
    assert "pytest" not in "\n".join(line for line in proc.stdout.splitlines() if line.startswith("  ")), proc.stdout
    for step in steps:
        done = _anymodal(*step[1:], env=_env(site), cwd=tmp_path)
        assert done.returncode == 0, f"{' '.join(step)}: {done.stderr[-3000:]}"
        if step[1] == "plugins":
            assert any(line.split()[:3] == ["sonar_chunks", "from", "sonar"] for line in done.stdout.splitlines()), done.stdout
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          capture_output=True, text=True, env=_env(site), cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "3 passed" in proc.stdout


def test_plugin_new_refuses_to_overwrite_and_bad_names(tmp_path: Path) -> None:
    assert _anymodal("plugin", "new", "sonar", "--dir", str(tmp_path), cwd=tmp_path).returncode == 0
    again = _anymodal("plugin", "new", "sonar", "--dir", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 2 and "anymodal-sonar already exists" in again.stderr
    bad = _anymodal("plugin", "new", "Sonar-2", "--dir", str(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "'Sonar-2' must be a lower-case identifier" in bad.stderr
