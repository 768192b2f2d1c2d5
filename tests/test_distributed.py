"""DDP (issue 6): `torchrun --nproc_per_node=2` on CPU (gloo) trains like one process; a failing rank stops all."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, free_port
from train_pytorch_model.data import ShardSampler, build_dataset, collate, training_loader
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.model_directory import read_trained_model_directory
from train_pytorch_model.preprocessing import Preprocessing

pytestmark = pytest.mark.slow  # processes, servers or long runs: in `make test`, not in `make test-fast`

TRAIN = {"a": 10, "b": 10, "c": 9}
VALID = {"a": 5, "b": 4, "c": 4}  # 13 rows: rank 0 holds 7, rank 1 holds 6 -> 2 and 1 validation batches of 6
OUTPUT_FILES = ("model", "index_to_label.csv", "model_spec.yaml", "_schema.json", "_samples.json", "_meta.yaml",
                "MLmodel", "metrics.csv", "training_curves.png", "training_info.json")


def train_args(untrained, train_dir, valid_dir, out, *extra) -> list[str]:
    return ["train", "--untrained-model", str(untrained), "--training-data", str(train_dir),
            "--validation-data", str(valid_dir), "--trained-model", str(out), "--image-size", "32",
            "--num-workers", "0", "--batch-size", "3", *extra]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def evaluate_saved(out, valid_dir) -> tuple[float, float]:
    """Validation loss and top-1 of the saved weights, in this one process, the whole set in one batch."""
    trained = read_trained_model_directory(out)
    directory = load_image_directory(valid_dir)
    dataset = build_dataset(directory, {c: i for i, c in enumerate(trained.classes)}, trained.preprocessing,
                            train=False, seed=1)
    batch = collate([dataset[i] for i in range(len(dataset))])
    with torch.inference_mode():
        logits = trained.model(trained.preprocessing.normalize(batch.images)).float()
    return F.cross_entropy(logits, batch.targets).item(), (logits.argmax(1) == batch.targets).sum().item() / len(batch)


def test_torchrun_two_processes_on_cpu(tmp_path, make_image_folder, resnet18_dir):
    train_dir = make_image_folder("train", TRAIN)
    valid_dir = make_image_folder("valid", VALID, seed=1)
    out = tmp_path / "trained"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "train_pytorch_model", *train_args(resnet18_dir, train_dir, valid_dir, out, "--epochs", "2")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]  # torchrun exits 0 only when every rank did
    # One voice: progress and the MLflow run come from rank 0 alone.
    assert result.stderr.count("Epoch 1/2 ") == 1 and result.stderr.count("Epoch 2/2 ") == 1
    assert "Training on cpu (2 process(es))" in result.stderr
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs["params.world_size"][0] == "2"

    # The same output contract as one process.
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    trained = read_trained_model_directory(out)
    assert trained.classes == ["a", "b", "c"]
    info = json.loads((out / "training_info.json").read_text())["training"]
    assert info["world_size"] == 2 and info["batch_size"] == 3

    # The reported validation metrics are exact: those of the saved weights on the whole validation set.
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    best = rows[info["best_epoch"] - 1]
    loss, top1 = evaluate_saved(out, valid_dir)
    assert float(best["valid_loss"]) == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert float(best["valid_top1"]) == pytest.approx(top1, abs=1e-9)
    assert info["best_valid_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    # The learning rate follows the linear scaling rule: --learning-rate x 2 processes.
    assert float(rows[0]["lr"]) == pytest.approx(0.002)


def test_torchrun_with_fewer_validation_images_than_processes(tmp_path, make_image_folder, resnet18_dir):
    """Rank 1 has no validation row at all: it must still take part in every collective (no hang)."""
    train_dir = make_image_folder("train", {"a": 4, "b": 4})
    valid_dir = make_image_folder("valid", {"b": 1}, seed=1)
    out = tmp_path / "trained"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "train_pytorch_model", *train_args(resnet18_dir, train_dir, valid_dir, out, "--epochs", "1")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "training_info.json").read_text())["training"]
    assert info["best_valid_loss"] == pytest.approx(evaluate_saved(out, valid_dir)[0], rel=1e-5, abs=1e-6)


def test_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path, make_image_folder, resnet18_dir):
    """Each process started by itself, as Azure ML does (no torchrun to kill the survivors): rank 1 meets an
    unreadable validation image, rank 0 waits for it in a collective, and must not wait for the timeout."""
    train_dir = make_image_folder("train", {"a": 6, "b": 6})
    valid_dir = make_image_folder("valid", {"a": 3, "b": 3}, seed=1)
    broken = load_image_directory(valid_dir).files[1]  # row 1: validated by rank 1 (rows rank, rank+2, ...)
    (valid_dir / broken).write_bytes(b"this is no image")
    args = train_args(resnet18_dir, train_dir, valid_dir, tmp_path / "trained", "--epochs", "2",
                      "--max-bad-image-fraction", "0")
    common = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), LOCAL_WORLD_SIZE="2")
    processes = [
        subprocess.Popen([sys.executable, "-m", "train_pytorch_model", *args], cwd=REPO,
                         env=env(**common, RANK=str(rank), LOCAL_RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    results = []
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=240)
            results.append((process.returncode, stderr.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    (code0, last0), (code1, last1) = results
    assert code1 == 1 and last1.startswith("InvalidDatasetError: Validation data ") and broken in last1
    assert code0 == 1 and last0.startswith("TrainingFailedError: Another process of this distributed job failed")
    assert "process 1: InvalidDatasetError: Validation data" in last0 and broken in last0
    assert not (tmp_path / "trained").exists()


FINGERPRINT_RANK = """
import sys
from train_pytorch_model import checkpoint, distributed
from train_pytorch_model.image_directory import load_image_directory
ctx = distributed.setup("cpu")
print(checkpoint.data_fingerprints(ctx, load_image_directory(sys.argv[1]))[0])
distributed.teardown(ctx)
"""


def test_the_data_fingerprint_is_rank_0s_on_every_rank(tmp_path, make_image_folder):
    """Rank 0 alone stats the image files (each would be a round trip per file on a network mount); rank 1, shown a
    folder whose image changed, still gets rank 0's fingerprint, so every rank checks a checkpoint alike."""
    import shutil

    from train_pytorch_model import checkpoint

    seen_by_0 = make_image_folder("data", {"a": 2, "b": 2})
    seen_by_1 = shutil.copytree(seen_by_0, tmp_path / "copy")
    first = load_image_directory(seen_by_1).files[0]
    (seen_by_1 / first).write_bytes((seen_by_1 / first).read_bytes() + b"\0")  # one more byte: another stamp
    expected = checkpoint.data_fingerprint(load_image_directory(seen_by_0))
    assert checkpoint.data_fingerprint(load_image_directory(seen_by_1)) != expected
    common = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), LOCAL_WORLD_SIZE="2")
    processes = [subprocess.Popen([sys.executable, "-c", FINGERPRINT_RANK, str(folder)], cwd=REPO,
                                  env=env(**common, RANK=str(rank), LOCAL_RANK=str(rank)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank, folder in enumerate((seen_by_0, seen_by_1))]
    try:
        results = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]
        assert stdout.strip() == expected


def test_every_rank_gets_its_own_shard_reshuffled_each_epoch(make_image_folder):
    directory = load_image_directory(make_image_folder("data", {"a": 5, "b": 5}))
    dataset = build_dataset(directory, {"a": 0, "b": 1}, Preprocessing(image_size=32), train=True, seed=3)

    def order(rank: int, epoch: int) -> list[int]:
        loader = training_loader(dataset, batch_size=2, seed=3, rank=rank, world_size=2, num_workers=0,
                                 device=torch.device("cpu"))
        loader.sampler.set_epoch(epoch)
        return [index for index, _ in loader.sampler]

    for epoch in (0, 1):
        zero, one = order(0, epoch), order(1, epoch)
        assert len(zero) == len(one) == 5 and sorted(zero + one) == list(range(10))  # 10 rows: no padding needed
    assert order(0, 0) != order(0, 1)  # reshuffled per epoch ...
    assert order(0, 1) == order(0, 1)  # ... from the seed
    assert sorted([*ShardSampler(7, 0, 2), *ShardSampler(7, 1, 2)]) == list(range(7))  # validation: each row once


def test_two_simulated_nodes_sharing_one_output_path(tmp_path, make_image_folder, resnet18_dir):
    """Two torchrun "nodes" on this machine (--nnodes 2, one process each: LOCAL_RANK is 0 on both), as Azure ML
    starts a 2-node job whose nodes mount the same output: one writer, both exit 0, and the same weights as the
    same 2 processes on one node."""
    train_dir = make_image_folder("train", TRAIN)
    valid_dir = make_image_folder("valid", VALID, seed=1)
    shared_out, one_node_out = tmp_path / "trained", tmp_path / "one-node"
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "train_pytorch_model",
         *train_args(resnet18_dir, train_dir, valid_dir, shared_out, "--epochs", "2")],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [(node.wait(timeout=300), *node.communicate()) for node in nodes]
    for code, _, stderr in results:
        assert code == 0, stderr[-4000:]
    # The result summary is rank 0's, on stdout.
    assert "Trained model written" in results[0][1] and "Trained model written" not in results[1][1]
    for name in OUTPUT_FILES:
        assert (shared_out / name).is_file(), name

    one_node = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "train_pytorch_model", *train_args(resnet18_dir, train_dir, valid_dir, one_node_out, "--epochs", "2")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert one_node.returncode == 0, one_node.stderr[-4000:]
    two_nodes, reference = (torch.load(out / "model", weights_only=True) for out in (shared_out, one_node_out))
    assert all(torch.equal(two_nodes[k], reference[k]) for k in reference)


@pytest.mark.parametrize("device", ["cuda:1", "cuda:0"])
def test_a_gpu_index_is_refused_by_name_when_several_processes_run(monkeypatch, device):
    """Every rank would take that one GPU: refused before joining the process group (on any machine)."""
    from train_pytorch_model import distributed
    from train_pytorch_model.errors import InvalidParameterError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    with pytest.raises(InvalidParameterError, match=f"value '{device}' is invalid: this job runs 2 processes"):
        distributed.setup(device)
    assert distributed.pick_device("cpu", 1, 2) == torch.device("cpu")  # no index: still fine
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameterError, match="no CUDA GPU"):  # one process: the index is the user's choice
            distributed.pick_device(device, 0, 1)


def test_torchrun_multilabel_without_validation_data(tmp_path, resnet18_dir):
    """Two ranks split the same validation images off (seeded), sum their validation counts and histograms, and
    report the metrics that one process measures on the saved weights."""
    from sklearn.metrics import average_precision_score

    from conftest import write_multilabel_mltable
    from train_pytorch_model import multilabel_metrics

    data = write_multilabel_mltable(tmp_path / "ml", count=30)
    out = tmp_path / "trained"
    args = ["train", "--untrained-model", str(resnet18_dir), "--training-data", str(data), "--trained-model",
            str(out), "--image-size", "32", "--num-workers", "0", "--batch-size", "3", "--epochs", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "train_pytorch_model", *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "training_info.json").read_text())
    held_out = set(info["validation_split"]["validation_files"])
    directory = load_image_directory(data)
    rows = [i for i, name in enumerate(directory.files) if name in held_out]
    valid = directory.subset(rows)
    trained = read_trained_model_directory(out)
    dataset = build_dataset(valid, {c: i for i, c in enumerate(trained.classes)}, trained.preprocessing,
                            train=False, seed=1)
    batch = collate([dataset[i] for i in range(len(dataset))])
    with torch.inference_mode():
        logits = trained.model(trained.preprocessing.normalize(batch.images)).float()
    truth = batch.targets.numpy() > 0.5
    expected = multilabel_metrics.summary(truth, logits.sigmoid().numpy())
    with open(out / "metrics.csv") as handle:
        metrics = list(csv.DictReader(handle))[0]
    assert float(metrics["valid_iou"]) == pytest.approx(expected["iou"], abs=1e-6)
    assert float(metrics["valid_f1_macro"]) == pytest.approx(expected["f1_macro"], abs=1e-6)
    # mAP from the histogram: scikit-learn's AP of the logits rounded to their bin (1/64 of a logit).
    bins = multilabel_metrics.score_bins(logits, multilabel_metrics.histogram_bins(logits.shape[1])).numpy()
    rounded = np.mean([average_precision_score(truth[:, k], bins[:, k]) for k in range(truth.shape[1])
                       if truth[:, k].any()])
    assert float(metrics["valid_map"]) == pytest.approx(rounded, abs=1e-6)
