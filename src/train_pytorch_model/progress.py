"""What a person watching `train` sees between the epoch lines.

On a terminal: a bar per epoch (tqdm), created before the first batch so its clock times the whole epoch,
advanced at every step, naming the BatchNorm re-estimation and validation phases, as wide as the terminal.
In a log file (an Azure ML job's std_log.txt): a plain line every `print_freq` steps, with the epoch's and the
whole run's ETA (log lines carry timestamps there, cli.configure_logging).

The trainer tells a progress display four things (`Silent` is the interface, and shows nothing): an epoch starts,
a step is done (with the running loss at print steps only: reading it waits for the device), a phase starts
after the steps, the epoch ended.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time

log = logging.getLogger("train_pytorch_model")

MAX_LINE = 120  # a summary line is wrapped to the terminal's width, and to this in logs and wide terminals


class Silent:
    """The progress interface; shows nothing (other DDP ranks, tests)."""

    def start_epoch(self, epoch: int, steps: int) -> None:
        pass

    def step(self, step: int, loss: float | None = None) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    def close(self) -> None:
        pass


class Progress(Silent):
    def __init__(self, epochs: int, batch_size: int, print_freq: int, *, terminal: bool | None = None):
        self.epochs, self.batch_size, self.print_freq = epochs, batch_size, print_freq
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        self.epoch = self.steps = 0
        self.loss: float | None = None
        self.epoch_started = 0.0
        self.epoch_seconds: list[float] = []  # whole epochs, validation included: the run ETA's unit

    def start_epoch(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps, self.loss = epoch, steps, None
        self.epoch_started = time.perf_counter()
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=self._title(), unit="step", leave=False, dynamic_ncols=True,
                            file=sys.stderr)

    def step(self, step: int, loss: float | None = None) -> None:
        if loss is not None:
            self.loss = loss
        elapsed = time.perf_counter() - self.epoch_started
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(step - self.bar.n)
        elif not self.terminal and (step % self.print_freq == 0 or step == self.steps):
            images_per_second = step * self.batch_size / max(elapsed, 1e-9)
            epoch_left = (self.steps - step) * elapsed / step
            loss_text = "" if self.loss is None else f"  loss {self.loss:.4f}"
            log.info("  epoch %d/%d  step %d/%d%s  %.1f img/s  eta epoch %s, run %s", self.epoch + 1, self.epochs,
                     step, self.steps, loss_text, images_per_second, format_seconds(epoch_left),
                     format_seconds(self.run_left(epoch_left, elapsed + epoch_left)))

    def run_left(self, epoch_left: float, this_epoch: float) -> float:
        """This epoch's remaining seconds plus the epochs after it, each as long as the finished ones were on
        average (validation included), or as this one's steps until one finished. Early stopping may end sooner."""
        per_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else this_epoch
        return epoch_left + (self.epochs - self.epoch - 1) * per_epoch

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{self._title()} {name}", refresh=True)

    def end_epoch(self) -> None:
        self.epoch_seconds.append(time.perf_counter() - self.epoch_started)
        self.close()

    def close(self) -> None:
        """Remove the bar (also when an epoch is abandoned: SIGTERM, an error)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _title(self) -> str:
        return f"epoch {self.epoch + 1}/{self.epochs}"


def fit_width(parts: list[str], width: int | None = None) -> str:
    """`parts` joined by two spaces, wrapped between parts onto indented lines no wider than the terminal (or
    MAX_LINE columns)."""
    width = min(MAX_LINE, width or shutil.get_terminal_size((MAX_LINE, 24)).columns)
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += "  " + part
        else:
            lines.append("    " + part)
    return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"
