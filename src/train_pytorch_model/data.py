"""Datasets and DataLoaders: files on disk -> decoded, resized uint8 batches.

- Decoding and resizing run in DataLoader worker processes; the main process only moves
  uint8 batches to the device (pinned memory, non-blocking) where they are normalised.
- Augmentation randomness is a pure function of (seed, epoch, row): the same seed gives the
  same batches whatever the worker count, and a resumed run continues bit-identically.
  (Parquet shards are read in streams, one per worker: their batches depend on the worker
  count too; shard_data.py.)
- A file that cannot be read is skipped with a warning naming it; too many bad files stop the
  run with InvalidDatasetError instead of a crash deep inside a worker.
"""

from __future__ import annotations

import logging
import os
from array import array
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from .errors import InvalidDatasetError
from .image_directory import ImageDirectory
from .preprocessing import ImageDecodeError, Preprocessing, decode_image

log = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of row `index`'s augmentation in `epoch`: the same crops whatever the worker count or resume.
    Kept to the 64 bits a torch generator takes, for every seed up to 2^63-1 (smaller values are unchanged)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**64


class ImageDataset(Dataset):
    """Row i -> (uint8 CHW image or None, class index, i, error or None)."""

    def __init__(self, directory: ImageDirectory, targets: array, transform, size_hint: int | None, seed: int):
        self.directory, self.targets, self.transform = directory, targets, transform
        self.size_hint, self.seed = size_hint, seed
        self.real_root = os.path.realpath(directory.root)

    def __len__(self) -> int:
        return len(self.directory)

    @property
    def item_bytes(self) -> int:
        """What one row costs in flight from a worker (make_loader sizes its prefetch from it): a decoded image."""
        return 3 * (self.size_hint or 224) ** 2

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        target = self.targets[index]
        if self.directory.shards is not None:  # one row on its own (a few samples); batches come from shard_data
            try:
                source, inside = self.directory.image_source(index), None
            except ImageDecodeError as exc:
                return None, target, index, str(exc)
        else:
            source, inside = self.directory.path(index), self.real_root
        return decoded_item(self, source, target, index, epoch, inside)


def decoded_item(dataset: ImageDataset, source, target: int, index: int, epoch: int, inside=None) -> tuple:
    """(uint8 CHW image or None, target, row, error or None) for an image file (opened through the input opener,
    which refuses links out of `inside`) or encoded bytes (a shard row)."""
    try:
        load = getattr(dataset.transform, "load", None)  # the training transform opens the image itself
        image = None if load else decode_image(source, dataset.size_hint, inside=inside)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (the transforms draw from it): torch.manual_seed would also seed
            # every accelerator backend, 0.1 ms per image.
            torch.default_generator.manual_seed(sample_seed(dataset.seed, epoch, index))
            pixels = load(source, dataset.size_hint, inside=inside) if load else dataset.transform(image)
        return pixels, target, index, None
    except ImageDecodeError as exc:
        return None, target, index, str(exc)
    except FileNotFoundError:
        return None, target, index, "file not found"
    except OSError as exc:
        return None, target, index, f"cannot read the file ({exc.strerror or exc})"


@dataclass
class Batch:
    images: torch.Tensor  # uint8 NCHW (channels_last from data.collate)
    targets: torch.Tensor  # int64 N, or float N x classes (multi-label)
    failures: list[tuple[int, str]]  # (row, reason) of rows left out of this batch

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.failures)

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images and the targets on `device` (non-blocking from pinned memory); gpu_decode.GpuBatch
        has the same method, so the training loop moves either kind alike."""
        return self.images.to(device, non_blocking=True), self.targets.to(device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.targets)


def collate(items) -> Batch:
    """One uint8 NCHW batch, written once: in a worker, straight into the shared memory that carries it to the
    training process (default_collate's stack). Images that are views of HWC memory (both transforms' are)
    stack into NHWC, which seen as NCHW is channels_last: no transposing copy anywhere."""
    good = [item for item in items if item[0] is not None]
    failures = [(item[2], item[3]) for item in items if item[0] is None]
    if not good:
        return Batch(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), failures)
    images = [item[0] for item in good]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise InvalidDatasetError(
            f"images in one batch have different sizes {sorted(shapes)[:3]}; set --image-size to resize them."
        )
    if all(image.permute(1, 2, 0).is_contiguous() for image in images):
        stacked = default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    else:
        stacked = default_collate(images)
    return Batch(stacked, stack_targets([item[1] for item in good]), failures)


class EpochTaggedSampler(Sampler):
    """Wraps a sampler so each index travels with the current epoch (for per-sample seeding)."""

    def __init__(self, inner: Sampler):
        self.inner, self.epoch = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((index, epoch) for index in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class ShardSampler(Sampler):
    """Rows rank, rank+W, rank+2W, ...: every row exactly once over all ranks (no padding), for exact validation."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def cpus_per_process(local_world_size: int = 1) -> int:
    """The CPUs this process may use (its affinity mask, so container limits count), shared among the
    training processes of this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_world_size))


def default_num_workers(device: torch.device, local_world_size: int = 1) -> int:
    """Decoding processes per training process.

    GPU: every CPU this process owns but the one feeding the GPU; there decoding is what limits speed
    (an ImageNet-size JPEG costs ~3 core-ms to decode and crop, a megapixel photo 10+).
    CPU: the model's math already keeps every core busy, and a worker that takes a core from one of
    its OpenMP threads stalls the others at the next barrier. Decoding costs a fraction of the math
    (a sixth at 32 px, less above; benchmarks/benchmark_training.py), so one worker per 4 CPUs, and
    none below 4 CPUs, where decoding between steps measured fastest for small images (for large
    photos, --num-workers 1 is; docs/performance.md)."""
    per_process = cpus_per_process(local_world_size)
    if device.type == "cuda":
        return max(1, per_process - 1)
    return per_process // 4


SHM = "/dev/shm"
SHM_SHARE = 0.5  # of /dev/shm for the batches in flight: the rest for the validation loader and others


def prefetch_factor(num_workers: int, batch_bytes: int, local_world_size: int = 1, shm: str = SHM) -> int:
    """Batches each worker decodes ahead (2-4), sized so that all the machine's workers' batches in flight fit
    in its share of /dev/shm, where worker processes hand over their tensors (Azure ML's default
    `shm_size` is 2g; component.yaml asks for more)."""
    try:
        stats = os.statvfs(shm)
        available = stats.f_blocks * stats.f_frsize
    except OSError:
        return 2
    per_process = available * SHM_SHARE / max(1, local_world_size)
    fits = int(per_process // max(1, num_workers * batch_bytes))
    if fits < 2:
        log.warning("/dev/shm (%.1f GiB) is small for %d workers x %d process(es) x %.0f MiB batches: workers may "
                    "die; give the job a larger shm_size or lower --num-workers.", available / 2**30, num_workers,
                    local_world_size, batch_bytes / 2**20)
    return max(1, min(4, fits))


def _worker_init(_worker_id: int) -> None:
    # Each worker decodes one image at a time: extra intra-op threads only fight over cores.
    torch.set_num_threads(1)


def make_loader(dataset, sampler: Sampler, *, batch_size: int | None, drop_last: bool,
                num_workers: int, device: torch.device, local_world_size: int = 1,
                generator: torch.Generator | None = None, images_per_batch: int | None = None) -> DataLoader:
    """`batch_size` None: the sampler's keys name whole batches (shard_data)."""
    workers = num_workers > 0
    # Sized by what travels from the workers: decoded images, or the encoded files under --decode gpu.
    batch_bytes = (images_per_batch or batch_size) * dataset.item_bytes
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
        collate_fn=getattr(dataset, "collate", collate),  # a dataset may bring its own (gpu_decode's)
        num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
        persistent_workers=workers, generator=generator,
        prefetch_factor=prefetch_factor(num_workers, batch_bytes, local_world_size) if workers else None,
    )


def training_loader(dataset: ImageDataset, *, batch_size: int, seed: int, rank: int, world_size: int,
                    num_workers: int, device: torch.device, local_world_size: int = 1) -> DataLoader:
    # DistributedSampler also serves a single process: a (seed, epoch)-determined shuffle. The loader's own
    # generator keeps its iterators (started early, before validation) from drawing on the global RNG, whose
    # state the checkpoint saves.
    common = dict(num_workers=num_workers, device=device, local_world_size=local_world_size,
                  generator=torch.Generator().manual_seed(seed))
    if shards_of(dataset) is not None:
        return shard_loader(dataset, train=True, batch_size=batch_size, rank=rank, world_size=world_size, **common)
    inner = DistributedSampler(range(len(dataset)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return make_loader(dataset, EpochTaggedSampler(inner), batch_size=batch_size, drop_last=True, **common)


def evaluation_loader(dataset: ImageDataset, *, batch_size: int, rank: int, world_size: int,
                      num_workers: int, device: torch.device, local_world_size: int = 1, cache: bool = False):
    common = dict(num_workers=num_workers, device=device, local_world_size=local_world_size)
    if shards_of(dataset) is not None:
        loader = shard_loader(dataset, train=False, batch_size=batch_size, rank=rank, world_size=world_size,
                              **common)
    else:
        loader = make_loader(dataset, ShardSampler(len(dataset), rank, world_size), batch_size=batch_size,
                             drop_last=False, **common)
    return CachedBatches(loader) if cache else loader


def shards_of(dataset):
    """The ShardIndex a dataset reads, or None for image files."""
    directory = getattr(dataset, "directory", None)
    return getattr(directory, "shards", None)


def shard_loader(dataset: ImageDataset, *, train: bool, batch_size: int, rank: int, world_size: int,
                 num_workers: int, collate_fn=None, **common) -> DataLoader:
    """Batches of a Parquet shard set (shard_data.py): the loader's keys name whole batches."""
    from .shard_data import ShardBatchSampler, ShardDataset, process_streams

    shards = dataset.directory.shards
    streams = process_streams(shards.rows, num_workers, world_size, batch_size, train)
    batches = ShardDataset(dataset, shards, train=train, batch_size=batch_size, rank=rank, world_size=world_size,
                           streams=streams)
    if collate_fn is not None:
        batches.collate = collate_fn
    return make_loader(batches, ShardBatchSampler(batches.batches_per_stream()), batch_size=None, drop_last=False,
                       num_workers=num_workers, images_per_batch=batch_size, **common)


class CachedBatches:
    """Validation batches decoded once and replayed every epoch (they are the same: no randomness).

    Kept as uint8 on the host, unpinned; the cache gives up (and every epoch decodes again) past
    `max_bytes`, so memory stays bounded whatever the validation set's size."""

    def __init__(self, loader: DataLoader, max_bytes: int | None = None):
        self.loader = loader
        self.max_bytes = max_bytes if max_bytes is not None else default_cache_bytes()
        self.batches: list[Batch] | None = None
        self.gave_up = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.batches is not None:
            yield from self.batches
            return
        kept, size = [], 0
        for batch in self.loader:
            if not self.gave_up:
                size += batch.images.numel()
                if size > self.max_bytes:
                    self.gave_up, kept = True, []
                    log.warning("The validation images do not fit the %.1f GiB cache: decoding them every epoch.",
                                self.max_bytes / 2**30)
                else:
                    kept.append(Batch(batch.images.clone() if batch.images.is_pinned() else batch.images,
                                      batch.targets, batch.failures))
            yield batch
        if not self.gave_up:
            self.batches = kept


def default_cache_bytes() -> int:
    """A quarter of the host memory, at most 16 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * 2**30
    return min(16 * 2**30, total // 4)


class BadImageTracker:
    """Collects unreadable files, warns once per file, and fails past `max_fraction` of a dataset."""

    MAX_NAMED = 20

    def __init__(self, directory: ImageDirectory, role: str, max_fraction: float):
        self.directory, self.role, self.max_fraction = directory, role, max_fraction
        self.bad: dict[int, str] = {}

    def record(self, failures: list[tuple[int, str]]) -> None:
        for index, reason in failures:
            if index in self.bad:
                continue
            self.bad[index] = reason
            if len(self.bad) <= self.MAX_NAMED:
                log.warning("Skipping unreadable %s image '%s': %s",
                            self.role.lower(), self.directory.files[index], reason)
            elif len(self.bad) == self.MAX_NAMED + 1:
                log.warning("More unreadable %s images; only their count is reported from now on.", self.role.lower())
        if self.bad and len(self.bad) > self.max_fraction * len(self.directory):
            named = ", ".join(f"'{self.directory.files[i]}' ({r})" for i, r in list(self.bad.items())[:5])
            raise InvalidDatasetError(
                f"{self.role} data '{self.directory.root}': {len(self.bad)} of {len(self.directory)} images cannot be "
                f"read, more than the allowed {self.max_fraction:.0%} (--max-bad-image-fraction). First: {named}. "
                "Remove or replace these files."
            )


class MultiHotTargets:
    """A multi-label directory's targets: row i -> float multi-hot over the training classes, made when the row
    is loaded (the directory keeps only the compact label sets)."""

    def __init__(self, label_sets, mapping: list[int], num_classes: int):
        self.label_sets, self.mapping, self.num_classes = label_sets, mapping, num_classes

    def __len__(self) -> int:
        return len(self.label_sets)

    def __getitem__(self, row: int) -> torch.Tensor:
        target = torch.zeros(self.num_classes)
        target[[self.mapping[i] for i in self.label_sets[row]]] = 1.0
        return target


def class_targets(directory: ImageDirectory, class_index: dict[str, int]) -> array | MultiHotTargets:
    """Each row's class index in the training class list (matched by category name); for a multi-label
    directory, each row's multi-hot vector."""
    mapping = [class_index[name] for name in directory.categories]
    if directory.label_sets is not None:
        return MultiHotTargets(directory.label_sets, mapping, len(class_index))
    return array("l", (mapping[label] for label in directory.labels))


def stack_targets(targets: list) -> torch.Tensor:
    """A batch's targets: int64 class indices, or the float multi-hot rows of a multi-label dataset."""
    if targets and isinstance(targets[0], torch.Tensor):
        return torch.stack(targets)
    return torch.tensor(targets, dtype=torch.int64)


def build_dataset(directory: ImageDirectory, class_index: dict[str, int], preprocessing: Preprocessing,
                  *, train: bool, seed: int) -> ImageDataset:
    transform = preprocessing.train_transform() if train else preprocessing.eval_transform()
    size_hint = preprocessing.resize_size
    return ImageDataset(directory, class_targets(directory, class_index), transform, size_hint, seed)
