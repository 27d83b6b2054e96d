"""`anymodal demo --experiment two-stage` end to end on a tiny budget: four runs, one table."""

import json

from helpers import anymodal


def test_two_stage_experiment_table(tmp_path):
    out = tmp_path / "exp"
    proc = anymodal("demo", "--experiment", "two-stage", "--run-dir", out, "recipe.stages.*.steps=1",
                    "data.train.size=160", "data.test.size=80", "eval.max_train=100", "eval.max_test=60",
                    "data.batch_size=16", "eval.probe_iters=10", "eval.retrieval_samples=40",
                    env_extra={"ANYMODAL_CACHE": str(tmp_path / "cache")})
    rows = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["contrastive only (stage 1)", "masked modeling only (MAE)",
                                            "two-stage (VideoPrism)", "two-stage, no token shuffle"]
    for r in rows:
        trained = next(v for k, v in r["results"].items() if k != "random init")
        assert {"linear_probe", "knn", "motion/linear_probe", "motion/knn"} <= set(trained)
    assert rows[0]["retrieval"] and not rows[1]["retrieval"]
    assert "linear probe (motion)" in proc.stdout and "| random init |" in proc.stdout


def test_every_experiment_variant_is_a_valid_config():
    from anymodal.core.config import compose, validate
    from anymodal.app.experiment import experiment_names, load_experiment
    from anymodal.plugins import load_components

    components = load_components()
    assert experiment_names() == ["two-stage", "two-stage-study"]
    for name in experiment_names():
        spec = load_experiment(name)
        for variant, overrides in spec["variants"].items():
            composed = compose(spec["config"], [*spec["common"], *overrides])
            validate(composed, components)  # raises ConfigError listing what is wrong
    assert len(load_experiment("two-stage-study")["variants"]) == 5
