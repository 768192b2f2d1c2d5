"""Preemption-safe training: a checkpoint at every epoch boundary, resume on restart, stop on SIGTERM.

- `CheckpointWriter.save` writes `checkpoint.pt` in the checkpoint folder at the end of every epoch
  (rank 0 only): model, optimizer (momentum buffers), scheduler, grad scaler, EMA, early-stopping
  state, best weights, metrics history, next epoch, CPU thread count and the torch/CUDA/numpy/python
  RNG states. The state is copied to the CPU at once; the file is written in a background thread
  (training goes on) to a temporary file renamed over the old one, so a reader sees the old or the
  new, never half. The write is joined before the next save and at the end.
- `load` (rank 0 reads, every rank receives) + `check_compatible` + `restore` put a fresh
  TrainingState back where the checkpoint left it. Restarting the same command therefore resumes;
  the data order and augmentation depend only on (seed, epoch, row), so the resumed run ends with
  the same weights, bit for bit on CPU, as one that was never interrupted.
- A checkpoint written for other inputs (classes, model, data, hyperparameters, process count) is
  refused with CheckpointMismatchError naming each difference.
- What a SIGTERM does to a run is preemption.py's; `CheckpointWriter.interrupted_error` says what
  the checkpoint on disk holds at that moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from . import preemption
from .errors import (
    CheckpointMismatchError,
    CheckpointWriteError,
    OutputDirectoryError,
    TrainingInterruptedError,
    TrainPyTorchModelError,
    quote,
)
from .image_directory import ImageDirectory
from .models import cpu_copy
from .output_folder import write_failure
from .train import TrainingState

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
TEMPORARY_PREFIX = f".{CHECKPOINT_FILE}.tmp-"
_UMASK = os.umask(0o022)  # read once, here in the main thread (the writer thread must not change it)
os.umask(_UMASK)
FORMAT = 2


# --- what the checkpoint must match --------------------------------------------------------------

def data_fingerprint(directory: ImageDirectory) -> str:
    """Row order, file names, labels, and each file's size and modification time (whole seconds; of each Parquet
    shard for a shard set): an image changed in place is noticed for the price of one stat per file. Not the
    mount path, which changes between Azure ML attempts."""
    digest = hashlib.sha256()
    if directory.shards is not None:
        for name in directory.shards.files:
            digest.update(f"{name}\t{_file_stamp(directory.shards.root / name)}\n".encode())
    for row, name in enumerate(directory.files):
        labels = "\t".join(directory.label_names(row))  # one name; a multi-label row's set
        stamp = _file_stamp(directory.path(row)) if directory.shards is None else ""
        digest.update(f"{name}\t{labels}\t{stamp}\n".encode())
    return f"{len(directory.files)} images, sha256 {digest.hexdigest()[:16]}"


def data_fingerprints(ctx, *directories: ImageDirectory) -> list[str]:
    """`data_fingerprint` of each directory, taken by rank 0 alone and sent to every rank: one stat per image per
    job, not per process (a million images on a network mount are a million round trips each), and every rank
    compares the same fingerprints with the checkpoint's."""
    return ctx.broadcast_object([data_fingerprint(d) for d in directories] if ctx.is_main else None)


def _file_stamp(path: Path) -> str:
    try:
        status = os.stat(path)
    except OSError:  # a missing row stays missing: skipped the same way on resume
        return "missing"
    return f"{status.st_size}\t{int(status.st_mtime)}"


def run_identity(*, model_name: str, pretrained: bool, untrained_weights: str, classes: list[str],
                 training_data: str, validation_data: str, hyperparameters: dict, world_size: int,
                 data_streams: int | None = None) -> dict:
    """Everything that decides the training trajectory, the starting weights included (`untrained_weights`:
    models.weights_digest of the model before its first step; `training_data`, `validation_data`: the data's
    `data_fingerprints`). Paths, worker counts and logging are left out, except the streams Parquet shards are
    read in (`data_streams`, from the worker count), which decide their batches."""
    identity = {"model_name": model_name, "pretrained": pretrained, "untrained_weights": untrained_weights,
                "classes": list(classes), "training_data": training_data, "validation_data": validation_data,
                **hyperparameters, "world_size": world_size}
    if data_streams is not None:
        identity["data_streams"] = data_streams
    return identity


def check_compatible(checkpoint: dict, identity: dict, path: Path) -> None:
    saved = checkpoint.get("identity") or {}
    differences = []
    for key in sorted(set(saved) | set(identity)):
        if saved.get(key) != identity.get(key):
            show = _short_list if key == "classes" else quote
            differences.append(f"{key}: {show(saved.get(key))} in the checkpoint, {show(identity.get(key))} now")
    if differences:
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' was written by a run with other inputs, so it cannot be resumed: "
            f"{'; '.join(differences)}. Give an empty --checkpoint-dir to train from the start, or rerun with "
            "the inputs and parameters that wrote it."
        )


def _short_list(values) -> str:
    values = list(values or [])
    return quote(values) if len(values) <= 10 else f"{len(values)} classes {quote(values[:5])}..."


# --- save / load -----------------------------------------------------------------------------------

def rng_states() -> dict:
    key, positions, index, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": key, "positions": torch.from_numpy(positions.astype(np.int64)), "index": int(index),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        # The current device's only: touching the others would create a CUDA context on every GPU.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def set_rng_states(states: dict) -> None:
    """Put back what `rng_states` saved; ValueError (nothing changed) for states of another shape (an edited file)."""
    problem = _invalid_rng_states(states)
    if problem:
        raise ValueError(f"rng: {problem}")
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["key"], n["positions"].numpy().astype(np.uint32), n["index"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])


def _invalid_rng_states(states) -> str | None:
    """What is wrong with saved RNG states (the shapes `rng_states` writes), or None."""
    if not isinstance(states, dict):
        return "missing or not a mapping"
    python = states.get("python")
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], tuple)
            and len(python[1]) == 625 and all(type(v) is int and 0 <= v < 2**32 for v in python[1])):
        return "python: not a Mersenne Twister state"
    n = states.get("numpy")
    if not (isinstance(n, dict) and n.get("key") == "MT19937" and isinstance(n.get("positions"), torch.Tensor)
            and n["positions"].dtype == torch.int64 and tuple(n["positions"].shape) == (624,)
            and type(n.get("index")) is int and 0 <= n["index"] <= 624 and type(n.get("has_gauss")) is int
            and type(n.get("gauss")) is float):
        return "numpy: not a Mersenne Twister state"
    for key in ("torch", "cuda"):
        value = states.get(key)
        if key == "cuda" and value is None:
            continue
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
                and 0 < value.numel() <= 2**16):
            return f"{key}: not a generator state"
    return None


class CheckpointWriter:
    """Writes epoch-boundary checkpoints in the background, one at a time (rank 0 only)."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory else None
        self.saved_epochs = None  # finished epochs in the last checkpoint written (None: none yet)
        self.failed_epochs: list[int] = []  # epochs whose checkpoint the file system refused (disk full...)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: TrainingState, identity: dict) -> None:
        """Copy the state now (training changes it next step), write it in a background thread."""
        if self.directory is None:
            return
        self.join()
        payload = cpu_copy(payload_of(state, identity))
        self._thread = threading.Thread(target=self._write, args=(payload,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _write(self, payload: dict) -> None:
        try:
            write(self.directory, payload)
            self.saved_epochs = payload["next_epoch"]
        except CheckpointWriteError as exc:
            # The file system refused (disk full, quota): training goes on, said loudly each time, since the
            # model it is heading for matters more than resuming; a later epoch's checkpoint may fit again.
            self.failed_epochs.append(payload["next_epoch"])
            kept = (f"still holds {self.saved_epochs} finished epoch(s)" if self.saved_epochs
                    else "holds no finished epoch")
            log.warning("%s: %s Training goes on; the checkpoint folder %s, so a restart now would repeat the epochs "
                        "since. Free space there to checkpoint again.", type(exc).__name__, exc, kept)
        except BaseException as exc:  # raised again by join(), in the training thread
            self._error = exc

    def join(self) -> None:
        """Wait for the write in flight; its failure is raised here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def interrupted_error(self, epochs: int) -> TrainingInterruptedError:
        """The error of a run stopped by SIGTERM now. The write in flight finishes first: what the message says is
        on disk must be."""
        with contextlib.suppress(TrainPyTorchModelError):
            self.join()
        return preemption.interrupted_error(self.directory, self.saved_epochs, epochs)


def payload_of(state: TrainingState, identity: dict) -> dict:
    return {"format": FORMAT, "identity": identity, "cpu_threads": torch.get_num_threads(), "rng": rng_states(),
            **state.state_dict()}


def write(directory: Path, payload: dict) -> Path:
    """Write `payload` to `checkpoint.pt`, atomically: a temporary file of this writer's own (unique name, locked
    while written, so another run's cleanup never takes it), renamed over the old checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    fd, name = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=directory)
    temporary = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 is for the temporary name only
        with open(fd, "wb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when closed: after the rename
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        reason = write_failure(exc)
        if reason:
            raise CheckpointWriteError(
                f"Cannot write the checkpoint of epoch {payload['next_epoch']} to '{path}': {reason}.") from None
        if isinstance(exc, OSError):
            raise OutputDirectoryError(f"Cannot write the checkpoint '{path}': {exc.strerror or exc}.") from None
        raise
    return path


def remove_abandoned_temporaries(directory: Path) -> None:
    """Temporary files of saves cut short by a kill. One that a live writer holds (locked) is left alone: two
    runs may share a checkpoint folder, and a refused second run must not break the first one's save."""
    for leftover in directory.glob(f"{TEMPORARY_PREFIX}*"):
        try:
            with open(leftover, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                leftover.unlink(missing_ok=True)
        except OSError:  # locked by its writer (BlockingIOError), or gone meanwhile
            continue


def read(directory: Path) -> dict | None:
    """The checkpoint in `directory`, or None when there is none (a first run)."""
    directory = Path(directory)
    try:  # now, so a folder that cannot be written fails before the first epoch, not after it
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirectoryError(
            f"Checkpoint folder '{directory}' cannot be created: {exc.strerror or exc}.") from None
    remove_abandoned_temporaries(directory)
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file gets the same advice
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Delete it, or give an empty --checkpoint-dir, to train from the start."
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' is not a checkpoint of this version of train_pytorch_model (format "
            f"{quote(checkpoint.get('format')) if isinstance(checkpoint, dict) else '?'}, expected {FORMAT}). "
            "Delete it, or give an empty --checkpoint-dir, to train from the start."
        )
    problem = invalid_field(checkpoint)
    if problem:
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' is damaged or was edited ({problem}), so it cannot be resumed. Delete it, or give "
            "an empty --checkpoint-dir, to train from the start."
        )
    return checkpoint


def invalid_field(checkpoint: dict) -> str | None:
    """The first field that is not what `payload_of` writes, or None. Nothing in a checkpoint is trusted."""
    identity = checkpoint.get("identity")
    epochs = identity.get("epochs") if isinstance(identity, dict) else None
    if not isinstance(epochs, int):
        return "identity: not the identity of a run"
    threads = checkpoint.get("cpu_threads")
    if not isinstance(threads, int) or not 1 <= threads <= 4096:
        return f"cpu_threads {quote(threads)}"
    if not isinstance(checkpoint.get("rng"), dict):
        return "rng: missing or not a mapping"
    return TrainingState.invalid_field(checkpoint, epochs)



def load(directory: Path, ctx) -> dict | None:
    """Rank 0 reads the checkpoint and every rank receives it (the folder need not be shared by all nodes)."""
    checkpoint, error = None, None
    if ctx.is_main:
        try:
            checkpoint = read(directory)
        except TrainPyTorchModelError as exc:
            error = exc
    checkpoint, error = ctx.broadcast_object((checkpoint, error))
    if error is not None:
        error.raised_on_every_rank = True  # nobody is left waiting
        raise error
    return checkpoint


def restore(checkpoint: dict, state: TrainingState, path: Path) -> None:
    """Put the checkpoint into a freshly built state. Call last before fitting: it resets the RNGs."""
    try:
        state.load_state_dict(checkpoint)
        set_rng_states(checkpoint["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError) as exc:
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' does not fit this model and run ({str(exc).splitlines()[0][:300]}). Give an empty "
            "--checkpoint-dir to train from the start."
        ) from None
    if checkpoint["cpu_threads"] != torch.get_num_threads() and not torch.cuda.is_initialized():
        # The CPU kernels' summation order depends on the thread count: keep it, and the bits.
        log.info("Using %d CPU threads, as the run that wrote the checkpoint did.", checkpoint["cpu_threads"])
        torch.set_num_threads(checkpoint["cpu_threads"])
