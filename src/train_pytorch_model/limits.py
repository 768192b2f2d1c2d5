"""Bounds and fixed choices that several commands share, each stated once. Torch-free: the command line,
component.yaml's checks and the tests read them without importing torch."""

from __future__ import annotations

# The square side images are resized/cropped to: train's --image-size, a trained model's recipe, component.yaml.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096

AUGMENTATIONS = ("flip_crop", "crop", "none")
OPTIMIZERS = ("adamw", "sgd")
# Weight decay when --weight-decay is auto: the original's for SGD, the usual AdamW value (docs/recipe.md).
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
