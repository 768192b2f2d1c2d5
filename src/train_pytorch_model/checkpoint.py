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
- `StopOnSigterm`: SIGTERM (preemption, `torchrun` shutting down, a cancelled job) during the
  training steps sets a flag: the trainer stops at the next (agreed) step, abandons the epoch in
  progress and the command exits with TrainingInterruptedError (exit code 143). The last epoch's
  checkpoint is already on disk; the rerun repeats the abandoned epoch from it. Outside the steps
  (reading inputs, writing outputs), or when the steps do not come back within `GRACE_SECONDS` (a read
  blocked on a stalled mount), the process ends at once with the same error and exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import random
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from .errors import (
    CheckpointMismatchError,
    OutputDirectoryError,
    TrainingInterruptedError,
    TrainPyTorchModelError,
    quote,
)
from .image_directory import ImageDirectory
from .models import cpu_state_dict
from .train import EpochMetrics, TrainingState, cpu_copy

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 2
GRACE_SECONDS = 20.0  # how long a SIGTERM waits for the training steps to stop by themselves


# --- what the checkpoint must match --------------------------------------------------------------

def data_fingerprint(directory: ImageDirectory) -> str:
    """Row order, file names and labels (not the mount path, which changes between Azure ML attempts)."""
    digest = hashlib.sha256()
    for name, label in zip(directory.files, directory.labels):
        digest.update(f"{name}\t{directory.categories[label]}\n".encode())
    return f"{len(directory.files)} images, sha256 {digest.hexdigest()[:16]}"


def run_identity(*, model_name: str, pretrained: bool, classes: list[str], train_dir: ImageDirectory,
                 valid_dir: ImageDirectory, hyperparameters: dict, world_size: int) -> dict:
    """Everything that decides the training trajectory. Paths, worker counts and logging are left out."""
    return {"model_name": model_name, "pretrained": pretrained, "classes": list(classes),
            "training_data": data_fingerprint(train_dir), "validation_data": data_fingerprint(valid_dir),
            **hyperparameters, "world_size": world_size}


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


def payload_of(state: TrainingState, identity: dict) -> dict:
    finished_epoch = state.next_epoch - 1
    best_is_current = state.best_state is not None and state.early_stopping.best_epoch == finished_epoch
    return {
        "format": FORMAT,
        "identity": identity,
        "next_epoch": state.next_epoch,
        "cpu_threads": torch.get_num_threads(),
        "model": state.raw_model.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "early_stopping": state.early_stopping.state_dict(),
        # The best weights usually are this epoch's: store them once.
        "best_state": None if best_is_current else state.best_state,
        "best_is_current": best_is_current,
        "best_predictions": state.best_predictions,
        "history": [dataclasses.asdict(m) for m in state.history],
        "rng": rng_states(),
    }


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


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def invalid_field(checkpoint: dict) -> str | None:
    """The first field that is not what `payload_of` writes, or None. Nothing in a checkpoint is trusted."""
    identity = checkpoint.get("identity")
    epochs = identity.get("epochs") if isinstance(identity, dict) else None
    if not isinstance(epochs, int):
        return "identity: not the identity of a run"
    next_epoch = checkpoint.get("next_epoch")
    if not isinstance(next_epoch, int) or isinstance(next_epoch, bool) or not 1 <= next_epoch <= epochs:
        return f"next_epoch {quote(next_epoch)} is not between 1 and {epochs}"
    threads = checkpoint.get("cpu_threads")
    if not isinstance(threads, int) or not 1 <= threads <= 4096:
        return f"cpu_threads {quote(threads)}"
    for key in ("model", "optimizer", "scheduler", "scaler", "early_stopping", "rng"):
        if not isinstance(checkpoint.get(key), dict):
            return f"{key}: missing or not a mapping"
    if not _is_state_dict(checkpoint["model"]):
        return "model: not a state dict"
    if checkpoint.get("ema") is not None and not _is_state_dict(checkpoint["ema"]):
        return "ema: not a state dict"
    if not isinstance(checkpoint.get("best_is_current"), bool):
        return "best_is_current: not true/false"
    if not checkpoint["best_is_current"] and checkpoint.get("best_state") is not None \
            and not _is_state_dict(checkpoint["best_state"]):
        return "best_state: not a state dict"
    stopping = checkpoint["early_stopping"]
    for key in ("best_loss", "best_top1"):
        if not isinstance(stopping.get(key), (int, float)) or isinstance(stopping.get(key), bool) \
                or math.isnan(stopping[key]):
            return f"early_stopping.{key} {quote(stopping.get(key))} is not a number"
    for key in ("best_epoch", "bad_epochs", "epochs_seen"):
        value = stopping.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value <= next_epoch:
            return f"early_stopping.{key} {quote(value)} is not an epoch count of this run"
    predictions = checkpoint.get("best_predictions")
    if predictions is not None and not (isinstance(predictions, torch.Tensor) and predictions.dtype == torch.int64
                                        and predictions.dim() == 2 and predictions.shape[1] == 2):
        return "best_predictions: not (true, predicted) class pairs"
    history = checkpoint.get("history")
    if not isinstance(history, list) or len(history) != next_epoch or not all(isinstance(m, dict) for m in history):
        return f"history: not {next_epoch} epochs of metrics"
    return None


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
        error.all_ranks = True  # raised by every rank at once: nobody is left waiting
        raise error
    return checkpoint


def restore(checkpoint: dict, state: TrainingState, path: Path) -> None:
    """Put the checkpoint into a freshly built state. Call last before fitting: it resets the RNGs."""
    try:
        state.raw_model.load_state_dict(checkpoint["model"])
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.scheduler.load_state_dict(checkpoint["scheduler"])
        if (checkpoint["ema"] is None) != (state.ema is None):
            raise ValueError("the checkpoint was written with another --ema-decay setting")
        if state.ema is not None:
            state.ema.load_state_dict(checkpoint["ema"])
        if checkpoint["scaler"] and state.scaler.is_enabled():
            state.scaler.load_state_dict(checkpoint["scaler"])
        state.early_stopping.load_state_dict(checkpoint["early_stopping"])
        fields = [f.name for f in dataclasses.fields(EpochMetrics)]  # tolerant of a column added since
        state.history = [EpochMetrics(**{name: m.get(name) for name in fields}) for m in checkpoint["history"]]
        set_rng_states(checkpoint["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' does not fit this model and run ({str(exc).splitlines()[0][:300]}). Give an empty "
            "--checkpoint-dir to train from the start."
        ) from None
    state.best_state = cpu_state_dict(state.evaluated_model) if checkpoint["best_is_current"] \
        else checkpoint["best_state"]
    state.best_predictions = checkpoint.get("best_predictions")  # absent in checkpoints written before it was kept
    state.next_epoch = checkpoint["next_epoch"]
    if checkpoint["cpu_threads"] != torch.get_num_threads() and not torch.cuda.is_initialized():
        # The CPU kernels' summation order depends on the thread count: keep it, and the bits.
        log.info("Using %d CPU threads, as the run that wrote the checkpoint did.", checkpoint["cpu_threads"])
        torch.set_num_threads(checkpoint["cpu_threads"])


# --- SIGTERM -----------------------------------------------------------------------------------------

def interrupted(directory: Path | None, saved_epochs: int | None, epochs: int, *,
                all_ranks: bool) -> TrainingInterruptedError:
    """The error that ends a run stopped by SIGTERM, saying what the checkpoint on disk holds. `all_ranks`:
    every rank stopped at the same agreed step (otherwise the other ranks are told, as for any failure)."""
    if not directory:
        kept = "no --checkpoint-dir was given, so the progress is lost"
    elif not saved_epochs:
        kept = f"the checkpoint folder '{directory}' holds no finished epoch yet: the same command starts again"
    else:
        kept = (f"the checkpoint in '{directory}' holds {saved_epochs} finished epoch(s): run the same command again "
                f"to resume from epoch {saved_epochs + 1}")
    error = TrainingInterruptedError(f"Training of {epochs} epoch(s) stopped by SIGTERM; {kept}.")
    error.all_ranks = all_ranks
    return error


class Terminated(BaseException):
    """Raised by the SIGTERM handler; StopOnSigterm turns it into TrainingInterruptedError."""


class StopOnSigterm:
    """While active, SIGTERM ends the run with TrainingInterruptedError (exit 143).

    Inside `deferred()` (the training steps) it only sets the flag `requested` (call the object to read
    it) and the trainer stops at its next step; if the steps have not stopped `grace_seconds` later, or a
    second SIGTERM comes, the process ends at once. Outside `deferred()` it raises at once."""

    def __init__(self, message, grace_seconds: float = GRACE_SECONDS):
        self.message = message  # () -> TrainingInterruptedError, built when the signal comes
        self.grace_seconds = grace_seconds
        self.requested = False
        self._deferring = False
        self._previous = None
        self._pid = os.getpid()
        self._timer: threading.Timer | None = None

    def __enter__(self) -> StopOnSigterm:
        self._pid = os.getpid()
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._timer is not None:
            self._timer.cancel()
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        if exc_type is Terminated:
            raise self.message() from None
        return False

    @contextlib.contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A DataLoader worker (forked with this handler) signalled with its whole process group:
            # it keeps serving until the training process stops at its next step and shuts it down.
            return
        again, self.requested = self.requested, True
        if self._timer is None:
            self._timer = threading.Timer(self.grace_seconds, self._exit_now)
            self._timer.daemon = True
            self._timer.start()
        if again or not self._deferring:
            raise Terminated()  # a BaseException: no `except Exception` on the way (logging's) swallows it
        log.warning("SIGTERM received: training stops at the next step.")

    def _exit_now(self) -> None:
        """The steps did not come back (a read blocked on a stalled mount, a FIFO): end the process."""
        error = self.message()
        print(f"{type(error).__name__}: {error} (the running step did not stop within {self.grace_seconds:g} s)",
              file=sys.stderr, flush=True)
        os._exit(error.exit_code)

    def __call__(self) -> bool:
        return self.requested
