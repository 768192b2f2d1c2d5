"""Untrained/trained ModelDirectory reading and writing (spec sections 3-4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from train_pytorch_model.errors import InvalidModelDirectoryError, OutputDirectoryError, PretrainedWeightsNotFoundError
from train_pytorch_model.model_directory import (
    ModelSpec,
    read_model_spec,
    read_untrained_model_directory,
    write_untrained_model_directory,
)
from train_pytorch_model.models import Classifier, build_net, imagenet_weights_file
from train_pytorch_model.output_folder import staged_output


def test_reads_both_fixtures(resnet18_dir, densenet121_dir):
    assert read_model_spec(resnet18_dir) == ModelSpec("resnet18", False, False, None)
    assert read_model_spec(densenet121_dir) == ModelSpec("densenet121", False, False, None)
    spec, model = read_untrained_model_directory(resnet18_dir)
    assert model is None  # no `model` file and pretrained: false -> random init at training time


def test_spec_round_trips_in_the_legacy_layout(tmp_path, resnet18_dir):
    spec = ModelSpec("resnet18", False, False)
    write_untrained_model_directory(tmp_path / "m", spec, None)
    written = yaml.safe_load((tmp_path / "m" / "model_spec.yaml").read_text())
    original = yaml.safe_load((resnet18_dir / "model_spec.yaml").read_text())
    written.pop("time_created"), original.pop("time_created")
    assert written == original
    assert (tmp_path / "m" / "_meta.yaml").read_text() == (resnet18_dir / "_meta.yaml").read_text()
    assert list(yaml.safe_load((tmp_path / "m" / "model_spec.yaml").read_text())) == \
        ["flavor", "model_file", "time_created", "flavor_extras", "task_type"]


def test_weights_in_the_directory_are_used(tmp_path):
    torch.manual_seed(3)
    saved = Classifier(build_net("resnet18", 1000))
    write_untrained_model_directory(tmp_path / "m", ModelSpec("resnet18", True, False), saved.state_dict())
    _, model = read_untrained_model_directory(tmp_path / "m")
    assert torch.equal(model.model.layer1[0].conv1.weight, saved.model.layer1[0].conv1.weight)


def test_pretrained_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    write_untrained_model_directory(tmp_path / "m", ModelSpec("resnet18", True, False), None)
    with pytest.raises(PretrainedWeightsNotFoundError, match="init-model .*--pretrained true.*--weights FILE"):
        read_untrained_model_directory(tmp_path / "m")


def test_pretrained_weights_come_from_the_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = build_net("resnet18", 1000).state_dict()  # stands in for the ImageNet file, same format
    torch.save(reference, cache / imagenet_weights_file("resnet18"))
    write_untrained_model_directory(tmp_path / "m", ModelSpec("resnet18", True, False), None)
    _, model = read_untrained_model_directory(tmp_path / "m")
    assert torch.equal(model.model.conv1.weight, reference["conv1.weight"])


def test_legacy_pickle_model_is_refused(tmp_path, resnet18_dir):
    shutil.copytree(resnet18_dir, tmp_path / "m")
    spec = yaml.safe_load((tmp_path / "m" / "model_spec.yaml").read_text())
    spec["file_name"] = "model.pkl"
    (tmp_path / "m" / "model_spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(InvalidModelDirectoryError, match="pickled"):
        read_untrained_model_directory(tmp_path / "m")


def test_unsupported_model_name(tmp_path, resnet18_dir):
    shutil.copytree(resnet18_dir, tmp_path / "m")
    text = (tmp_path / "m" / "model_spec.yaml").read_text().replace("resnet18", "resnet19")
    (tmp_path / "m" / "model_spec.yaml").write_text(text)
    with pytest.raises(InvalidModelDirectoryError, match="'resnet19' is not a supported resnet"):
        read_untrained_model_directory(tmp_path / "m")


def test_staged_output_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage / "model").write_bytes(b"x" * 100)
            raise RuntimeError("crash while writing")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind

    out.mkdir()  # an existing empty folder (as Azure ML mounts it) is fine
    with staged_output(out) as stage:
        (stage / "model").write_bytes(b"ok")
    assert (out / "model").read_bytes() == b"ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(OutputDirectoryError, match="not empty"):
        with staged_output(out):
            pass


def test_a_model_entry_that_is_a_folder_is_refused_not_random_init(tmp_path):
    write_untrained_model_directory(tmp_path / "m", ModelSpec("resnet18", False, False), None)
    (tmp_path / "m" / "model").mkdir()
    with pytest.raises(InvalidModelDirectoryError, match="is a folder"):
        read_untrained_model_directory(tmp_path / "m")


def test_a_model_link_out_of_the_directory_is_not_followed(tmp_path):
    torch.save(Classifier(build_net("resnet18", 1000)).state_dict(), tmp_path / "elsewhere.pt")
    write_untrained_model_directory(tmp_path / "m", ModelSpec("resnet18", False, False), None)
    (tmp_path / "m" / "model").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(InvalidModelDirectoryError, match="outside the model directory"):
        read_untrained_model_directory(tmp_path / "m")


def test_any_torchvision_architecture_round_trips_and_says_who_reads_it(tmp_path):
    spec = ModelSpec("efficientnet_b0", False, False)
    write_untrained_model_directory(tmp_path / "m", spec, Classifier(build_net("efficientnet_b0", 1000)).state_dict())
    assert read_model_spec(tmp_path / "m") == spec and not spec.is_designer
    assert "Only train-pytorch-model and MLflow" in (tmp_path / "m" / "README.txt").read_text()
    info = json.loads((tmp_path / "m" / "model_info.json").read_text())
    assert info["preprocessing"]["image_size"] == 224 and info["preprocessing"]["interpolation"] == "bicubic"
    _, model = read_untrained_model_directory(tmp_path / "m")
    assert model.num_classes == 1000


@pytest.mark.parametrize("edit, message", [
    ({"model_name": "fasterrcnn_resnet50_fpn"}, "not a supported torchvision architecture"),
    ({"model_name": ["a"] * 10_000}, "not a supported"),
    ({"num_classes": 10**9}, "integer from 1 to"),
    ({"memory_efficient": True}, "unknown keys"),
])
def test_a_tampered_spec_of_a_torchvision_architecture_is_refused(tmp_path, edit, message):
    write_untrained_model_directory(tmp_path / "m", ModelSpec("efficientnet_b0", False, False), None)
    path = tmp_path / "m" / "model_spec.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["flavor_extras"]["init_params"].update(edit)
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(InvalidModelDirectoryError, match=message) as info:
        read_model_spec(tmp_path / "m")
    assert len(str(info.value)) < 1000
