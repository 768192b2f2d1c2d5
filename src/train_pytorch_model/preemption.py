"""Preemption: what SIGTERM does, in one place. Imports no torch (the early handler is installed before torch).

SIGTERM (Azure ML preemption, `torchrun` shutting down, a cancelled job) ends every command with a named
last line and exit code 143, never by the bare signal:

- `install_early_handler` (the first thing `python -m train_pytorch_model` does): until a command takes
  over, SIGTERM raises `Terminated`, which the CLI reports as `CommandInterruptedError`. Even while
  torch is being imported.
- `StopOnSigterm` (around a training run): during the training steps (`deferred()`) SIGTERM only
  sets a flag; the trainer then stops at its next step (`Interrupted`; DDP ranks agree on the step),
  abandons the epoch in progress and the command exits with TrainingInterruptedError. The last
  epoch's checkpoint is already on disk; the rerun repeats the abandoned epoch from it. Outside the
  steps (reading inputs, writing outputs), or when the steps do not come back within `GRACE_SECONDS`
  (a read blocked on a stalled mount), the run ends at once with the same error and exit code.
- `stopping_cleanly` turns whatever the stop looks like when it leaves the trainer into that error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import CommandInterruptedError, TrainingInterruptedError

log = logging.getLogger(__name__)

GRACE_SECONDS = 20.0  # how long a SIGTERM waits for the training steps to stop by themselves


class Terminated(BaseException):
    """Raised by a SIGTERM handler. A BaseException: no `except Exception` on the way (logging's) swallows it."""


class Interrupted(Exception):
    """The stop request (SIGTERM) ended `fit` before `epoch` (0-based) was complete; that epoch must run again.
    Raised at the same step on every rank."""

    def __init__(self, epoch: int):
        super().__init__(f"interrupted before epoch {epoch + 1} was complete")
        self.epoch = epoch


# --- before any command runs ------------------------------------------------------------------------

_main_pid = os.getpid()


def install_early_handler() -> None:
    """From now on SIGTERM raises Terminated in this process (the CLI turns it into CommandInterruptedError)."""
    global _main_pid
    _main_pid = os.getpid()
    signal.signal(signal.SIGTERM, _early_handler)


def _early_handler(signum, frame) -> None:
    if os.getpid() != _main_pid:  # a forked worker: end as the signal would
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


def command_interrupted() -> CommandInterruptedError:
    return CommandInterruptedError(
        "SIGTERM stopped the command before it finished; nothing was written to its output. Run the same command "
        "again."
    )


# --- during a training run -------------------------------------------------------------------------

def interrupted_error(checkpoint_dir: Path | None, saved_epochs: int | None, epochs: int) -> TrainingInterruptedError:
    """The error that ends a run stopped by SIGTERM, saying what the checkpoint on disk holds."""
    if not checkpoint_dir:
        kept = "no --checkpoint-dir was given, so the progress is lost"
    elif not saved_epochs:
        kept = f"the checkpoint folder '{checkpoint_dir}' holds no finished epoch yet: the same command starts again"
    else:
        kept = (f"the checkpoint in '{checkpoint_dir}' holds {saved_epochs} finished epoch(s): run the same command "
                f"again to resume from epoch {saved_epochs + 1}")
    return TrainingInterruptedError(f"Training of {epochs} epoch(s) stopped by SIGTERM; {kept}.")


class NeverStop:
    """The stop request of a run nothing can stop (StopOnSigterm's interface: call it, or defer in the steps)."""

    def __call__(self) -> bool:
        return False

    def deferred(self):
        return contextlib.nullcontext()


never = NeverStop()


class StopOnSigterm:
    """While active, SIGTERM ends the run with the error `message()` builds (a TrainingInterruptedError, exit 143).

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
            raise Terminated()
        log.warning("SIGTERM received: training stops at the next step.")

    def _exit_now(self) -> None:
        """The steps did not come back (a read blocked on a stalled mount, a FIFO): end the process."""
        error = self.message()
        print(f"{type(error).__name__}: {error} (the running step did not stop within {self.grace_seconds:g} s)",
              file=sys.stderr, flush=True)
        os._exit(error.exit_code)

    def __call__(self) -> bool:
        return self.requested


@contextlib.contextmanager
def stopping_cleanly(stop: StopOnSigterm):
    """Around the trainer: its agreed stop (Interrupted), or DataLoader workers that the same SIGTERM ended (a
    RuntimeError while a stop is requested), leave as the run's TrainingInterruptedError."""
    try:
        yield
    except (Interrupted, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not stop():
            raise
        error = stop.message()
        # Interrupted: every rank stopped at the same agreed step, so nobody is left waiting. A worker's death is
        # this rank's own: the other ranks are told, as for any failure.
        error.raised_on_every_rank = isinstance(exc, Interrupted)
        raise error from None
