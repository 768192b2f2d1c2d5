"""The 13 DenseNet/ResNet architectures of designer, built with torchvision.

A legacy `model_spec.yaml` names a Python module and class (`flavor_extras`) that the original
imported. We never import anything a file names: the (module, class) pair is looked up in an
allow-list and mapped to a torchvision builder.

`Classifier` reproduces the legacy state-dict layout (`model.<torchvision key>`), so a trained
model directory loads in the original's scorer with `pretrained: false` + `num_classes`.
Pretrained backbones get a new classification head sized for the task; the original instead
stacked `Linear(1000, C)` after the ImageNet logits, which we read but never write.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import InvalidModelDirectoryError, PretrainedWeightsNotFoundError

LEGACY_PACKAGE = "azureml.designer.modules.dl.pytorch.initialize_models.vision.classification"

# family -> (legacy module, legacy class, model names, the init_params flag besides pretrained)
FAMILIES = {
    "densenet": (f"{LEGACY_PACKAGE}.densenet", "DenseNet",
                 ("densenet121", "densenet161", "densenet169", "densenet201"), "memory_efficient"),
    "resnet": (f"{LEGACY_PACKAGE}.resnet", "ResNet",
               ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2"), "zero_init_residual"),
}
MODEL_FAMILY = {name: family for family, (_, _, names, _) in FAMILIES.items() for name in names}
MODEL_NAMES = tuple(MODEL_FAMILY)
DEFAULT_MODEL = {"densenet": "densenet201", "resnet": "resnext101_32x8d"}


def family_of(module: str, cls: str) -> str:
    """The family for a legacy (module, class) pair, or InvalidModelDirectoryError. Nothing is imported."""
    for family, (legacy_module, legacy_class, _, _) in FAMILIES.items():
        # Our own trained directories record the same legacy pair; accept a bare class name too.
        if cls == legacy_class and module in (legacy_module, "", None):
            return family
    allowed = ", ".join(f"{m}.{c}" for m, c, _, _ in FAMILIES.values())
    raise InvalidModelDirectoryError(
        f"model_spec.yaml names model class '{module}.{cls}', which is not supported "
        f"(nothing named by a file is imported). Supported: {allowed}."
    )


class Classifier(nn.Module):
    """A torchvision net under attribute `model` (the legacy state-dict layout), optionally
    followed by the original's `out_linear_model` stacked on 1000-way ImageNet logits."""

    def __init__(self, net: nn.Module, out_linear: nn.Linear | None = None):
        super().__init__()
        self.model = net
        if out_linear is not None:
            self.out_linear_model = out_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model(x)
        if hasattr(self, "out_linear_model"):
            x = self.out_linear_model(x)
        return x

    @property
    def num_classes(self) -> int:
        if hasattr(self, "out_linear_model"):
            return self.out_linear_model.out_features
        return _head(self.model).out_features


def build_net(model_name: str, num_classes: int, flag_value: bool = False) -> nn.Module:
    """A randomly initialised torchvision net (never downloads: weights=None)."""
    family = MODEL_FAMILY[model_name]
    flag = FAMILIES[family][3]
    builder = getattr(torchvision.models, model_name)
    return builder(weights=None, num_classes=num_classes, **{flag: bool(flag_value)})


def _head(net: nn.Module) -> nn.Linear:
    return net.fc if hasattr(net, "fc") else net.classifier


def replace_head(net: nn.Module, num_classes: int) -> None:
    """Swap the final Linear for a fresh one with `num_classes` outputs (seeded by the caller)."""
    old = _head(net)
    new = nn.Linear(old.in_features, num_classes)
    if hasattr(net, "fc"):
        net.fc = new
    else:
        net.classifier = new


def load_legacy_state(model_name: str, flag_value: bool, state: dict, source: str) -> Classifier:
    """A Classifier holding `state` (a legacy wrapper state dict), with whatever head it was saved with."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InvalidModelDirectoryError(
            f"'{source}' is not a PyTorch state dict (a mapping of names to tensors). Re-create the untrained model "
            "directory with init-model, or save the weights with torch.save(model.state_dict(), path)."
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if not any(k.startswith("model.") for k in state):
        # Also accept a bare torchvision state dict (e.g. a torch hub cache file).
        state = {f"model.{k}": v for k, v in state.items()}
    head_key = next((k for k in ("model.fc.weight", "model.classifier.weight") if k in state), None)
    linear_ok = all(state[k].dim() == 2 and min(state[k].shape) > 0
                    for k in (head_key, "out_linear_model.weight") if k in state)
    if head_key is None or not linear_ok:
        raise InvalidModelDirectoryError(
            f"'{source}' does not hold a {model_name} state dict (no usable classification head weights found). "
            "Re-create the untrained model directory with init-model."
        )
    out_linear = None
    if "out_linear_model.weight" in state:
        w = state["out_linear_model.weight"]
        out_linear = nn.Linear(w.shape[1], w.shape[0])
    model = Classifier(build_net(model_name, state[head_key].shape[0], flag_value), out_linear)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(v.shape)} instead of {tuple(expected[k].shape)}"
                for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise InvalidModelDirectoryError(
            f"'{source}' does not match architecture {model_name}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}), "
            f"{len(reshaped)} of another shape (e.g. {reshaped[:2]}). "
            "Was it saved from another model? Re-create the untrained model directory with init-model."
        )
    model.load_state_dict(state)
    return model


def adapt_to_classes(model: Classifier, num_classes: int) -> Classifier:
    """Give the model a head for `num_classes`, keeping an existing head that already fits."""
    if model.num_classes == num_classes and not hasattr(model, "out_linear_model"):
        return model
    if hasattr(model, "out_linear_model"):
        # Legacy layout: fold back to a plain net with a fresh head; the 1000-way ImageNet head goes.
        del model.out_linear_model
    replace_head(model.model, num_classes)
    return model


def imagenet_weights_file(model_name: str) -> str:
    """The file name torchvision's IMAGENET1K_V1 weights have in the torch hub cache."""
    weights_enum = torchvision.models.get_model_weights(model_name)
    return os.path.basename(weights_enum.IMAGENET1K_V1.url)


def find_cached_weights(model_name: str) -> Path | None:
    """ImageNet weights for `model_name` in the local torch hub cache, if someone put them there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / imagenet_weights_file(model_name)
    return path if path.is_file() else None


def load_weights_file(path: Path) -> dict:
    """Tensors only: weights_only=True refuses pickles that would run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure means the same thing to the user
        raise InvalidModelDirectoryError(
            f"'{path}' cannot be loaded as PyTorch weights ({type(exc).__name__}: {_load_failure_reason(exc)}). "
            "Only plain state dicts (tensors) are accepted, never pickled code: re-create the directory with "
            "init-model, or save the weights with torch.save(model.state_dict(), path)."
        ) from None


def _load_failure_reason(exc: Exception) -> str:
    """The useful part of a torch.load error. Its generic text suggests weights_only=False, which we never do."""
    text = str(exc)
    specific = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
    if specific:
        return specific.group(1).strip()[:200]
    return (text.splitlines() or [""])[0][:200]


def pretrained_missing_error(model_name: str, directory: Path) -> PretrainedWeightsNotFoundError:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / imagenet_weights_file(model_name)
    return PretrainedWeightsNotFoundError(
        f"'{directory}' asks for pretrained {model_name} weights, but it has no 'model' weights file and "
        f"'{cache}' does not exist (nothing is downloaded at run time). Either re-create the directory with "
        f"`python -m train_pytorch_model init-model --model-name {model_name} --pretrained --weights FILE`, "
        f"copy torchvision's {imagenet_weights_file(model_name)} to '{cache}', or set pretrained: false."
    )
