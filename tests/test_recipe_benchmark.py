"""benchmarks/recipe.py on a tiny case, so the script cannot rot: real data, real CLI runs, real results files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # processes, servers or long runs: in `make test`, not in `make test-fast`

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe.py"


def test_recipe_benchmark_runs_a_tiny_case(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path), "--cases", "colour-lr0.001",
         "--recipes", "sgd", "--seeds", "3", "--max-epochs", "1", "--image-size", "32", "--threads", "1"],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json.loads((tmp_path / "recipe_results.json").read_text())
    assert [(r["case"], r["recipe"], r["seed"]) for r in results["rows"]] == [("colour-lr0.001", "sgd", 3)]
    for row in results["rows"]:
        assert row["error"] is None and row["epochs_run"] == row["best_epoch"] == 1 and row["threads"] == 1, row
        assert 0.0 <= row["accuracy"] <= 1.0 and abs(12 * row["accuracy"] - round(12 * row["accuracy"])) < 1e-6
        # The run trained what the case says: 3 colour classes, the case's batch and learning rate.
        info = json.loads((tmp_path / "runs" / f"colour-lr0.001-{row['recipe']}-3" / "trained_model" /
                           "training_info.json").read_text())
        assert info["classes"] == ["blue", "green", "red"]
        assert (info["training"]["batch_size"], info["training"]["learning_rate"]) == (8, 0.001)
        assert info["training"]["random_seed"] == 3
    sgd_info = json.loads((tmp_path / "runs" / "colour-lr0.001-sgd-3" / "trained_model" /
                           "training_info.json").read_text())
    assert sgd_info["training"]["optimizer"] == "sgd"
    table = (tmp_path / "recipe_results.md").read_text()
    assert "| colour-lr0.001 | sgd | 3 |" in table and "quick check" in table
    assert "| colour-lr0.001 | sgd | 3 |" in completed.stdout
    # The generated data is what the case promises: 36 + 12 images, mixed formats, sizes and modes.
    train = sorted((tmp_path / "data" / "digitsall" / "colour" / "train").rglob("*.*"))
    assert len(train) == 36 and len(list((tmp_path / "data" / "digitsall" / "colour" / "valid").rglob("*.*"))) == 12
    assert {p.suffix for p in train} == {".png", ".bmp"}
    modes, sizes = set(), set()
    for path in train:
        with Image.open(path) as image:
            modes.add(image.mode)
            sizes.add(image.size)
    assert {"L", "RGBA", "RGB", "P"} <= modes and len(sizes) > 1


def test_recipe_benchmark_rejects_unknown_names(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path), "--recipes", "magic"],
                               capture_output=True, text=True)
    assert completed.returncode == 2 and "unknown recipe 'magic'" in completed.stderr
