"""`init-model`: the untrained model directory of designer's DenseNet/ResNet modules (spec section 3)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torchvision
import yaml

from train_pytorch_model import train_command
from train_pytorch_model.cli import main
from train_pytorch_model.init_model import build_untrained
from train_pytorch_model.model_directory import read_untrained_model_directory
from train_pytorch_model.models import imagenet_weights_file

META = "type: ModelDirectory\nextension: {}\nmodel: model_spec.yaml\n"


@pytest.fixture(autouse=True)
def _own_torch_home(tmp_path, monkeypatch):
    """Nothing here may find (or fill) the real torch hub cache; downloads only ever go to 127.0.0.1."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def init_model(*args: str) -> int:
    return main(["init-model", *args])


def last_stderr_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_resnet18_directory_has_the_designer_layout_and_a_loadable_model(tmp_path, resnet18_dir):
    out = tmp_path / "untrained"
    assert init_model("--model-name", "resnet18", "--untrained-model", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["_meta.yaml", "model", "model_info.json", "model_spec.yaml"]
    info = json.loads((out / "model_info.json").read_text())
    assert info["preprocessing"]["image_size"] == 224 and info["weights"] == "random initialisation (seed 1)"
    assert (out / "_meta.yaml").read_text() == META == (resnet18_dir / "_meta.yaml").read_text()
    # Same keys, order and values as the legacy fixture, except the timestamp.
    ours, legacy = ((d / "model_spec.yaml").read_text().splitlines() for d in (out, resnet18_dir))
    assert [line for line in ours if not line.startswith("time_created")] == \
           [line for line in legacy if not line.startswith("time_created")]
    # The `model` file is the legacy wrapper's state dict: designer's reader loads it strictly.
    state = torch.load(out / "model", weights_only=True)
    assert all(key.startswith("model.") for key in state) and state["model.fc.weight"].shape == (1000, 512)
    wrapper = torch.nn.Module()
    wrapper.model = torchvision.models.resnet18()
    wrapper.load_state_dict(state, strict=True)
    # And our reader gives back exactly those weights.
    spec, model = read_untrained_model_directory(out)
    assert (spec.model_name, spec.pretrained, spec.flag_value) == ("resnet18", False, False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_random_init_is_seeded(tmp_path):
    def weights(seed: int):
        return build_untrained("resnet18", pretrained=False, seed=seed)[1]["model.conv1.weight"]
    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(2))
    before = torch.random.get_rng_state()
    weights(3)
    assert torch.equal(before, torch.random.get_rng_state()), "the global RNG must not be consumed"


def test_densenet_memory_efficient_is_recorded(tmp_path):
    out = tmp_path / "densenet"
    assert init_model("--model-name", "densenet121", "--memory-efficient", "--untrained-model", str(out)) == 0
    params = yaml.safe_load((out / "model_spec.yaml").read_text())["flavor_extras"]["init_params"]
    assert params == {"model_name": "densenet121", "pretrained": False, "memory_efficient": True}
    spec, model = read_untrained_model_directory(out)
    assert spec.flag_value is True and model.num_classes == 1000


def test_zero_init_residual_zeroes_the_last_batchnorm(tmp_path):
    out = tmp_path / "zero"
    # "True" as Azure ML renders a boolean input.
    assert init_model("--model-name", "resnet18", "--zero-init-residual", "True", "--untrained-model", str(out)) == 0
    state = torch.load(out / "model", weights_only=True)
    assert torch.count_nonzero(state["model.layer1.0.bn2.weight"]) == 0
    params = yaml.safe_load((out / "model_spec.yaml").read_text())["flavor_extras"]["init_params"]
    assert params["zero_init_residual"] is True


def test_flag_of_the_other_family_is_refused(tmp_path, capsys):
    assert init_model("--model-name", "resnet18", "--memory-efficient", "--untrained-model", str(tmp_path / "x")) == 1
    assert last_stderr_line(capsys).startswith('InvalidParameterError: Parameter "Memory efficient"')
    assert not (tmp_path / "x").exists()


def fake_hub_cache(tmp_path, monkeypatch, model_name: str = "resnet18") -> dict:
    """torchvision weights in TORCH_HOME/hub/checkpoints, as a download would leave them (none happens here)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(7)
    state = getattr(torchvision.models, model_name)().state_dict()
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / imagenet_weights_file(model_name))
    return state


def test_pretrained_from_the_torch_hub_cache(tmp_path, monkeypatch):
    cached = fake_hub_cache(tmp_path, monkeypatch)
    out = tmp_path / "pretrained"
    assert init_model("--model-name", "resnet18", "--pretrained", "--untrained-model", str(out)) == 0
    assert yaml.safe_load((out / "model_spec.yaml").read_text())["flavor_extras"]["init_params"]["pretrained"] is True
    state = torch.load(out / "model", weights_only=True)
    assert set(state) == {f"model.{key}" for key in cached}
    for key, value in cached.items():
        assert torch.equal(state[f"model.{key}"], value), key
    # Training reads the weights from the directory: the cache may be gone by then.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    spec, model = read_untrained_model_directory(out)
    assert spec.pretrained and torch.equal(model.model.conv1.weight, cached["conv1.weight"])


def test_pretrained_from_a_weights_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    torch.manual_seed(3)
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, tmp_path / "resnet18.pth")
    out = tmp_path / "pretrained"
    # As the component binds it: `--pretrained False` by default, the weights input connected.
    assert init_model("--model-name", "resnet18", "--pretrained", "False", "--weights", str(tmp_path / "resnet18.pth"),
                      "--untrained-model", str(out)) == 0
    assert torch.equal(torch.load(out / "model", weights_only=True)["model.fc.bias"], weights["fc.bias"])
    assert yaml.safe_load((out / "model_spec.yaml").read_text())["flavor_extras"]["init_params"]["pretrained"] is True


def test_training_starts_from_the_directory_weights(tmp_path):
    out = tmp_path / "untrained"
    assert init_model("--model-name", "resnet18", "--random-seed", "5", "--untrained-model", str(out)) == 0
    saved = torch.load(out / "model", weights_only=True)
    model, spec = train_command.build_model(out, 3)
    assert torch.equal(model.model.layer4[1].conv2.weight, saved["model.layer4.1.conv2.weight"])
    assert model.num_classes == 3


@pytest.mark.parametrize("case", ["wrong_architecture", "wrong_shapes", "not_tensors"])
def test_pretrained_errors(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    out = tmp_path / "out"
    args = ["--model-name", "resnet18", "--untrained-model", str(out), "--pretrained"]
    if case == "wrong_architecture":
        torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
        args += ["--weights", str(tmp_path / "resnet34.pth")]
    elif case == "wrong_shapes":  # same keys as resnet18 for the stem, other shapes in the blocks
        torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
        args += ["--weights", str(tmp_path / "resnet50.pth")]
    elif case == "not_tensors":
        torch.save({"conv1.weight": argparse.Namespace()}, tmp_path / "pickle.pth")
        args += ["--weights", str(tmp_path / "pickle.pth")]
    assert init_model(*args) == 1
    line = last_stderr_line(capsys)
    expected = {
        "wrong_architecture": ("InvalidModelDirectoryError:", "does not match architecture resnet18"),
        "wrong_shapes": ("InvalidModelDirectoryError:", "does not match architecture resnet18"),
        "not_tensors": ("InvalidModelDirectoryError:", "never pickled code"),
    }[case]
    assert line.startswith(expected[0]) and expected[1] in line, line
    assert not out.exists()


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "quantized_resnet18", "os.system", "resnet18 "])
def test_a_name_outside_torchvisions_classification_list_is_an_argparse_error(tmp_path, capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        init_model("--model-name", name, "--untrained-model", str(tmp_path / "x"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a torchvision classification architecture" in err and "list_models()" in err
    assert name != "resnet18 " or "did you mean resnet18?" in err  # the closest name
    assert not (tmp_path / "x").exists()


def test_an_architecture_beyond_designer_says_who_reads_it_and_trains(tmp_path):
    out = tmp_path / "mobilenet"
    assert init_model("--model-name", "mobilenet_v3_small", "--untrained-model", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "_meta.yaml", "model", "model_info.json",
                                                     "model_spec.yaml"]
    assert "Only train-pytorch-model and MLflow" in (out / "README.txt").read_text()
    spec_yaml = yaml.safe_load((out / "model_spec.yaml").read_text())
    assert spec_yaml["flavor_extras"]["class"] == "TorchvisionClassifier"
    assert "designer" in spec_yaml["readable_by"]
    assert spec_yaml["flavor_extras"]["init_params"] == {"model_name": "mobilenet_v3_small", "pretrained": False}
    model, spec = train_command.build_model(out, 4)
    assert spec.model_name == "mobilenet_v3_small" and not spec.is_designer and model.num_classes == 4
    model.train()
    model(torch.rand(2, 3, 32, 32)).sum().backward()


def test_pretrained_googlenet_from_torchvisions_file_with_auxiliary_heads(tmp_path):
    """torchvision's GoogLeNet file holds aux1/aux2 (as the hub cache has it); the net we train has none."""
    state = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()
    assert any(k.startswith("aux1.") for k in state)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / imagenet_weights_file("googlenet"))
    out = tmp_path / "googlenet"
    assert init_model("--model-name", "googlenet", "--pretrained", "true", "--untrained-model", str(out)) == 0
    saved = torch.load(out / "model", weights_only=True)
    assert not any(".aux" in k for k in saved) and torch.equal(saved["model.fc.weight"], state["fc.weight"])
    _, model = read_untrained_model_directory(out)
    assert model.model.transform_input and model.num_classes == 1000


def test_designers_imagenet1k_v1_file_in_the_cache_is_used_when_default_is_not_there(tmp_path):
    state = torchvision.models.resnet50(weights=None).state_dict()
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    v1 = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    assert v1 != imagenet_weights_file("resnet50")  # DEFAULT is V2 for resnet50
    torch.save(state, cache / v1)
    out = tmp_path / "r50"
    assert init_model("--model-name", "resnet50", "--pretrained", "--untrained-model", str(out)) == 0
    assert torch.equal(torch.load(out / "model", weights_only=True)["model.fc.bias"], state["fc.bias"])
