"""`--decode gpu`: JPEGs decoded on the training device (nvJPEG through torchvision), cropped and resized there.

The DataLoader workers do only what is cheap: read the file's bytes, read its size and EXIF orientation from
the header (no decode), and draw the sample's random-resized-crop box and flip bit from the same per-sample
generator as the CPU path (`RandomCropFlip.params` on the full-size oriented image), so both paths crop the
same part of every image. A batch travels as O(1) tensors whatever its size (the JPEGs' bytes packed end to
end, the rows the workers decoded, the targets): one shared-memory handle each, not one per image.
`GpuBatch.to_device` then decodes the JPEGs in batched calls on the device and crops, resizes (antialiased) and
flips each image there. On a CPU device the very same code runs with torchvision's CPU decoder, which is how it
is tested.

Stream safety (pytorch/vision#9606): torchvision's CUDA `decode_jpeg` allocates its outputs on the caller's
current stream but decodes on a stream of its own without waiting, and nvJPEG's hardware engine does not honour
stream order anyway; the caching allocator hands a block freed on a stream to that stream's next allocation at
once. Called on the training stream, the decoder could be handed memory that queued training kernels still
read. So decoding and cropping run on a side stream of their own: the decoder's outputs come from that stream's
blocks only; the side stream is drained (a host wait on it, never on the training stream) before each decode call,
so no queued crop still reads a block the decoder may be handed; the training stream waits for the side stream
before it reads the batch, and `record_stream` keeps the batch's memory from the side stream until the training
kernels that read it have run. benchmarks/nvjpeg_hazard.py reproduces the hazard and checks this path.

Everything that is not a plain RGB or greyscale JPEG (PNG, CMYK, 16-bit, palette ...) goes through the CPU path
in the worker unchanged (`data.ImageDataset`), arriving decoded and final; a batch mixes both kinds. A JPEG that
the device decoder refuses is decoded by PIL in the main process instead (as the CPU path would decode it), with a
warning the first time and a count (`DeviceDecoder.fallbacks`, logged as the `decode_fallbacks` metric): a broken
decoder must not just look slow. A refused batched call is split in halves to find the refused files, at most
log2(n) + 2 failed calls per chunk; past that the chunk's remaining JPEGs go to PIL without more device calls.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from .data import ImageDataset, build_dataset, decoded_item, sample_seed, stack_targets
from .data import collate as data_collate
from .errors import InvalidDatasetError
from .image_directory import ImageDirectory
from .preprocessing import (
    MAX_RESIZE_ASPECT,
    ImageDecodeError,
    Preprocessing,
    decode_image,
    exif_orientation,
    opened_image,
    read_image_file,
)

log = logging.getLogger(__name__)

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


def _header(path, inside=None) -> tuple[bytes, Image.Image, tuple[int, int]]:
    """The file's bytes and its lazily opened image (format, mode, size known; nothing decoded), read,
    bounded and classified by the CPU path's own opener (`preprocessing.opened_image`): a bad file gets the
    same reason on both paths."""
    data = read_image_file(path, inside)
    with opened_image(data) as image:
        full = image.size
    return data, image, full


class GpuDecodeDataset(torch.utils.data.Dataset):
    """Row (or (row, epoch)) -> (payload, Plan | None, target, row, failure).

    payload: the JPEG's bytes with its Plan, or a final uint8 image from the CPU path with Plan None, or None
    with the failure's reason."""

    def __init__(self, cpu: ImageDataset, preprocessing: Preprocessing, train: bool):
        self.cpu, self.preprocessing = cpu, preprocessing
        self.augment = train and preprocessing.augmentation != "none"

    def __len__(self) -> int:
        return len(self.cpu)

    @staticmethod
    def collate(items) -> GpuBatch:  # data.make_loader's collate_fn for this dataset
        return collate(items)

    @property
    def targets(self):
        return self.cpu.targets

    @property
    def size_hint(self) -> int | None:
        return self.cpu.size_hint

    @property
    def item_bytes(self) -> int:
        """What one row costs in flight (data.make_loader sizes its prefetch from it): the JPEG files' mean size
        (a sample of up to 256 rows), a decoded image for any other file."""
        decoded = self.cpu.item_bytes
        rows = range(0, len(self), max(1, len(self) // 256))
        sizes = []
        for row in rows:
            path = self.cpu.directory.path(row)
            try:
                is_jpeg = os.path.splitext(path)[1].lower() in (".jpg", ".jpeg")
                sizes.append(os.stat(path).st_size if is_jpeg else decoded)
            except OSError:
                sizes.append(decoded)
        return max(1, round(sum(sizes) / max(1, len(sizes))))

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        target = self.cpu.targets[index]
        path = self.cpu.directory.path(index)
        try:
            data, image, full = _header(path, self.cpu.real_root)
        except ImageDecodeError as exc:
            return None, None, target, index, str(exc)
        if self.preprocessing.image_size is None or image.format != "JPEG" or image.mode not in DEVICE_JPEG_MODES:
            # The CPU path on the bytes read already: the file is not opened twice.
            decoded, target, index, failure = decoded_item(self.cpu, data, target, index, epoch)
            return decoded, None, target, index, failure
        return data, self._plan(image, full, epoch, index), target, index, None

    def _plan(self, image: Image.Image, full: tuple[int, int], epoch: int, index: int) -> Plan:
        orientation = exif_orientation(image)
        width, height = full if orientation < 5 else full[::-1]
        box, flip = None, False
        if self.augment:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.cpu.seed, epoch, index))
                # The CPU path's own draws (RandomCropFlip.params) on the same full-size oriented image.
                box, flip = self.cpu.transform.params(height, width)
        return Plan(orientation, height, width, box, flip, self.preprocessing.image_size,
                    self.preprocessing.resize_size)


@dataclass
class GpuBatch:
    """A batch for the device decoder, in three tensors whatever its size: the JPEGs' bytes end to end, the rows
    the workers decoded (not plain JPEGs), the targets. Rows: the JPEGs first, then the decoded rows.
    `to_device` moves the rows that fail to decode from `targets`/`rows` to `failures`."""

    jpegs: torch.Tensor  # uint8 1-D
    offsets: list[int]  # JPEG i is jpegs[offsets[i]:offsets[i + 1]]
    plans: list[Plan]  # one per JPEG
    decoded: torch.Tensor  # uint8 NCHW, final (data.collate's layout)
    targets: torch.Tensor  # int64 N, or float N x classes (multi-label)
    rows: list[int]
    failures: list[tuple[int, str]]

    def pin_memory(self) -> GpuBatch:
        # The JPEG bytes are read by the decoder on the host; what is copied to the device as it is gets pinned.
        return GpuBatch(self.jpegs, self.offsets, self.plans, self.decoded.pin_memory(), self.targets.pin_memory(),
                        self.rows, self.failures)

    def __len__(self) -> int:
        return len(self.targets)

    def jpeg(self, i: int) -> torch.Tensor:
        return self.jpegs[self.offsets[i]:self.offsets[i + 1]]

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's uint8 NCHW images, decoded on `device`, and their targets there (data.Batch's interface).
        Read `targets`, `rows` and `failures` after this call: rows that cannot be decoded have left them."""
        return decoder_for(device).decode(self)


def collate(items) -> GpuBatch:
    jpegs = [item for item in items if item[1] is not None]
    others = [(item[0], item[2], item[3], item[4]) for item in items if item[1] is None]
    decoded = data_collate(others)  # the workers' own batch of the rows they decoded (and every failure)
    offsets = [0, *itertools.accumulate(len(item[0]) for item in jpegs)]
    packed = _empty_shared(offsets[-1])
    view = packed.numpy()
    for item, start, end in zip(jpegs, offsets, offsets[1:]):
        view[start:end] = np.frombuffer(item[0], dtype=np.uint8)
    # The JPEGs' targets, then the CPU-decoded rows' (int64 classes, or float multi-hot rows).
    targets = stack_targets([item[2] for item in jpegs] + [item[1] for item in others if item[0] is not None])
    return GpuBatch(packed, offsets, [item[1] for item in jpegs], decoded.images,
                    targets,
                    [item[3] for item in jpegs] + [item[2] for item in others if item[0] is not None],
                    decoded.failures)


def _empty_shared(numel: int) -> torch.Tensor:
    """An uninitialised uint8 tensor, in shared memory inside a DataLoader worker (as default_collate does):
    written once there, it crosses to the main process without another copy."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(numel, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(numel)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (numel,))


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


class DeviceDecoder:
    """Decodes GpuBatches on one device, on a side stream of its own (CUDA); counts the JPEGs that the device
    decoder refused and PIL decoded instead (`fallbacks`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.fallbacks = 0
        self._warned = False
        self._refusal: Exception | None = None  # the device decoder's last error

    def decode(self, batch: GpuBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:
            images = self._decode(batch)
        else:
            with torch.cuda.stream(self.stream):
                images = self._decode(batch)
            caller = torch.cuda.current_stream(self.device)
            caller.wait_stream(self.stream)  # the batch is read on the caller's stream once it is written
            images.record_stream(caller)  # its memory is not the side stream's again before the caller's reads
        return images, batch.targets.to(self.device, non_blocking=True)

    def _decode(self, batch: GpuBatch) -> torch.Tensor:
        """The batch's images on the current stream, rows that cannot be decoded left out of the batch."""
        out: list[torch.Tensor | str] = []
        start = 0
        while start < len(batch.plans):  # chunks of at most DECODE_PIXELS_PER_CHUNK decoded pixels
            end, pixels = start, 0
            while end < len(batch.plans) and (end == start or pixels + _pixels(batch.plans[end])
                                              <= DECODE_PIXELS_PER_CHUNK):
                pixels += _pixels(batch.plans[end])
                end += 1
            # Failed device calls allowed for this chunk: enough to find one refused file by halves.
            budget = [math.ceil(math.log2(end - start)) + 2]
            out += self._decode_jpegs([batch.jpeg(i) for i in range(start, end)], batch.plans[start:end], budget)
            start = end
        bad = [i for i, image in enumerate(out) if isinstance(image, str)]
        if bad:
            batch.failures = batch.failures + [(batch.rows[i], out[i]) for i in bad]
            keep = [i for i in range(len(batch.rows)) if i not in set(bad)]
            batch.targets, batch.rows = batch.targets[keep], [batch.rows[i] for i in keep]
            out = [image for image in out if not isinstance(image, str)]
        if len(batch.decoded):
            out += list(batch.decoded.to(self.device, non_blocking=True))
        if not out:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        shapes = {tuple(image.shape) for image in out}
        if len(shapes) > 1:
            raise InvalidDatasetError(
                f"images in one batch have different sizes {sorted(shapes)[:3]}; set --image-size to resize them."
            )
        return torch.stack(out)

    def _decode_jpegs(self, datas: list[torch.Tensor], plans: list[Plan], budget: list[int]) -> list:
        """Each JPEG transformed to its plan on the device, or the reason it cannot be decoded."""
        if self.stream is not None:
            # The device decoder may write into any block this stream freed, whatever is queued on it: let the
            # crops queued here (reading the last call's outputs) finish first. The training stream runs on.
            self.stream.synchronize()
        if budget[0] <= 0:  # many refusals: a decoder that refuses everything must not cost a call per image
            return [self._on_host(data, plan, self._refusal) for data, plan in zip(datas, plans)]
        try:
            decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            budget[0] -= 1
            self._refusal = exc
            if len(datas) > 1 and budget[0] > 0:  # one refused file fails the whole call: find it by halves
                half = len(datas) // 2
                return (self._decode_jpegs(datas[:half], plans[:half], budget)
                        + self._decode_jpegs(datas[half:], plans[half:], budget))
            return [self._on_host(data, plan, exc) for data, plan in zip(datas, plans)]
        return [_crop_resize(orient(image, plan.orientation), plan) for image, plan in zip(decoded, plans)]

    def _on_host(self, data: torch.Tensor, plan: Plan, refusal: Exception) -> torch.Tensor | str:
        try:
            image = _decode_on_host(data, plan).to(self.device)
        except ImageDecodeError as exc:
            return str(exc)
        self.fallbacks += 1
        if not self._warned:
            self._warned = True
            log.warning("The %s JPEG decoder refused an image that PIL decodes (%s): such images are decoded by PIL "
                        "on the CPU, one at a time in the training process (slow). Their count is logged as the "
                        "decode_fallbacks metric; --decode cpu decodes everything in the worker processes.",
                        self.device.type, " ".join(str(refusal).split())[:200])
        return image


_decoders: dict[torch.device, DeviceDecoder] = {}


def decoder_for(device: torch.device | str) -> DeviceDecoder:
    """The process's decoder for `device` (one side stream and one fallback count per device)."""
    device = torch.device(device)
    if device not in _decoders:
        _decoders[device] = DeviceDecoder(device)
    return _decoders[device]


def decode_batch(batch: GpuBatch, device: torch.device) -> torch.Tensor:
    """The batch's images as one uint8 NCHW tensor on `device` (`GpuBatch.to_device` without the targets)."""
    return batch.to_device(device)[0]


def _pixels(plan: Plan) -> int:
    return plan.height * plan.width


def build_gpu_dataset(directory: ImageDirectory, class_index: dict[str, int], preprocessing: Preprocessing,
                      *, train: bool, seed: int) -> GpuDecodeDataset:
    """data.build_dataset's dataset for `--decode gpu` (same rows, targets and per-sample randomness)."""
    cpu = build_dataset(directory, class_index, preprocessing, train=train, seed=seed)
    return GpuDecodeDataset(cpu, preprocessing, train)
