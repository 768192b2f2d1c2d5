"""The benchmark scripts run, on the CPU and tiny generated data: the throughput suite of
benchmarks/benchmark_training.py (its measurements, its JSON and Markdown; the suites live in speed.py and
throughput.py, shared helpers in common.py), cpu_step_factors.py, timm_comparison.py (issue 16's CPU comparison),
supply.py and omp_wait_policy.py (issue 22). Nothing here asserts a speed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes, servers or long runs: in `make test`, not in `make test-fast`

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "benchmark_training.py"


@pytest.fixture(scope="module")
def bench():
    # Imported by name, so the generator's process pool can pickle its worker function.
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module("benchmark_training")
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.fixture
def photos(bench, tmp_path):
    train = bench.write_photos(tmp_path / "train", 20, 1, 0.002, 0.004)
    bench.write_photos(tmp_path / "valid", 10, 2, 0.002, 0.004)
    return tmp_path, train


def test_generated_photos_have_the_recipe(bench, tmp_path):
    info = bench.write_photos(tmp_path / "p", 12, 5, 0.01, 0.02)
    from PIL import Image

    sizes = [Image.open(tmp_path / "p" / name).size for name in info["files"]]
    assert len(sizes) == 12 and all(10_000 * 0.9 <= w * h <= 20_000 * 1.01 for w, h in sizes)
    assert bench.write_photos(tmp_path / "p", 12, 5, 0.01, 0.02)["files"] == info["files"]  # reused


def test_ceiling_and_supply_measure_both_decode_paths(bench, photos):
    root, _ = photos
    common = {"image_size": 32, "device": "cpu", "batch_size": 4, "warmup_steps": 1, "steps": 2, "max_seconds": 5}
    ceiling = bench.measure_ceiling({**common, "model": "resnet18", "timed_epochs": 1, "steps_per_epoch": 2})
    assert ceiling["images_per_second"] > 0 and ceiling["timed_steps"] >= 1
    for decode in ("cpu", "gpu"):
        supply = bench.measure_supply({**common, "train_dir": str(root / "train"), "decode": decode, "workers": "0"})
        assert supply["decode"] == decode and supply["images"] >= 8 and supply["images_per_second"] > 0


def test_end_to_end_runs_train_and_counts_host_syncs(bench, photos, monkeypatch):
    root, train = photos
    import torch

    item = torch.Tensor.item
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])  # the measurement sets its own
    rows = bench.write_image_list(root / "lst", 6 * 4, train["files"], root / "train")
    untrained = root / "untrained"
    from train_pytorch_model.model_directory import (
        ModelSpec,
        write_untrained_model_directory,
    )

    write_untrained_model_directory(untrained, ModelSpec("resnet18"), None)
    result = bench.measure_end_to_end({
        "model": "resnet18", "image_size": 32, "device": "cpu", "batch_size": 4, "workers": "1",
        "warmup_steps": 2, "steps": 4, "print_freq": 2, "max_seconds": 60, "decode": "cpu", "patience": 0,
        "train_dir": str(rows), "valid_dir": str(root / "valid"), "untrained_model": str(untrained)})
    assert result["timed_steps"] == 4 and not result["stopped_by_time"]
    # The loop's syncs happen at print steps only (2 in the window): a per-step sync would give >= 4.
    assert 0 < result["host_syncs"] <= 3 * 2, result
    assert result["images_per_second"] > 0 and result["num_workers"] == 1
    assert torch.Tensor.item is item  # the counting patch is undone


def test_script_writes_json_and_markdown_and_lists_what_it_skipped(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--suite", "throughput", "--device", "cpu", "--quick",
                           "--budget-seconds", "0", "--out", str(out)], check=False, capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "throughput.json").read_text())
    assert report["failed"] == [] and report["results"] == []
    assert any(name.startswith("train resnet18 b4 imagenet") for name, _ in report["skipped"])
    assert set(report["datasets"]) == {"imagenet", "photos"}
    assert "| ceiling resnet18 b4 | skipped: budget" in (out / "throughput.md").read_text()


def test_gpu_check_finds_the_python_and_refuses_without_a_gpu(tmp_path):
    """On this CPU-only machine the script gets as far as looking for the GPU, then exits 2 saying why (the smoke
    run, GPU_CHECK_SMOKE=1, is tests/test_gpu_check.py's)."""
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "results"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], check=False, capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "torch 2." in done.stdout and "torch sees no CUDA device" in done.stdout
    assert "torch sees no CUDA device" in (tmp_path / "results" / "gpu_check.log").read_text()


def test_cpu_step_factors_times_each_setting_of_train(tmp_path):
    out = tmp_path / "factors.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_step_factors.py"), "--size", "32",
                           "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "2", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    times = json.loads(out.read_text())["times_ms"]
    assert {"eager SGD (timm-like)", "+ fused optimizer", "train --optimizer sgd (fused, deterministic)",
            "train (AdamW fused, deterministic)", "threads 1", "channels_last"} <= set(times)
    assert all(len(values) == 2 and min(values) > 0 for values in times.values())
    assert "| threads 1 |" in done.stdout
    optimizer = json.loads(out.read_text())["optimizer_step_ms"]
    assert set(optimizer) == {"sgd foreach", "sgd fused", "adamw foreach", "adamw fused"}


def test_timm_comparison_times_train_epochs_on_the_shared_dataset(tmp_path):
    """The `train` side of the timm comparison (timm is not a dependency: without it its contestants are named as
    not run). The generated folders are the layout both read: <split>/<class>/*.jpg."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "timm_comparison.py"), "--quick",
                           "--contestants", "train", "timm train.py", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((out / "data" / "train").glob("class*/*.jpg"))) == 64
    assert len(list((out / "data" / "validation").glob("class*/*.jpg"))) == 20
    report = json.loads((out / "timm_comparison.json").read_text())
    run = report["results"]["train"]["runs"][0]
    assert len(run["train_seconds"]) == 2 and 0 < run["train_seconds"][1] <= run["epoch_seconds"][1]
    assert len(run["cycle_seconds"]) == 2 and run["cycle_seconds"][1] >= run["epoch_seconds"][1]  # + logging
    assert run["settings"]["optimizer"] == "adamw"
    timm_installed = importlib.util.find_spec("timm") is not None
    assert ("timm train.py" in report["results"]) == timm_installed
    assert ("timm is not installed" in done.stderr) != timm_installed
    assert "| train | " in (out / "timm_comparison.md").read_text()


def test_supply_times_our_pipeline_and_the_torchvision_reference_per_image(tmp_path):
    """benchmarks/supply.py at toy size, in this process: both pipelines timed on every kind of image."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        supply = importlib.import_module("supply")
    finally:
        sys.path.remove(str(SCRIPT.parent))
    import torch

    threads = torch.get_num_threads()
    assert supply.main(["--quick", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # given back
    report = json.loads((tmp_path / "supply.json").read_text())
    assert set(report["kinds"]) == {"imagenet", "photo", "photo-shards"}
    shards = report["kinds"].pop("photo-shards")
    for row in report["kinds"].values():
        assert row["ours"]["core_ms"] > 0 and row["reference"]["core_ms"] > 0 and row["data"]["mean_kb"] > 0
        assert 0 < row["decode_alone"]["core_ms"] < row["ours"]["core_ms"]
    # the shrunk shards hold smaller files than the photos they came from, and the loader read them
    assert 0 < shards["data"]["shard_kb"] < shards["data"]["mean_kb"]
    assert shards["ours"]["core_ms"] > 0 and shards["convert_once"]["core_ms"] > 0
    assert shards["convert_once"]["max_side"] == 128
    text = (tmp_path / "supply.md").read_text()
    assert "| imagenet (6 JPEGs ~100x75) |" in text and "--max-side 128` (once:" in text


@pytest.mark.slow
def test_omp_wait_policy_compares_the_policies_as_the_machine_is_and_busy(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "omp_wait_policy.py"), "--quick",
                           "--out", str(tmp_path)], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "omp_wait_policy.json").read_text())
    assert list(report["conditions"]) == ["as the machine is", "+ 1 busy processes"]
    for results in report["conditions"].values():
        assert set(results) == {"default (unset)", "PASSIVE", "GOMP_SPINCOUNT=1000", "GOMP_SPINCOUNT=10000", "ACTIVE"}
        assert all(row["median"] > 0 for row in results.values())


def test_omp_wait_policy_measures_any_spin_count_and_refuses_other_names():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        omp = importlib.import_module("omp_wait_policy")
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert omp.policy_env("GOMP_SPINCOUNT=2500") == {"GOMP_SPINCOUNT": "2500"}
    assert omp.policy_env("PASSIVE") == {"OMP_WAIT_POLICY": "PASSIVE"}
    for wrong in ("GOMP_SPINCOUNT=lots", "OMP_NUM_THREADS=1", "passive"):
        with pytest.raises(SystemExit, match="unknown policy"):
            omp.policy_env(wrong)
