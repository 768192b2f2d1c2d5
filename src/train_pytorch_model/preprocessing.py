"""Image decoding and the resize/normalise recipe shared by training, scoring and serving.

Decoding happens in DataLoader workers and produces uint8 CHW tensors (4x less to move than
float). Normalisation runs on the batch, on the training device (`Preprocessing.normalize`), so
the GPU does the float math. The recipe is saved in the trained model directory, so scoring
repeats exactly what validation did.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import v2

from .errors import InvalidPreprocessingError, quote
from .limits import AUGMENTATIONS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

# Decompression bombs: Pillow checks the header's size on open; decode_image turns its warning (over half this
# many pixels) into a refusal, so no image decodes to more than ~89 megapixels (268 MB of RGB).
Image.MAX_IMAGE_PIXELS = 178_956_970
# The longest side a resize may produce, as a multiple of the resize size: a 65535x1 image would otherwise be
# resized to 110x7.2 million pixels. Longer sides are scaled down to fit (the crop pads what is missing).
MAX_RESIZE_ASPECT = 4
# The original accepted truncated files; keep that, the missing part decodes grey.
ImageFile.LOAD_TRUNCATED_IMAGES = True

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDecodeError(Exception):
    """A file is not a usable image; `data.py` decides whether to skip it."""


def _open(source: str | Path | bytes):
    """A binary stream for Pillow; for a path, a regular file only (a FIFO or device would block forever)."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageDecodeError("not a regular file (a pipe, device or folder)")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


@contextlib.contextmanager
def _opened(source: str | Path | bytes) -> Iterator[Image.Image]:
    """Pillow's lazy image (header read, pixels not decoded), refusing more than MAX_IMAGE_PIXELS / 2 pixels;
    the file is closed on exit (Pillow does not close a stream it was given), so load the pixels inside."""
    try:
        stream = _open(source)
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read the file ({exc.strerror or exc})") from None
    with stream, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Not closed with the stream: a loaded image no longer needs the file, and close() would free its pixels.
            image = Image.open(stream)
            if image.width < 1 or image.height < 1:
                raise ImageDecodeError("the image has no pixels")
            yield image
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError(
                f"DecompressionBombError: the image has more than {Image.MAX_IMAGE_PIXELS // 2} pixels "
                "(decompression-bomb guard)") from None
        except (OSError, ValueError, SyntaxError, ZeroDivisionError, IndexError, TypeError, EOFError) as exc:
            raise ImageDecodeError(f"{type(exc).__name__}: {str(exc)[:200]}") from None


def probe_image(path: str | Path) -> str | None:
    """None when the file is an image Pillow can open within the pixel bound (header only), else why not."""
    try:
        with _opened(path):
            return None
    except ImageDecodeError as exc:
        return f"not a readable image ({exc})"


def decode_image(source: str | Path | bytes, size_hint: int | None = None) -> Image.Image:
    """Open an image file or bytes as RGB, honouring EXIF orientation.

    16-bit greyscale is scaled to 8 bits (convert('RGB') would clip it white); palette and
    alpha images are converted (alpha dropped, as designer did); animated images use frame 0.
    `size_hint` lets JPEG decode at a reduced scale (draft mode): much faster for big photos.
    """
    with _opened(source) as image:
        if size_hint and image.format == "JPEG":
            image.draft("RGB", (size_hint, size_hint))
        image.load()  # decode now, while the file is open
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the decoded pixels
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float32)
            scale = 257.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 1.0
            return Image.fromarray((array / scale).clip(0, 255).astype(np.uint8)).convert("RGB")
        if image.mode == "P":
            return image.convert("RGBA").convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")


class _BoundedResize(v2.Transform):
    """Shorter side to `size`, longer side at most `max_side` (extreme aspect ratios shrink instead of
    making the long side enormous); never below one pixel."""

    def __init__(self, size: int, max_side: int):
        super().__init__()
        self.size, self.max_side = size, max_side

    def transform(self, inpt, params):
        if not isinstance(inpt, Image.Image):
            return inpt
        width, height = inpt.size
        scale = min(self.size / min(width, height), self.max_side / max(width, height))
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        return inpt if target == (width, height) else inpt.resize(target, Image.BILINEAR, reducing_gap=None)


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

    def __post_init__(self):
        # Scoring and the MLflow model build this from training_info.json: a tampered recipe (crop_fraction
        # 0.01, image_size 10**6) must fail here, not as a runaway resize.
        def check(name, value, ok, rule):
            if not ok:
                raise InvalidPreprocessingError(f"Preprocessing {name} {quote(value)} is invalid: {rule}.")

        size = self.image_size
        check("image_size", size, size is None or (isinstance(size, int) and not isinstance(size, bool)
                                                   and MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE),
              f"must be empty or an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}")
        fraction = self.crop_fraction
        check("crop_fraction", fraction, isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
              and 0.25 <= fraction <= 1, "must be a number from 0.25 to 1")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, list):
                values = tuple(values)
                setattr(self, name, values)
            check(name, values, isinstance(values, tuple) and len(values) == 3
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
                  and (name == "mean" or all(v > 0 for v in values)),
                  "must be three finite numbers" + (" > 0" if name == "std" else ""))
        check("augmentation", self.augmentation, self.augmentation in AUGMENTATIONS, f"must be one of {AUGMENTATIONS}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("_mean_std_cache")
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
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
            steps += [_BoundedResize(self.resize_size, MAX_RESIZE_ASPECT * self.resize_size),
                      v2.CenterCrop(self.image_size)]
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
