"""Batches from Parquet shards (shards.py): sequential row-group reads, an order that is a pure function of
(seed, epoch), each reader on its own row groups.

The order. An epoch's rows are cut into *streams*: `world_size x streams per process`. Training: the row groups
in an order drawn from (seed, epoch), their rows concatenated and cut into equal runs of whole batches
(the remainder, under one batch per stream, is left out of that epoch, as DistributedSampler's drop_last
does); within a run, rows pass through a bounded shuffle buffer seeded by (seed, epoch, stream).
Evaluation: file order, cut into near-equal runs, every row exactly once. A stream reads its run's row
groups in order, so a process reads only its own row groups (neighbouring runs share at most the row group
at their boundary).

The loader. Batch j of stream s is the key (epoch, s, j); the sampler deals keys round-robin over the
streams, and the DataLoader deals them round-robin over its workers, so with one stream per worker each
worker always gets its own stream's keys and keeps that stream's reader and shuffle buffer between calls.
A key out of turn (another worker count) is still served right, by replaying the stream up to it without
decoding. The epoch travels in the key, as it does for folders (data.EpochTaggedSampler).

So a resumed run reads the same batches as one never interrupted; the batches depend on the number of
streams, which is the number of decoding workers: the checkpoint records it (`data_streams`).
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset, Sampler

from .data import ImageDataset, decoded_item
from .shards import ShardIndex, ShardReader

SHUFFLE_ROWS = 1024  # the shuffle buffer of one stream: at most this many rows...
SHUFFLE_BYTES = 64 << 20  # ...and this many bytes of encoded images


def process_streams(rows: int, num_workers: int, world_size: int, batch_size: int, train: bool) -> int:
    """Streams per process: one per decoding worker, fewer when the data is too small to give each a batch."""
    streams = max(1, num_workers)
    if train:
        streams = max(1, min(streams, rows // max(1, world_size * batch_size)))
    return streams


def stream_segments(index: ShardIndex, *, seed: int, epoch: int, stream: int, streams: int, batch_size: int,
                    train: bool) -> list[tuple[int, int, int]]:
    """(row group, first row, end row) pieces, in reading order, of stream `stream` of all `streams`."""
    sizes = index.group_rows
    if train:
        order = np.random.default_rng([seed % 2**63, epoch]).permutation(len(sizes))
        length = index.rows // (streams * batch_size) * batch_size
        lo, hi = stream * length, (stream + 1) * length
    else:
        order = np.arange(len(sizes))
        lo, hi = index.rows * stream // streams, index.rows * (stream + 1) // streams
    ends = np.cumsum(sizes[order])
    starts = ends - sizes[order]
    pieces = []
    for k in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
        if starts[k] >= hi:
            break
        pieces.append((int(order[k]), int(max(lo, starts[k]) - starts[k]), int(min(hi, ends[k]) - starts[k])))
    return pieces


def shuffle_buffer(rows, rng: np.random.Generator, max_rows: int = SHUFFLE_ROWS, max_bytes: int = SHUFFLE_BYTES):
    """`rows` (row, bytes or reason) in an order drawn from `rng`, holding at most `max_rows` / `max_bytes`."""
    buffer, held = [], 0
    for row in rows:
        while buffer and (len(buffer) >= max_rows or held + len(row[1]) > max_bytes):
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            out = buffer.pop()
            held -= len(out[1])
            yield out
        buffer.append(row)
        held += len(row[1])
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class ShardDataset(Dataset):
    """Key (epoch, stream, batch) -> that batch's items, as data.ImageDataset gives them one by one:
    (uint8 CHW image or None, class index, row, error or None). Key (epoch, stream, None): an empty batch
    (a stream with fewer batches than the others keeps the round-robin in step)."""

    def __init__(self, images: ImageDataset, index: ShardIndex, *, train: bool, batch_size: int, rank: int,
                 world_size: int, streams: int):
        self.images, self.index, self.train, self.batch_size = images, index, train, batch_size
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.reader = ShardReader(index)
        self._cursor = None  # (epoch, stream, next batch, row iterator) of the stream read last

    @property
    def targets(self):
        return self.images.targets

    @property
    def item_bytes(self) -> int:  # data.make_loader sizes its prefetch from it
        return self.images.item_bytes

    def batches_per_stream(self) -> list[int]:
        counts = []
        for s in range(self.streams):
            q, total = self.rank * self.streams + s, self.world_size * self.streams
            if self.train:
                rows = self.index.rows // (total * self.batch_size) * self.batch_size
            else:
                rows = self.index.rows * (q + 1) // total - self.index.rows * q // total
            counts.append(math.ceil(rows / self.batch_size))
        return counts

    def _rows(self, epoch: int, stream: int):
        q = self.rank * self.streams + stream
        pieces = stream_segments(self.index, seed=self.images.seed, epoch=epoch, stream=q,
                                 streams=self.world_size * self.streams, batch_size=self.batch_size, train=self.train)

        def rows():
            last, images = None, None
            for group, start, end in pieces:
                if group != last:
                    last, images = group, self.reader.read_group(group)
                first = int(self.index.groups[group, 2])
                for offset in range(start, end):
                    yield first + offset, images[offset]

        if not self.train:
            return rows()
        return shuffle_buffer(rows(), np.random.default_rng([self.images.seed % 2**63, epoch, q]))

    def _take(self, epoch: int, stream: int, batch: int) -> list:
        cursor = self._cursor
        if cursor is None or cursor[:3] != (epoch, stream, batch):
            rows = self._rows(epoch, stream)
            for _ in range(batch * self.batch_size):  # out of turn: replay the stream without decoding
                next(rows, None)
            cursor = (epoch, stream, batch, rows)
        taken = [row for _, row in zip(range(self.batch_size), cursor[3])]
        self._cursor = (epoch, stream, batch + 1, cursor[3])
        return taken

    def __getitem__(self, key):
        epoch, stream, batch = key
        if batch is None:
            return []
        targets = self.images.targets
        return [decoded_item(self.images, data, targets[row], row, epoch) if isinstance(data, bytes)
                else (None, targets[row], row, data) for row, data in self._take(epoch, stream, batch)]


class ShardBatchSampler(Sampler):
    """Keys (epoch, stream, batch), round-robin over the streams; None for a stream that has run out."""

    def __init__(self, counts: list[int]):
        self.counts, self.epoch = counts, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch
        for j in range(max(self.counts)):
            for stream, count in enumerate(self.counts):
                yield epoch, stream, j if j < count else None

    def __len__(self) -> int:
        return max(self.counts) * len(self.counts)
