"""Heat maps of what a classifier looked at: Grad-CAM (Selvaraju et al., 2017) on the last spatial feature map.

For each image and a target class index (the predicted class; for a multi-label model, each predicted label in
turn), the feature map of the last layer that still has a spatial extent is weighted by the mean gradient of the
class score over it, summed over channels, rectified, upsampled to the input and scaled to [0, 1].

Why hand-written: the method is a few tensor lines around one forward and one backward pass, and picking the layer
(which no library does for an arbitrary torchvision net) is the only real work. captum's LayerGradCam would add a
dependency to every serving environment and still need the layer.

A multi-label model's explained score is the label's logit (before the sigmoid), one map per predicted label.

The layer: the last module, in execution order, whose output is an (N, C, H, W) tensor with H x W > 1, found by
hooks during the explained forward pass itself (no probe pass, nothing to configure, works for every torchvision
CNN; a ViT's last such map is its patch embedding, a much weaker explanation). At small inputs the map is coarse
(resnet18 at 32 px: layer3's 2 x 2).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# A blue-cyan-green-yellow-red ramp (the familiar "jet" look) without importing matplotlib in a serving process.
_RAMP_POSITIONS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_COLOURS = np.array([[0, 0, 160], [0, 200, 255], [40, 220, 40], [255, 230, 0], [230, 0, 0]], dtype=np.float64)
OVERLAY_ALPHA = 0.5
MAX_EXPLAINED_LABELS = 5  # per image of a multi-label model: its most probable predicted labels


def labels_to_explain(probabilities: np.ndarray, multilabel: bool = False, threshold: float = 0.5) -> list[list[int]]:
    """Per image (row of probabilities), the class indices to explain: the predicted class; for a multi-label
    model each predicted label (probability at or above `threshold`), at most MAX_EXPLAINED_LABELS, most probable
    first (none when no label is predicted)."""
    if not multilabel:
        return [[int(row.argmax())] for row in probabilities]
    return [[int(i) for i in np.argsort(-row, kind="stable")[:MAX_EXPLAINED_LABELS] if row[i] >= threshold]
            for row in probabilities]


def grad_cam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, H, W) heat maps in [0, 1] for normalised (N, C, H, W) `images` and one class index per image.

    Works when called under `torch.inference_mode` (score, serving): gradients are switched back on here. The
    model's parameters get no `.grad` (only the feature map is differentiated)."""
    maps: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1 \
                and output.requires_grad:
            maps.append(output)

    handles = [m.register_forward_hook(keep) for m in model.modules() if m is not model]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            images = images.clone().requires_grad_(True)  # a normal tensor (not an inference one) to differentiate
            logits = model(images)
            if not maps:
                raise ValueError("the model has no layer with a spatial feature map to explain")
            features = maps[-1]
            index = targets.to(logits.device, dtype=torch.long).clone().view(-1, 1)  # not an inference tensor either
            score = logits.float().gather(1, index).sum()
            (gradients,) = torch.autograd.grad(score, features)
            weights = gradients.float().mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * features.detach().float()).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
            return (cam / peak).detach()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def colour_map(heat: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) colours of a [0, 1] (H, W) heat map."""
    heat = np.clip(heat, 0.0, 1.0)
    channels = [np.interp(heat, _RAMP_POSITIONS, _RAMP_COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 (H, W, 3) image blended with the colours of its (H, W) heat map."""
    blended = (1 - alpha) * image.astype(np.float64) + alpha * colour_map(heat).astype(np.float64)
    return blended.round().clip(0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray, min_side: int = 0) -> bytes:
    """A PNG of a uint8 (H, W, 3) image; upscaled (nearest neighbour, whole factor) to at least `min_side`."""
    from PIL import Image

    picture = Image.fromarray(image)
    factor = -(-min_side // max(1, min(picture.size))) if min_side else 1
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def explained_images(model: nn.Module, normalize, pixels: torch.Tensor, targets: torch.Tensor) -> list[np.ndarray]:
    """Overlays (uint8 HWC) for uint8 (N, C, H, W) `pixels` as the model saw them, one per target class index."""
    device = next(model.parameters()).device
    heat = grad_cam(model, normalize(pixels.to(device)), targets).cpu().numpy()
    return [overlay(image.permute(1, 2, 0).cpu().numpy(), h) for image, h in zip(pixels, heat)]
