"""data.py: worker counts, /dev/shm-sized prefetch, the validation cache."""

from __future__ import annotations

import csv
import logging

import pytest
import torch

from train_pytorch_model import data
from train_pytorch_model.cli import main
from train_pytorch_model.data import CachedBatches, build_dataset, evaluation_loader, prefetch_factor
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.preprocessing import Preprocessing

CPU = torch.device("cpu")


def test_gpu_hosts_use_every_cpu_but_one_without_a_fixed_cap(monkeypatch):
    monkeypatch.setattr(data, "cpus_per_process", lambda local_world_size=1: 24 // local_world_size)
    assert data.default_num_workers(torch.device("cuda", 0)) == 23
    assert data.default_num_workers(torch.device("cuda", 0), local_world_size=8) == 2
    assert data.default_num_workers(CPU) == 6


def test_prefetch_fits_the_batches_in_flight_into_shared_memory(tmp_path, caplog):
    assert prefetch_factor(8, 10 * 2**20, shm=str(tmp_path)) == 4  # a disk-sized folder: plenty
    with caplog.at_level(logging.WARNING):
        assert prefetch_factor(8, 2**50, shm=str(tmp_path)) == 1  # far too big: one batch each, and a warning
    assert "shm_size" in caplog.text
    assert prefetch_factor(8, 2**20, shm=str(tmp_path / "missing")) == 2


def test_cached_validation_batches_are_decoded_once_and_bounded(legacy_image_dir, monkeypatch):
    directory = load_image_directory(legacy_image_dir)
    dataset = build_dataset(directory, {c: i for i, c in enumerate(directory.categories)}, Preprocessing(32),
                            train=False, seed=1)
    decoded = []
    original = type(dataset).__getitem__
    monkeypatch.setattr(type(dataset), "__getitem__", lambda self, key: (decoded.append(key), original(self, key))[1])
    loader = evaluation_loader(dataset, batch_size=8, rank=0, world_size=1, num_workers=0, device=CPU, cache=True)
    first = [b.images for b in loader]
    second = [b.images for b in loader]
    assert len(decoded) == 18 and all(torch.equal(a, b) for a, b in zip(first, second))
    small = CachedBatches(loader.loader, max_bytes=3 * 32 * 32 * 10)  # room for 10 of the 18 images
    list(small), list(small)
    assert small.gave_up and small.batches is None and len(decoded) == 18 + 36


@pytest.mark.slow
def test_training_with_the_validation_cache_gives_the_same_metrics(tmp_path, make_image_folder, resnet18_dir):
    train_dir = make_image_folder("train", {"a": 6, "b": 6})
    valid_dir = make_image_folder("valid", {"a": 3, "b": 3}, seed=1)
    results = []
    for cache in ("false", "true"):
        out = tmp_path / f"out-{cache}"
        assert main(["train", "--untrained-model", str(resnet18_dir), "--training-data", str(train_dir),
                     "--validation-data", str(valid_dir), "--trained-model", str(out), "--epochs", "2",
                     "--image-size", "32", "--batch-size", "4", "--num-workers", "0",
                     "--cache-validation", cache]) == 0
        with open(out / "metrics.csv") as handle:
            results.append([(r["valid_loss"], r["valid_top1"]) for r in csv.DictReader(handle)])
    assert results[0] == results[1]
