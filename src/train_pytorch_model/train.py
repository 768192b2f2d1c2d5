"""The training loop: one epoch of SGD, one exact validation pass, early stopping on the best
validation loss, and a copy of the best epoch's weights.

Optimiser: SGD, momentum 0.9, Nesterov, weight decay 1e-4 (the original's), or AdamW. The
learning rate warms up linearly for `warmup_epochs`, then follows a cosine decay to zero over
the remaining steps, updated every step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data import BadImageTracker, Batch
from .distributed import Context
from .preprocessing import Preprocessing

log = logging.getLogger(__name__)


class EarlyStopping:
    """Stops after `patience` consecutive epochs whose validation loss does not beat the best so far.

    (The original compared with the previous epoch, so a loss that oscillated never stopped.)
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def step(self, epoch: int, valid_loss: float) -> bool:
        """Record an epoch; True when it is the new best."""
        if valid_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = valid_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch, self.bad_epochs = state["best_loss"], state["best_epoch"], state["bad_epochs"]


def make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.warmup_epochs * steps_per_epoch
    total = max(1, config.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile can work here. On CPU, Inductor builds C++ kernels: without a C++ compiler it
    would fail at the first step, so the model stays eager, with a warning."""
    if device.type == "cpu":
        candidates = [os.environ.get("CXX"), "g++", "clang++", "c++"]
        if not any(shutil.which(name) for name in candidates if name):
            log.warning("--compile true: no C++ compiler found (set CXX or install g++); training without torch.compile.")
            return False
    return True


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only, whose narrow range lets small gradients underflow; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TrainResult:
    """One epoch of training, summed over every rank."""

    loss: float
    accuracy: float
    images_per_second: float
    data_wait_fraction: float


@dataclass
class EvalResult:
    """One pass over the whole validation set, summed exactly over every rank."""

    loss: float
    top1: float
    top5: float | None  # None with fewer than 5 classes


@dataclass
class EpochMetrics:
    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    train_images_per_second: float
    valid_loss: float
    valid_top1: float
    valid_top5: float | None
    data_wait_fraction: float
    seconds: float

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Interrupted(Exception):
    """`should_interrupt` stopped `fit` before `epoch` (0-based) was complete; that epoch must be run again."""

    def __init__(self, epoch: int):
        super().__init__(f"interrupted before epoch {epoch + 1} was complete")
        self.epoch = epoch


@dataclass
class TrainingState:
    """Everything an epoch boundary needs to resume (saved by checkpoints)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    early_stopping: EarlyStopping
    best_state: dict | None = None
    history: list[EpochMetrics] = field(default_factory=list)
    next_epoch: int = 0

    @property
    def raw_model(self) -> nn.Module:
        """The model itself, without the DDP wrapper: what is saved and validated."""
        return getattr(self.model, "module", self.model)


class Trainer:
    """Runs epochs of a resolved `config` (precision, channels_last and workers already decided for the device)."""

    def __init__(self, ctx: Context, config: TrainConfig, preprocessing: Preprocessing, num_classes: int,
                 train_loader, valid_loader, train_bad: BadImageTracker, valid_bad: BadImageTracker):
        self.ctx, self.config, self.preprocessing, self.num_classes = ctx, config, preprocessing, num_classes
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.train_bad, self.valid_bad = train_bad, valid_bad
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    def to_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch.images.to(self.ctx.device, non_blocking=True)
        targets = batch.targets.to(self.ctx.device, non_blocking=True)
        images = self.preprocessing.normalize(images).contiguous(memory_format=self.memory_format)
        return images, targets

    def train_epoch(self, state: TrainingState, epoch: int, log_progress,
                    should_interrupt=lambda: False) -> TrainResult | None:
        """One epoch; None when `should_interrupt` turned true on some rank (the epoch is abandoned)."""
        model, config = state.model, self.config
        model.train()
        self.train_loader.sampler.set_epoch(epoch)
        loss_sum = correct = seen = 0.0
        wait = 0.0
        steps = len(self.train_loader)
        start = tick = time.perf_counter()
        for step, batch in enumerate(self.train_loader, start=1):
            wait += time.perf_counter() - tick
            self.train_bad.record(batch.failures)
            # Ranks decide together: under DDP one rank skipping a step another takes would
            # mismatch the gradient all-reduces, and all must stop at the same step.
            skip, stop = self.ctx.any_rank(len(batch) < 2, should_interrupt())
            if stop:
                return None
            if skip:  # BatchNorm cannot train on one sample; only bad files make batches this small
                tick = time.perf_counter()
                continue
            images, targets = self.to_device(batch)
            with autocast(self.ctx.device, config.precision):
                logits = model(images)
                loss = F.cross_entropy(logits, targets)
            state.optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.scheduler.step()
            n = len(targets)
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == targets).sum().item()
            seen += n
            if step % config.print_freq == 0 or step == steps:
                log_progress(epoch, step, steps, loss_sum / max(seen, 1), seen / (time.perf_counter() - start))
            tick = time.perf_counter()
        elapsed = time.perf_counter() - start
        loss_sum, correct, seen, elapsed_sum = self.ctx.all_reduce_sum([loss_sum, correct, seen, elapsed])
        elapsed_mean = elapsed_sum / self.ctx.world_size  # images/s of the whole job: all ranks' images per second
        return TrainResult(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1),
                           images_per_second=seen / max(elapsed_mean, 1e-9),
                           data_wait_fraction=wait / max(elapsed, 1e-9))

    @torch.inference_mode()
    def evaluate(self, model: nn.Module) -> EvalResult:
        """Loss, top-1 and top-5 over the whole validation set, summed exactly over ranks.

        `model` is the bare module, not the DDP wrapper: ranks hold different numbers of validation
        batches, and DDP's forward would run a buffer broadcast per batch. Every rank evaluates
        rank 0's weights (the ones saved), so the result is what one process would measure."""
        self.ctx.broadcast_buffers(model)
        model.eval()
        loss_sum = top1 = top5 = seen = 0.0
        k = min(5, self.num_classes)
        for batch in self.valid_loader:
            self.valid_bad.record(batch.failures)
            if len(batch) == 0:
                continue
            images, targets = self.to_device(batch)
            with autocast(self.ctx.device, self.config.precision):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            topk = logits.topk(k, dim=1).indices
            hits = topk == targets[:, None]
            top1 += hits[:, 0].sum().item()
            top5 += hits.any(dim=1).sum().item()
            seen += len(targets)
        loss_sum, top1, top5, seen = self.ctx.all_reduce_sum([loss_sum, top1, top5, seen])
        if seen == 0:
            return EvalResult(loss=math.inf, top1=0.0, top5=None)
        return EvalResult(loss=loss_sum / seen, top1=top1 / seen, top5=top5 / seen if self.num_classes >= 5 else None)

    def fit(self, state: TrainingState, on_epoch_end, log_progress, should_interrupt=lambda: False) -> TrainingState:
        """Run epochs from `state.next_epoch`. `on_epoch_end(state, metrics)` logs and checkpoints.

        `should_interrupt()` is this rank's wish to stop (SIGTERM); it is checked before every step and
        after every epoch's `on_epoch_end`, agreed over all ranks, and raises Interrupted.
        """
        raw_model = state.raw_model
        if state.early_stopping.should_stop:  # resumed from the checkpoint of a run that had stopped
            return state
        for epoch in range(state.next_epoch, self.config.epochs):
            started = time.perf_counter()
            lr = state.optimizer.param_groups[0]["lr"]
            trained = self.train_epoch(state, epoch, log_progress, should_interrupt)
            if trained is None:
                raise Interrupted(epoch)
            validated = self.evaluate(raw_model)
            metrics = EpochMetrics(
                epoch=epoch + 1, lr=lr, train_loss=trained.loss, train_accuracy=trained.accuracy,
                train_images_per_second=trained.images_per_second, valid_loss=validated.loss,
                valid_top1=validated.top1, valid_top5=validated.top5, data_wait_fraction=trained.data_wait_fraction,
                seconds=time.perf_counter() - started)
            state.history.append(metrics)
            if state.early_stopping.step(epoch, validated.loss):
                # A copy, on CPU: the live weights keep changing (the original kept a reference).
                state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()}
            state.next_epoch = epoch + 1
            stop = self.ctx.broadcast_flag(state.early_stopping.should_stop)
            on_epoch_end(state, metrics, stopping=stop)
            if stop:
                log.info("Early stopping: validation loss has not improved on epoch %d's %.4f for %d epochs.",
                         state.early_stopping.best_epoch + 1, state.early_stopping.best_loss, state.early_stopping.bad_epochs)
                break
            if epoch + 1 < self.config.epochs and self.ctx.any_rank(should_interrupt())[0]:
                raise Interrupted(epoch + 1)
        return state
