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
import hashlib
import logging
import os
import random
import threading
from pathlib import Path

import numpy as np
import torch

from . import preemption
from .errors import (
    CheckpointMismatchError,
    OutputDirectoryError,
    TrainingInterruptedError,
    TrainPyTorchModelError,
    quote,
)
from .image_directory import ImageDirectory
from .models import cpu_copy
from .train import TrainingState

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 2


# --- what the checkpoint must match --------------------------------------------------------------

def data_fingerprint(directory: ImageDirectory) -> str:
    """Row order, file names and labels (not the mount path, which changes between Azure ML attempts)."""
    digest = hashlib.sha256()
    for row, name in enumerate(directory.files):
        labels = "\t".join(directory.label_names(row))  # one name; a multi-label row's set
        digest.update(f"{name}\t{labels}\n".encode())
    return f"{len(directory.files)} images, sha256 {digest.hexdigest()[:16]}"


def run_identity(*, model_name: str, pretrained: bool, classes: list[str], train_dir: ImageDirectory,
                 valid_dir: ImageDirectory, hyperparameters: dict, world_size: int,
                 data_streams: int | None = None) -> dict:
    """Everything that decides the training trajectory. Paths, worker counts and logging are left out, except
    the streams Parquet shards are read in (`data_streams`, from the worker count), which decide their batches."""
    identity = {"model_name": model_name, "pretrained": pretrained, "classes": list(classes),
                "training_data": data_fingerprint(train_dir), "validation_data": data_fingerprint(valid_dir),
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
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["key"], n["positions"].numpy().astype(np.uint32), n["index"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])


class CheckpointWriter:
    """Writes epoch-boundary checkpoints in the background, one at a time (rank 0 only)."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory else None
        self.saved_epochs = None  # finished epochs in the last checkpoint written (None: none yet)
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
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    temporary = directory / f".{CHECKPOINT_FILE}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise OutputDirectoryError(f"Cannot write the checkpoint '{path}': {exc.strerror or exc}.") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def read(directory: Path) -> dict | None:
    """The checkpoint in `directory`, or None when there is none (a first run)."""
    directory = Path(directory)
    try:  # now, so a folder that cannot be written fails before the first epoch, not after it
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirectoryError(
            f"Checkpoint folder '{directory}' cannot be created: {exc.strerror or exc}.") from None
    for leftover in directory.glob(f".{CHECKPOINT_FILE}.tmp-*"):  # a save cut short by a kill
        leftover.unlink(missing_ok=True)
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
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' does not fit this model and run ({str(exc).splitlines()[0][:300]}). Give an empty "
            "--checkpoint-dir to train from the start."
        ) from None
    if checkpoint["cpu_threads"] != torch.get_num_threads() and not torch.cuda.is_initialized():
        # The CPU kernels' summation order depends on the thread count: keep it, and the bits.
        log.info("Using %d CPU threads, as the run that wrote the checkpoint did.", checkpoint["cpu_threads"])
        torch.set_num_threads(checkpoint["cpu_threads"])
