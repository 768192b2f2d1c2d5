"""Allow-listed architectures and the legacy state-dict layout."""

from __future__ import annotations

import pytest
import torch
import torchvision

from train_pytorch_model.errors import InvalidModelDirectoryError
from train_pytorch_model.models import (FAMILIES, MODEL_NAMES, Classifier, adapt_to_classes, build_net, family_of,
                                        imagenet_weights_file, load_legacy_state)


def test_all_thirteen_designer_models_map_to_torchvision():
    assert len(MODEL_NAMES) == 13
    for name in MODEL_NAMES:
        with torch.device("meta"):  # shapes only: no memory, no time
            net = build_net(name, num_classes=7)
        reference_head = getattr(torchvision.models, name)(weights=None, num_classes=7) if name == "resnet18" else None
        head = net.fc if hasattr(net, "fc") else net.classifier
        assert head.out_features == 7, name
        if reference_head is not None:
            assert type(net) is type(reference_head)
        assert imagenet_weights_file(name).endswith(".pth")


@pytest.mark.parametrize("module, cls", [("os", "system"), ("subprocess", "Popen"),
                                         ("azureml.designer.modules.dl.pytorch.initialize_models.vision.classification.resnet", "DenseNet")])
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
