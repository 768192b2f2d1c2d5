"""Preemption-safe training: a checkpoint at every epoch boundary, resume on restart, stop on SIGTERM.

- `save` writes `checkpoint.pt` in the checkpoint folder at the end of every epoch (rank 0 only):
  model, optimizer (momentum buffers), scheduler, grad scaler, early-stopping state, best weights,
  metrics history, next epoch and the torch/CUDA/numpy/python RNG states. It is written to a
  temporary file and renamed over the old one, so a reader sees the old or the new, never half.
- `load` (rank 0 reads, every rank receives) + `check_compatible` + `restore` put a fresh
  TrainingState back where the checkpoint left it. Restarting the same command therefore resumes;
  the data order and augmentation depend only on (seed, epoch, row), so the resumed run ends with
  the same weights, bit for bit on CPU, as one that was never interrupted.
- A checkpoint written for other inputs (classes, model, data, hyperparameters, process count) is
  refused with CheckpointMismatchError naming each difference.
- `StopOnSigterm`: SIGTERM (preemption, `torchrun` shutting down, a cancelled job) only sets a flag.
  The trainer checks it between steps; every rank stops at the same step, abandons the epoch in
  progress and the command exits with TrainingInterruptedError (exit code 143). The last epoch's
  checkpoint is already on disk; the rerun repeats the abandoned epoch from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointMismatchError, OutputDirectoryError, TrainingInterruptedError, TrainPyTorchModelError
from .image_directory import ImageDirectory
from .train import EpochMetrics, TrainingState

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


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
            show = _short_list if key == "classes" else repr
            differences.append(f"{key}: {show(saved.get(key))} in the checkpoint, {show(identity.get(key))} now")
    if differences:
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' was written by a run with other inputs, so it cannot be resumed: "
            f"{'; '.join(differences)}. Give an empty --checkpoint-dir to train from the start, or rerun with "
            "the inputs and parameters that wrote it."
        )


def _short_list(values) -> str:
    values = list(values or [])
    return repr(values) if len(values) <= 10 else f"{len(values)} classes {values[:5]}..."


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


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save(directory: Path, state: TrainingState, raw_model: torch.nn.Module, identity: dict) -> Path:
    """Write the epoch-boundary state (call on rank 0, after the epoch's validation)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    finished_epoch = state.next_epoch - 1
    best_is_current = state.best_state is not None and state.early_stopping.best_epoch == finished_epoch
    payload = {
        "format": FORMAT,
        "identity": identity,
        "next_epoch": state.next_epoch,
        "model": _cpu_state(raw_model),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "early_stopping": state.early_stopping.state_dict(),
        # The best weights usually are this epoch's: store them once.
        "best_state": None if best_is_current else state.best_state,
        "best_is_current": best_is_current,
        "history": [dataclasses.asdict(m) for m in state.history],
        "rng": rng_states(),
    }
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
        raise OutputDirectoryError(f"Checkpoint folder '{directory}' cannot be created: {exc.strerror or exc}.") from None
    for leftover in directory.glob(f".{CHECKPOINT_FILE}.tmp-*"):  # a save cut short by a kill
        leftover.unlink(missing_ok=True)
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Delete it, or give an empty --checkpoint-dir, to train from the start."
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' is not a checkpoint of this version of train_pytorch_model (format "
            f"{checkpoint.get('format') if isinstance(checkpoint, dict) else '?'}, expected {FORMAT}). "
            "Delete it, or give an empty --checkpoint-dir, to train from the start."
        )
    return checkpoint


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


def restore(checkpoint: dict, state: TrainingState, raw_model: torch.nn.Module, path: Path) -> None:
    """Put the checkpoint into a freshly built state. Call last before fitting: it resets the RNGs."""
    try:
        raw_model.load_state_dict(checkpoint["model"])
        state.optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointMismatchError(
            f"Checkpoint '{path}' does not fit this model ({str(exc).splitlines()[0][:300]}). Give an empty "
            "--checkpoint-dir to train from the start."
        ) from None
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"] and state.scaler.is_enabled():
        state.scaler.load_state_dict(checkpoint["scaler"])
    state.early_stopping.load_state_dict(checkpoint["early_stopping"])
    state.best_state = _cpu_state(raw_model) if checkpoint["best_is_current"] else checkpoint["best_state"]
    fields = [f.name for f in dataclasses.fields(EpochMetrics)]  # tolerant of a column added since
    state.history = [EpochMetrics(**{name: m.get(name) for name in fields}) for m in checkpoint["history"]]
    state.next_epoch = checkpoint["next_epoch"]
    set_rng_states(checkpoint["rng"])


# --- SIGTERM -----------------------------------------------------------------------------------------

def interrupted(directory: Path | None, next_epoch: int, epochs: int, *, all_ranks: bool) -> TrainingInterruptedError:
    """The error that ends a run stopped by SIGTERM. `all_ranks`: every rank stopped at the same agreed step
    (otherwise the other ranks are told, as for any failure)."""
    kept = (f"the checkpoint in '{directory}' holds {next_epoch} finished epoch(s): run the same command again "
            f"to resume from epoch {next_epoch + 1}" if directory else
            "no --checkpoint-dir was given, so the progress is lost")
    error = TrainingInterruptedError(f"Training stopped by SIGTERM during epoch {next_epoch + 1} of {epochs}; {kept}.")
    error.all_ranks = all_ranks
    return error


class StopOnSigterm:
    """While active, SIGTERM sets `requested` instead of killing the process (a second one kills)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._pid = os.getpid()

    def __enter__(self) -> "StopOnSigterm":
        self._pid = os.getpid()
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        return False

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A DataLoader worker (forked with this handler) signalled with its whole process group:
            # it keeps serving until the training process stops at its next step and shuts it down.
            return
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        log.warning("SIGTERM received: training stops at the next step.")

    def __call__(self) -> bool:
        return self.requested
