"""`--decode gpu`: JPEGs decoded on the training device (nvJPEG through torchvision), cropped and resized there.

The DataLoader workers do only what is cheap: read the file's bytes, read its size and EXIF orientation from
the header (no decode), and draw the sample's random-resized-crop box and flip bit from the same per-sample
generator, on the same (JPEG draft-scaled, oriented) size as the CPU path, so both paths crop the same part of
every image. `decode_batch` then decodes the batch's JPEGs in one batched call on the device and crops, resizes
(antialiased) and flips each image there. On a CPU device the very same code runs with torchvision's CPU
decoder, which is how it is tested.

Everything that is not a plain RGB or greyscale JPEG (PNG, CMYK, 16-bit, palette ...) goes through the CPU path
in the worker unchanged (`data.ImageDataset`), arriving decoded and final; a batch mixes both kinds. A JPEG that
the device decoder refuses (e.g. truncated) is decoded by PIL in the main process instead, as the CPU path would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .data import ImageDataset, build_dataset, sample_seed
from .errors import InvalidDatasetError
from .image_directory import ImageDirectory
from .preprocessing import (
    MAX_RESIZE_ASPECT,
    ImageDecodeError,
    Preprocessing,
    decode_image,
    opened_image,
    read_image_file,
)

# Decoded pixels held on the device at once while a batch is decoded: 256 ImageNet images take ~50 M, 256
# 12-megapixel photos would take 3 G (9 GB of uint8), so big photos are decoded in chunks of this many pixels.
DECODE_PIXELS_PER_CHUNK = 256 * 2**20
DEVICE_JPEG_MODES = ("RGB", "L")  # what nvJPEG decodes like PIL does; CMYK/YCCK and others go the CPU path


@dataclass(frozen=True)
class Plan:
    """What the device does to one decoded JPEG, in full-resolution, EXIF-oriented pixel coordinates."""

    orientation: int  # EXIF orientation 1-8
    height: int  # of the oriented full-resolution image
    width: int
    box: tuple[int, int, int, int] | None  # (top, left, height, width) to crop and resize to `size`; None: eval
    flip: bool
    size: int  # output side
    resize_size: int  # eval: shorter side before the centre crop


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a CHW tensor, as PIL's ImageOps.exif_transpose does."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-1, -2)
    if orientation in (2, 3, 6, 7):
        image = image.flip(-1)
    if orientation in (3, 4, 7, 8):
        image = image.flip(-2)
    return image


def _header(path, size_hint: int | None, inside=None) -> tuple[bytes, Image.Image, tuple[int, int]]:
    """The file's bytes and its lazily opened image (format, mode, draft size known; nothing decoded), read,
    bounded and classified by the CPU path's own opener (`preprocessing.opened_image`): a bad file gets the
    same reason on both paths."""
    data = read_image_file(path, inside)
    with opened_image(data) as image:
        full = image.size
        if size_hint and image.format == "JPEG" and image.mode in DEVICE_JPEG_MODES:
            image.draft("RGB", (size_hint, size_hint))  # the CPU path's decode scale, for its crop box
    return data, image, full


class GpuDecodeDataset(torch.utils.data.Dataset):
    """Row (or (row, epoch)) -> (payload, Plan | None, target, row, failure).

    payload: the JPEG's bytes (uint8, 1-D) with its Plan, or a final uint8 CHW image from the CPU path with
    Plan None, or None with the failure's reason."""

    def __init__(self, cpu: ImageDataset, preprocessing: Preprocessing, train: bool):
        self.cpu, self.preprocessing = cpu, preprocessing
        self.crop = v2.RandomResizedCrop(preprocessing.image_size or 1, scale=(0.5, 1.0))
        self.augment = train and preprocessing.augmentation != "none"
        self.flip = train and preprocessing.augmentation == "flip_crop"

    def __len__(self) -> int:
        return len(self.cpu)

    @staticmethod
    def collate(items) -> GpuBatch:  # data.make_loader's collate_fn for this dataset
        return collate(items)

    @property
    def targets(self):
        return self.cpu.targets

    @property
    def size_hint(self) -> int | None:  # data.make_loader sizes its prefetch from it
        return self.cpu.size_hint

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        target = self.cpu.targets[index]
        path = self.cpu.directory.path(index)
        try:
            data, image, full = _header(path, self.cpu.size_hint, self.cpu.real_root)
        except ImageDecodeError as exc:
            return None, None, target, index, str(exc)
        if self.preprocessing.image_size is None or image.format != "JPEG" or image.mode not in DEVICE_JPEG_MODES:
            decoded, target, index, failure = self.cpu[key]
            return decoded, None, target, index, failure
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return encoded, self._plan(image, full, epoch, index), target, index, None

    def _plan(self, image: Image.Image, full: tuple[int, int], epoch: int, index: int) -> Plan:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        orientation = orientation if orientation in range(1, 9) else 1
        (width, height), (draft_w, draft_h) = full, image.size
        if orientation >= 5:
            width, height, draft_w, draft_h = height, width, draft_h, draft_w
        size = self.preprocessing.image_size
        box, flip = None, False
        if self.augment:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.cpu.seed, epoch, index))
                # The CPU path's draws, in its order, on the size it crops (JPEG draft scale): only the
                # shape of the stand-in is read.
                params = self.crop.make_params([torch.empty(1, 1, 1).expand(3, draft_h, draft_w)])
                flip = self.flip and bool(torch.rand(1) < 0.5)
            sy, sx = height / draft_h, width / draft_w
            top, left = round(params["top"] * sy), round(params["left"] * sx)
            box = (top, left, min(height - top, max(1, round(params["height"] * sy))),
                   min(width - left, max(1, round(params["width"] * sx))))
        return Plan(orientation, height, width, box, flip, size, self.preprocessing.resize_size)


@dataclass
class GpuBatch:
    """Like data.Batch, with `.images` a list of payloads (JPEG bytes or final CPU-decoded images) for
    `decode_batch`. Rows the device cannot decode are moved from `targets` to `failures` by `decode_batch`."""

    images: list[torch.Tensor]
    plans: list[Plan | None]
    targets: torch.Tensor  # int64 N
    failures: list[tuple[int, str]]
    rows: list[int]

    def pin_memory(self) -> GpuBatch:
        # The JPEG bytes are read by the decoder on the host; only the targets go to the device as they are.
        return GpuBatch(self.images, self.plans, self.targets.pin_memory(), self.failures, self.rows)

    def __len__(self) -> int:
        return len(self.targets)


def collate(items) -> GpuBatch:
    good = [item for item in items if item[0] is not None]
    failures = [(item[3], item[4]) for item in items if item[0] is None]
    return GpuBatch([item[0] for item in good], [item[1] for item in good],
                    torch.tensor([item[2] for item in good], dtype=torch.int64), failures, [item[3] for item in good])


def _crop_resize(image: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Oriented CHW uint8 -> the plan's size x size uint8, on the image's device."""
    if plan.box is None:  # eval: the CPU path's bounded Resize(shorter side) + CenterCrop, same rounding
        height, width = image.shape[-2:]
        scale = min(plan.resize_size / min(height, width), MAX_RESIZE_ASPECT * plan.resize_size / max(height, width))
        image = TF.resize(image, [max(1, round(height * scale)), max(1, round(width * scale))], antialias=True)
        return TF.center_crop(image, [plan.size, plan.size])
    top, left, height, width = plan.box
    image = TF.resized_crop(image, top, left, height, width, [plan.size, plan.size], antialias=True)
    return TF.horizontal_flip(image) if plan.flip else image


def _decode_on_host(data: torch.Tensor, plan: Plan) -> torch.Tensor:
    """A JPEG the device decoder refused: PIL (which accepts truncated files, orients), then the same crop."""
    image = torch.from_numpy(np.array(decode_image(data.numpy().tobytes()))).permute(2, 0, 1)
    if tuple(image.shape[1:]) != (plan.height, plan.width):
        raise ImageDecodeError(f"decoded as {image.shape[2]}x{image.shape[1]}, its header says "
                               f"{plan.width}x{plan.height}")
    return _crop_resize(image, plan)


def _decode_jpegs(datas: list[torch.Tensor], plans: list[Plan], device: torch.device) -> list[torch.Tensor | str]:
    """Each JPEG transformed to its plan on `device`, or the reason it cannot be decoded."""
    try:
        decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        return [_crop_resize(orient(image, plan.orientation), plan) for image, plan in zip(decoded, plans)]
    except RuntimeError:
        if len(datas) > 1:  # one bad file fails the whole call: find it
            return [out for d, p in zip(datas, plans) for out in _decode_jpegs([d], [p], device)]
    try:
        return [_decode_on_host(datas[0], plans[0]).to(device)]
    except ImageDecodeError as exc:
        return [str(exc)]


def decode_batch(batch: GpuBatch, device: torch.device) -> torch.Tensor:
    """The batch's images as one uint8 NCHW tensor on `device`, in row order.

    JPEGs are decoded together (chunks of at most DECODE_PIXELS_PER_CHUNK pixels); CPU-decoded rows are copied.
    A row that cannot be decoded is left out: its target removed and (row, reason) added to `batch.failures`,
    so read `batch.targets` and `batch.failures` after this call."""
    device = torch.device(device)
    out: list[torch.Tensor | str | None] = [None] * len(batch.images)
    jpegs = [i for i, plan in enumerate(batch.plans) if plan is not None]
    start = 0
    while start < len(jpegs):
        end, pixels = start, 0
        while end < len(jpegs) and (end == start or pixels + _pixels(batch.plans[jpegs[end]])
                                    <= DECODE_PIXELS_PER_CHUNK):
            pixels += _pixels(batch.plans[jpegs[end]])
            end += 1
        chunk = jpegs[start:end]
        for i, result in zip(chunk, _decode_jpegs([batch.images[i] for i in chunk],
                                                  [batch.plans[i] for i in chunk], device)):
            out[i] = result
        start = end
    for i, plan in enumerate(batch.plans):
        if plan is None:
            out[i] = batch.images[i].to(device, non_blocking=True)
    bad = [i for i, image in enumerate(out) if isinstance(image, str)]
    if bad:
        batch.failures = batch.failures + [(batch.rows[i], out[i]) for i in bad]
        keep = [i for i in range(len(out)) if i not in set(bad)]
        batch.targets, batch.rows = batch.targets[keep], [batch.rows[i] for i in keep]
        batch.images, batch.plans = [batch.images[i] for i in keep], [batch.plans[i] for i in keep]
        out = [out[i] for i in keep]
    if not out:
        return torch.empty(0, dtype=torch.uint8, device=device)
    shapes = {tuple(image.shape) for image in out}
    if len(shapes) > 1:
        raise InvalidDatasetError(
            f"images in one batch have different sizes {sorted(shapes)[:3]}; set --image-size to resize them."
        )
    return torch.stack(out)


def _pixels(plan: Plan) -> int:
    return plan.height * plan.width


def build_gpu_dataset(directory: ImageDirectory, class_index: dict[str, int], preprocessing: Preprocessing,
                      *, train: bool, seed: int) -> GpuDecodeDataset:
    """data.build_dataset's dataset for `--decode gpu` (same rows, targets and per-sample randomness)."""
    cpu = build_dataset(directory, class_index, preprocessing, train=train, seed=seed)
    return GpuDecodeDataset(cpu, preprocessing, train)

