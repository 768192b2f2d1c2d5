"""Image decoding and the resize/normalise recipe shared by training, scoring and serving.

Decoding happens in DataLoader workers and produces uint8 CHW tensors (4x less to move than
float). Normalisation runs on the batch, on the training device (`Preprocessing.normalize`), so
the GPU does the float math. The recipe is saved in the trained model directory, so scoring
repeats exactly what validation did.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import v2

# Decompression bombs: refuse images over ~180 megapixels instead of exhausting memory.
Image.MAX_IMAGE_PIXELS = 178_956_970
# The original accepted truncated files; keep that, the missing part decodes grey.
ImageFile.LOAD_TRUNCATED_IMAGES = True

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("flip_crop", "crop", "none")


class ImageDecodeError(Exception):
    """A file is not a usable image; `data.py` decides whether to skip it."""


def decode_image(source: str | Path | bytes, size_hint: int | None = None) -> Image.Image:
    """Open an image file or bytes as RGB, honouring EXIF orientation.

    16-bit greyscale is scaled to 8 bits (convert('RGB') would clip it white); palette and
    alpha images are converted (alpha dropped, as designer did); animated images use frame 0.
    `size_hint` lets JPEG decode at a reduced scale (draft mode): much faster for big photos.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            if size_hint and image.format == "JPEG":
                image.draft("RGB", (size_hint, size_hint))
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the decoded pixels
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float32)
                scale = 257.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 1.0
                image = Image.fromarray((array / scale).clip(0, 255).astype(np.uint8))
            elif image.mode == "P":
                image = image.convert("RGBA")
            return image if image.mode == "RGB" else image.convert("RGB")
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            ZeroDivisionError, IndexError, TypeError, EOFError) as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {str(exc)[:200]}") from None


@dataclass
class Preprocessing:
    """How pixels reach the model. `image_size` None means "no resize" (legacy trained models)."""

    image_size: int | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # Shorter side is resized to image_size / crop_fraction, then centre-cropped (torchvision's recipe).
    crop_fraction: float = 0.875
    augmentation: str = "flip_crop"
    _mean_std_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("_mean_std_cache")
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        known = {k: v for k, v in data.items() if k in ("image_size", "mean", "std", "crop_fraction", "augmentation")}
        known["mean"], known["std"] = tuple(known.get("mean", IMAGENET_MEAN)), tuple(known.get("std", IMAGENET_STD))
        return cls(**known)

    @property
    def resize_size(self) -> int | None:
        return None if self.image_size is None else max(self.image_size, round(self.image_size / self.crop_fraction))

    # Resizing and cropping run on the PIL image, before PILToTensor: Pillow's resampling costs a fraction of
    # torch's uint8 antialiased resize on small images, and uses no OpenMP threads, which would otherwise
    # fight the model's threads when decoding runs in the training process (--num-workers 0).

    def eval_transform(self) -> v2.Transform:
        """PIL RGB -> uint8 CHW tensor, deterministic."""
        steps = []
        if self.image_size is not None:
            steps += [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.image_size)]
        return v2.Compose(steps + [v2.PILToTensor()])

    def train_transform(self) -> v2.Transform:
        """Light augmentation for training; uses torch's global RNG (seeded per sample by data.py)."""
        if self.image_size is None or self.augmentation == "none":
            return self.eval_transform()
        steps = [v2.RandomResizedCrop(self.image_size, scale=(0.5, 1.0), antialias=True)]
        if self.augmentation == "flip_crop":
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps + [v2.PILToTensor()])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW batch -> normalised float batch, on the batch's device."""
        key = (batch.device, torch.float32)
        if key not in self._mean_std_cache:
            mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1) * 255
            std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1) * 255
            self._mean_std_cache[key] = (mean, std)
        mean, std = self._mean_std_cache[key]
        return (batch.float() - mean) / std
