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
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageFile, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from .errors import InvalidPreprocessingError, quote
from .input_files import UnreadableInputError, open_input, read_input
from .limits import AUGMENTATIONS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

# Decompression bombs: `_opened` refuses more than MAX_IMAGE_PIXELS from the header, before decoding, so no
# image decodes to more than 89 million pixels (268 MB of RGB). Pillow's own guard stays as a backstop (it
# warns at its limit and refuses at twice it): set to ours, it can never let more through.
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# The largest image file read: an uncompressed 16-bit RGBA image at the pixel limit (716 MB) fits.
MAX_IMAGE_FILE_BYTES = 1 << 30
# Only raster formats are ever opened (Pillow would hand EPS bytes to Ghostscript, and tries dozens of
# formats on any file). A camera JPEG that Pillow calls MPO opens through JPEG.
RASTER_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
JPEG_FORMATS = ("JPEG", "MPO")  # what Pillow can decode at a reduced DCT scale (draft mode)
# The largest JPEG read whole into memory for torchvision's decoder (`_full_scale_jpeg`); Pillow streams bigger
# files and stops at the image's end, so trailing bytes cost no memory. Full-scale decodes are of images at most a
# few times the training size: real ones are far smaller.
FULL_SCALE_JPEG_MAX_BYTES = 32 << 20
# Rows converted at a time from 16-bit / 32-bit greyscale to 8 bits: no full-size temporary copy.
CONVERT_PIXELS_PER_CHUNK = 1 << 20
# The longest side a resize may produce, as a multiple of the resize size: a 65535x1 image would otherwise be
# resized to 110x7.2 million pixels. Longer sides are scaled down to fit (the crop pads what is missing).
MAX_RESIZE_ASPECT = 4
# The original accepted truncated files; keep that, the missing part decodes grey.
ImageFile.LOAD_TRUNCATED_IMAGES = True

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDecodeError(Exception):
    """A file is not a usable image; `data.py` decides whether to skip it."""


def read_image_file(path: str | Path, inside: str | Path | None) -> bytes:
    """An image file's bytes through the one input opener (inside `inside`, regular, at most
    MAX_IMAGE_FILE_BYTES), or ImageDecodeError with the reason every decode path reports."""
    try:
        return read_input(path, inside=inside, max_bytes=MAX_IMAGE_FILE_BYTES)
    except UnreadableInputError as exc:
        raise ImageDecodeError(exc.reason) from None


@contextlib.contextmanager
def opened_image(source: str | Path | bytes, inside: str | Path | None = None) -> Iterator[Image.Image]:
    """Pillow's lazy image (header read, pixels not decoded) of a file or of bytes: the one place the CPU and the
    GPU decode paths open images, so a bad file gets the same reason on both. A file goes through the input
    opener (`inside`, regular, bounded); only RASTER_FORMATS are tried; more than MAX_IMAGE_PIXELS by the
    header is refused before decoding. The file is closed on exit, so load the pixels inside."""
    if isinstance(source, (bytes, bytearray)):
        stream = io.BytesIO(source)
    else:
        try:
            stream = open_input(source, inside=inside, max_bytes=MAX_IMAGE_FILE_BYTES)
        except UnreadableInputError as exc:
            raise ImageDecodeError(exc.reason) from None
    with stream, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Not closed with the stream: a loaded image no longer needs the file, and close() would free its pixels.
            image = Image.open(stream, formats=RASTER_FORMATS)
            if image.width < 1 or image.height < 1:
                raise ImageDecodeError("the image has no pixels")
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError("too many pixels")
            yield image
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError(
                f"DecompressionBombError: the image has more than {MAX_IMAGE_PIXELS} pixels "
                "(decompression-bomb guard)") from None
        except Image.UnidentifiedImageError:
            raise ImageDecodeError("UnidentifiedImageError: cannot identify image file (formats read: "
                                   f"{', '.join(RASTER_FORMATS)})") from None
        except (OSError, ValueError, SyntaxError, ZeroDivisionError, IndexError, TypeError, EOFError,
                MemoryError) as exc:
            raise ImageDecodeError(f"{type(exc).__name__}: {str(exc)[:200]}") from None


def probe_image(path: str | Path, inside: str | Path | None = None) -> str | None:
    """None when the file is an image Pillow can open within the pixel bound (header only), else why not."""
    try:
        with opened_image(path, inside):
            return None
    except ImageDecodeError as exc:
        return f"not a readable image ({exc})"


def decode_image(source: str | Path | bytes, size_hint: int | None = None, *,
                 inside: str | Path | None = None) -> Image.Image:
    """Open an image file (inside the input folder `inside`, see `opened_image`) or bytes as RGB, honouring
    EXIF orientation.

    16-bit greyscale is scaled to 8 bits (convert('RGB') would clip it white); palette and
    alpha images are converted (alpha dropped, as designer did); animated images use frame 0.
    `size_hint` lets JPEG decode at a reduced scale (draft mode): much faster for big photos.
    """
    with opened_image(source, inside) as image:
        return _decoded_rgb(image, (size_hint, size_hint) if size_hint else None)


def _decoded_rgb(image: Image.Image, draft: tuple[int, int] | None) -> Image.Image:
    """An opened image decoded (a JPEG at the smallest DCT scale at least `draft` in size), oriented, RGB."""
    if draft and image.format in JPEG_FORMATS:
        image.draft("RGB", draft)
    image.load()  # decode now, while the file is open
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the decoded pixels
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _to_8_bits(image).convert("RGB")
    if image.mode == "P":
        return image.convert("RGBA").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) from the header; 1 when absent or invalid."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if value in range(1, 9) else 1


def _to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) greyscale -> 8-bit "L", in strips of rows: memory is the output plus one
    strip, never a full-size float copy. 16-bit values are divided by 257 (65535 -> 255); 32-bit values too
    when any exceeds 255, else taken as they are."""
    width, height = image.size
    rows = max(1, CONVERT_PIXELS_PER_CHUNK // width)
    strips = [(top, min(height, top + rows)) for top in range(0, height, rows)]
    scale = 257
    if not image.mode.startswith("I;16"):
        low, high = image.getextrema()
        scale = 257 if high > 255 else 1
    out = np.empty((height, width), dtype=np.uint8)
    for top, bottom in strips:
        strip = np.asarray(image.crop((0, top, width, bottom)))
        if strip.dtype.byteorder not in ("=", "|"):
            strip = strip.astype(strip.dtype.newbyteorder("="))
        np.clip(strip // scale if scale != 1 else strip, 0, 255, out=out[top:bottom], casting="unsafe")
    return Image.fromarray(out)


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


DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg can apply while decoding (Pillow's draft mode)


def _pixels(image: Image.Image) -> torch.Tensor:
    """A decoded RGB PIL image as a uint8 batch of one, NCHW seen, NHWC in memory: channels_last."""
    with warnings.catch_warnings():  # read-only memory, never written to (resized into new memory)
        warnings.simplefilter("ignore", UserWarning)
        # (The batch dimension added first: its stride then says channels_last to torch's kernels.)
        return torch.from_numpy(np.asarray(image))[None].permute(0, 3, 1, 2)


class RandomCropFlip:
    """The training augmentation in one pass, file -> uint8 CHW: torchvision's RandomResizedCrop (scale 0.5-1,
    bilinear, antialiased) and RandomHorizontalFlip.

    The crop is drawn on the header's (EXIF-oriented) size before any pixel is decoded, so a JPEG decodes at
    the smallest DCT scale (1/8-1) that still leaves the crop at least `size` pixels a side (draft mode: a 6 MP
    photo at 1/4), then crop + resize run as one call of torch's uint8 antialiased kernel (a quarter of
    Pillow's time) and the flip on the small result. The output is a view of HWC memory: data.collate stacks
    such images into an NHWC batch, which seen as NCHW is already channels_last.

    Draws from torch's global RNG (data.py seeds it per sample), as torchvision's transforms do, in their order:
    the crop, then the flip."""

    def __init__(self, size: int, flip: bool, scale: tuple[float, float] = (0.5, 1.0)):
        self.size, self.flip = size, flip
        self.crop = v2.RandomResizedCrop(size, scale=scale, antialias=True)

    def params(self, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """The sample's crop (top, left, height, width) on an image of this size, and whether it is flipped."""
        # torchvision reads only the stand-in's shape.
        box = self.crop.make_params([torch.empty(1, 1, 1).expand(3, height, width)])
        flip = self.flip and bool(torch.rand(1) < 0.5)
        return (box["top"], box["left"], box["height"], box["width"]), flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A decoded RGB PIL image -> augmented uint8 CHW."""
        box, flip = self.params(image.height, image.width)
        return self._crop_resize(image, box, (image.height, image.width), flip)

    def load(self, source: str | Path | bytes, size_hint: int | None, inside: str | Path | None = None) -> torch.Tensor:
        """A file (inside `inside`, see `opened_image`) or its bytes -> augmented uint8 CHW. `size_hint` None:
        JPEGs decode at full scale."""
        with opened_image(source, inside) as image:
            if image.format not in JPEG_FORMATS:  # no DCT scale to choose; orientation may be known once decoded
                return self(_decoded_rgb(image, None))
            orientation = exif_orientation(image)
            width, height = image.size if orientation < 5 else image.size[::-1]
            box, flip = self.params(height, width)
            reduce = self.dct_scale(box) if size_hint else 1
            if reduce == 1 and orientation == 1 and image.format == "JPEG" and image.mode in ("RGB", "L"):
                pixels = _full_scale_jpeg(image)
                if pixels is not None:
                    top, left, h, w = box
                    return self._resize(pixels[:, :, top:top + h, left:left + w], flip)
            draft = (max(1, image.width // reduce), max(1, image.height // reduce)) if reduce > 1 else None
            decoded = _decoded_rgb(image, draft)
        return self._crop_resize(decoded, box, (height, width), flip)

    def dct_scale(self, box: tuple[int, int, int, int]) -> int:
        """The reduction (8, 4, 2 or 1) a JPEG decodes at for the crop `box`: the largest that still leaves the crop
        at least `size` pixels a side, so no crop is upsampled from a draft."""
        return next(s for s in DCT_SCALES if s == 1 or min(box[2], box[3]) >= s * self.size)

    def _crop_resize(self, image: Image.Image, box: tuple[int, int, int, int], full: tuple[int, int],
                     flip: bool) -> torch.Tensor:
        """`box` (on an image of size `full`) of `image` (the same image, maybe DCT-scaled) -> size x size."""
        ry, rx = image.height / full[0], image.width / full[1]
        top, left = min(image.height - 1, round(box[0] * ry)), min(image.width - 1, round(box[1] * rx))
        height = max(1, min(image.height - top, round(box[2] * ry)))
        width = max(1, min(image.width - left, round(box[3] * rx)))
        # Pillow copies the crop out (cheap) and hands it over as HWC.
        return self._resize(_pixels(image.crop((left, top, left + width, top + height))), flip)

    def _resize(self, crop: torch.Tensor, flip: bool) -> torch.Tensor:
        """A uint8 NCHW crop -> size x size CHW, flipped or not. Made channels_last contiguous first: the layout of
        torch's vectorised uint8 antialiased kernel (on a strided view it is 1.4x slower than the copy + resize)."""
        crop = crop.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return out[0].flip(-1) if flip else out[0]


def _full_scale_jpeg(image: Image.Image) -> torch.Tensor | None:
    """An opened JPEG (header read by Pillow) decoded by torchvision's libjpeg-turbo as a uint8 batch of one, NCHW
    seen, NHWC in memory. The same pixels as Pillow's decode (both the accurate integer IDCT and fancy chroma
    upsampling; tests/test_augmentation.py compares them), 15 % faster on an ImageNet-size file and handed over
    without Pillow's copy out to numpy. torchvision has no DCT scaling, so only full-scale decodes come here.
    None when torchvision refuses the file (a truncated one, say): Pillow then decodes it as it always did."""
    stream = image.fp
    stream.seek(0, os.SEEK_END)
    if stream.tell() > FULL_SCALE_JPEG_MAX_BYTES:
        return None
    data = bytearray(stream.tell())
    stream.seek(0)
    if stream.readinto(data) != len(data):
        return None
    try:
        with warnings.catch_warnings():  # torchcodec supersedes it (torchvision 0.29); no DCT scaling there either
            warnings.simplefilter("ignore", DeprecationWarning)
            pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    return pixels[None]  # CHW over HWC memory: with the batch dimension, channels_last


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

    # Evaluation resizes the PIL image (Pillow's BILINEAR, reducing_gap None): the exact resize that export_info
    # states and serving repeats, so it stays as it is. Training crops and resizes in RandomCropFlip.

    def eval_transform(self) -> v2.Transform:
        """PIL RGB -> uint8 CHW tensor, deterministic."""
        steps = []
        if self.image_size is not None:
            steps += [_BoundedResize(self.resize_size, MAX_RESIZE_ASPECT * self.resize_size),
                      v2.CenterCrop(self.image_size)]
        return v2.Compose(steps + [v2.PILToTensor()])

    def train_transform(self) -> RandomCropFlip | v2.Transform:
        """Light augmentation for training (random-resized crop, flip); uses torch's global RNG (seeded per sample
        by data.py). Its `load` takes a file, to decode JPEGs at the scale the crop needs."""
        if self.image_size is None or self.augmentation == "none":
            return self.eval_transform()
        return RandomCropFlip(self.image_size, flip=self.augmentation == "flip_crop")

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW batch -> normalised float batch, on the batch's device."""
        key = (batch.device, torch.float32)
        if key not in self._mean_std_cache:
            mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1) * 255
            std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1) * 255
            self._mean_std_cache[key] = (mean, std)
        mean, std = self._mean_std_cache[key]
        return (batch.float() - mean) / std
