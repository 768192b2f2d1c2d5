"""The architecture names `init-model` takes, torch-free: a mistyped name is answered at once, with the closest
names, before torch is imported. They are torchvision.models.list_models() of the pinned torchvision (classification
only; tests check the two agree)."""

from __future__ import annotations

import difflib

DENSENET_NAMES = ("densenet121", "densenet161", "densenet169", "densenet201")
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
                "wide_resnet50_2", "wide_resnet101_2")
DESIGNER_MODEL_NAMES = DENSENET_NAMES + RESNET_NAMES  # designer's DenseNet and ResNet modules' 13

MODEL_NAMES = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121", "densenet161",
    "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75",
    "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf",
    "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf",
    "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t",
    "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2"
)


def closest_names(name: str, count: int = 3) -> list[str]:
    """The architectures `name` most likely meant (`resnet-18`, `ResNet18` -> resnet18), best first."""
    def squashed(text: str) -> str:
        return "".join(c for c in str(text).lower() if c.isalnum())

    by_squashed = {squashed(n): n for n in MODEL_NAMES}
    if squashed(name) in by_squashed:  # only the spelling differs
        return [by_squashed[squashed(name)]]
    return [by_squashed[m] for m in difflib.get_close_matches(squashed(name), by_squashed, n=count, cutoff=0.6)]


def unknown_name_message(name: str) -> str:
    close = closest_names(name)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"{name!r} is not a torchvision classification architecture: {hint}(any of the {len(MODEL_NAMES)} names "
            "of torchvision.models.list_models(); designer's are densenet121 ... wide_resnet101_2)")
