"""The learning claim, measured: MAE pre-training on the bundled MNIST beats a random-init encoder
on a held-out split (short schedule; the README's demo table is the long one)."""

import json

from helpers import anymodal

SHORT = ["model.dim=96", "model.num_heads=3", "model.depth=2", "recipe.stages.pretrain.steps=400",
         "recipe.stages.pretrain.optim.warmup_steps=50", "eval.max_train=2000", "eval.max_test=1000",
         "run.progress=false", "run.log_every=50"]


def test_mae_beats_random_init(tmp_path):
    run = tmp_path / "run"
    anymodal("train", "default", "--run-dir", run, *SHORT)
    anymodal("eval", run, "--no-pictures")
    results = json.loads((run / "eval" / "results.json").read_text())["results"]
    trained, random = results["pre-trained (mae)"], results["random init"]
    # on a 400-step schedule the gap shows in k-NN first (measured: 51.7% vs 38.3%; 55.7% after
    # 600 steps); the linear probe catches up with longer schedules (README: 94.8% vs 82.4% after 1,500)
    assert trained["knn"] > random["knn"] + 0.08, results
    assert trained["linear_probe"] > 0.6, results
