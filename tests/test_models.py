"""Allow-listed architectures (every torchvision classification model), heads, and the legacy state-dict layout."""

from __future__ import annotations

import zipfile

import pytest
import torch
import torchvision

from train_pytorch_model.errors import InvalidModelDirectoryError
from train_pytorch_model.models import (
    DESIGNER_MODEL_NAMES,
    FAMILIES,
    MODEL_FAMILY,
    MODEL_NAMES,
    Classifier,
    adapt_to_classes,
    build_net,
    check_model_name,
    cpu_state_dict,
    family_of,
    head_of,
    imagenet_weights_file,
    load_legacy_state,
    load_weights_file,
    preprocessing_defaults,
)


def test_all_thirteen_designer_models_map_to_torchvision():
    assert len(DESIGNER_MODEL_NAMES) == 13
    assert {MODEL_FAMILY[n] for n in DESIGNER_MODEL_NAMES} == {"densenet", "resnet"}
    for name in DESIGNER_MODEL_NAMES:
        with torch.device("meta"):  # shapes only: no memory, no time
            net = build_net(name, num_classes=7)
        head = net.fc if hasattr(net, "fc") else net.classifier
        assert head.out_features == 7 and head_of(net)[1] is head, name
        assert imagenet_weights_file(name).endswith(".pth")


def test_the_allow_list_is_torchvisions_classification_list():
    assert MODEL_NAMES == tuple(torchvision.models.list_models(module=torchvision.models))
    assert len(MODEL_NAMES) >= 80 and set(DESIGNER_MODEL_NAMES) < set(MODEL_NAMES)
    for name in ("fasterrcnn_resnet50_fpn", "deeplabv3_resnet50", "r3d_18", "raft_small", "quantized_resnet18",
                 "os.system", "resnet18 ", ["resnet18"]):
        with pytest.raises(InvalidModelDirectoryError, match="not a torchvision classification architecture"):
            check_model_name(name)
        assert name not in MODEL_NAMES


@pytest.mark.slow
def test_the_head_is_found_in_every_architecture():
    """The generic rule (last Linear/Conv2d) gives a head with num_classes outputs for all of them."""
    for name in MODEL_NAMES:
        if name.startswith("regnet"):  # RegNet cannot be built on the meta device; built for real below
            continue
        with torch.device("meta"):
            net = build_net(name, num_classes=7)
        _, head = head_of(net)
        assert (head.out_features if isinstance(head, torch.nn.Linear) else head.out_channels) == 7, name


# One architecture per family, on a tiny input; (name, input size, qualified head name)
FAMILY_CASES = [
    ("resnet18", 32, "fc"), ("densenet121", 32, "classifier"), ("efficientnet_b0", 32, "classifier.1"),
    ("mobilenet_v2", 32, "classifier.1"), ("mobilenet_v3_small", 32, "classifier.3"),
    ("convnext_tiny", 32, "classifier.2"), ("mnasnet0_5", 32, "classifier.1"), ("regnet_x_400mf", 32, "fc"),
    ("regnet_y_400mf", 32, "fc"), ("shufflenet_v2_x0_5", 32, "fc"), ("squeezenet1_1", 32, "classifier.1"),
    ("vgg11", 32, "classifier.6"), ("alexnet", 64, "classifier.6"), ("googlenet", 32, "fc"),
    ("inception_v3", 80, "fc"), ("vit_b_32", 224, "heads.head"), ("swin_t", 64, "head"),
    ("swin_v2_t", 64, "head"), ("maxvit_t", 224, "classifier.5"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, size, head_name", FAMILY_CASES, ids=[c[0] for c in FAMILY_CASES])
def test_each_family_gets_a_new_head_and_trains_a_step(name, size, head_name):
    torch.manual_seed(0)
    model = Classifier(build_net(name, 1000))  # as an untrained directory holds it: the ImageNet head
    assert head_of(model.model)[0] == head_name and model.num_classes == 1000
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(f"model.{head_name}.")}
    model = adapt_to_classes(model, 3)
    assert model.num_classes == 3 and head_of(model.model)[0] == head_name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in body.items())  # only the head changed
    if name == "maxvit_t":  # 224 px only, and slow to train on CPU: a forward pass is enough
        with torch.no_grad():
            assert model.eval()(torch.rand(1, 3, size, size)).shape == (1, 3)
    else:
        model.train()
        logits = model(torch.rand(2, 3, size, size))
        assert logits.shape == (2, 3)
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
        assert head_of(model.model)[1].weight.grad is not None
    # The trained state dict loads back into the same architecture with that head.
    again = load_legacy_state(name, False, cpu_state_dict(model), "trained")
    assert again.num_classes == 3


def test_preprocessing_defaults_come_from_the_weights_transforms():
    assert preprocessing_defaults("resnet18") == {
        "image_size": 224, "resize_size": 256, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225], "min_size": 1, "fixed_size": False}
    assert preprocessing_defaults("efficientnet_b3")["image_size"] == 300
    assert preprocessing_defaults("efficientnet_b3")["interpolation"] == "bicubic"
    for name in ("vit_b_16", "swin_t", "maxvit_t", "vit_h_14"):
        assert preprocessing_defaults(name)["fixed_size"], name
    assert preprocessing_defaults("vit_h_14")["image_size"] == 518
    assert preprocessing_defaults("inception_v3")["min_size"] == 75
    for name in MODEL_NAMES:
        d = preprocessing_defaults(name)
        assert d["resize_size"] >= d["image_size"] >= d["min_size"] and len(d["mean"]) == len(d["std"]) == 3, name


def test_cpu_state_dict_is_a_detached_copy():
    net = torch.nn.Linear(2, 2)
    copy = cpu_state_dict(net)
    with torch.no_grad():
        net.weight.add_(1)
    assert not torch.equal(copy["weight"], net.weight) and not copy["weight"].requires_grad


@pytest.mark.parametrize("module, cls", [("os", "system"), ("subprocess", "Popen"),
                                         (f"{FAMILIES['resnet'][0]}", "DenseNet")])
def test_unknown_module_or_class_is_refused_without_import(module, cls):
    with pytest.raises(InvalidModelDirectoryError, match="not supported"):
        family_of(module, cls)


def test_legacy_pretrained_layout_with_out_linear_model_is_read_then_folded():
    torch.manual_seed(0)
    net = build_net("resnet18", 1000)
    legacy = Classifier(net, torch.nn.Linear(1000, 3))
    state = legacy.state_dict()
    assert "out_linear_model.weight" in state and "model.fc.weight" in state
    model = load_legacy_state("resnet18", False, state, "legacy")
    assert model.num_classes == 3
    x = torch.randn(2, 3, 32, 32)
    legacy.eval(), model.eval()
    assert torch.allclose(model(x), legacy(x))
    folded = adapt_to_classes(model, 3)
    assert not hasattr(folded, "out_linear_model") and folded.num_classes == 3


def test_bare_torchvision_state_dict_is_accepted():
    state = torchvision.models.resnet18(weights=None).state_dict()
    model = load_legacy_state("resnet18", False, state, "hub file")
    assert torch.equal(model.model.conv1.weight, state["conv1.weight"])


def test_state_dict_of_another_architecture_is_refused():
    state = Classifier(build_net("resnet34", 10)).state_dict()
    with pytest.raises(InvalidModelDirectoryError, match="does not match architecture resnet18"):
        load_legacy_state("resnet18", False, state, "model")


def test_families_cover_designer_defaults():
    assert "densenet201" in FAMILIES["densenet"][2] and "resnext101_32x8d" in FAMILIES["resnet"][2]


# --- a hostile `model` file ------------------------------------------------------------------------------------

def resnet18_state() -> dict:
    return Classifier(build_net("resnet18", 1000)).state_dict()


def test_a_huge_head_is_refused_from_the_archive_directory_without_loading(tmp_path):
    state = resnet18_state()
    # 300k classes: 600 MiB of head, over the bound for resnet18; never loaded, never built.
    state["model.fc.weight"] = torch.zeros(300_000, 512)
    state["model.fc.bias"] = torch.zeros(300_000)
    torch.save(state, tmp_path / "model")
    with pytest.raises(InvalidModelDirectoryError, match="more than a resnet18 state dict can"):
        load_weights_file(tmp_path / "model", "resnet18")


def test_a_deflated_archive_is_refused_before_inflating(tmp_path):
    torch.save(resnet18_state(), tmp_path / "plain")
    with zipfile.ZipFile(tmp_path / "plain") as src, zipfile.ZipFile(tmp_path / "model", "w",
                                                                     zipfile.ZIP_DEFLATED) as dst:
        for member in src.infolist():
            dst.writestr(member.filename, src.read(member))
    with pytest.raises(InvalidModelDirectoryError, match="compressed members"):
        load_weights_file(tmp_path / "model", "resnet18")


def test_a_model_that_is_a_folder_or_a_fifo_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(InvalidModelDirectoryError, match="is a folder"):
        load_weights_file(tmp_path / "model", "resnet18")
    import os
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidModelDirectoryError, match="not a regular file"):
        load_weights_file(tmp_path / "fifo", "resnet18")  # never opened: it would block


@pytest.mark.parametrize("kind", ["sparse", "meta", "quantized", "nan", "inf"])
def test_tensors_that_are_not_dense_finite_weights_are_refused(tmp_path, kind):
    state = resnet18_state()
    weight = state["model.fc.weight"]
    state["model.fc.weight"] = {
        "sparse": lambda: weight.to_sparse(),
        "meta": lambda: torch.empty(weight.shape, device="meta"),
        "quantized": lambda: torch.quantize_per_tensor(weight, 0.1, 0, torch.qint8),
        "nan": lambda: weight.index_fill(0, torch.tensor([3]), float("nan")),
        "inf": lambda: weight.index_fill(1, torch.tensor([0]), float("-inf")),
    }[kind]()
    torch.save(state, tmp_path / "model")
    expected = "NaN or infinite" if kind in ("nan", "inf") else kind
    with pytest.raises(InvalidModelDirectoryError, match=expected):
        load_legacy_state("resnet18", False, load_weights_file(tmp_path / "model", "resnet18"), "model")
