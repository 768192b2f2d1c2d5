"""The training loop: epochs of training, one exact validation pass after each, early stopping on the
best validation metric, and a copy of the best epoch's weights.

The recipe (what `TrainConfig` leaves at its defaults; docs/recipe.md says why, with measurements):
the optimizer (AdamW, or the original's SGD Nesterov), linear warm-up then cosine decay per step,
BatchNorm statistics re-estimated on recent training batches before each validation, early stopping
that waits at least `early_stopping_min_epochs`. Optional: label smoothing, balanced class weights,
mixup/cutmix, an EMA of the weights, a frozen backbone for the first epochs.

Host syncs are deliberate: the step loop keeps its sums on the device and reads them only at
`print_freq` steps and at the end of the epoch, where DDP ranks also agree on stopping (SIGTERM,
divergence). Validation reads its sums once per pass.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import TrainConfig
from .data import BadImageTracker
from .distributed import Context
from .errors import TrainingDivergedError
from .gpu_decode import GpuBatch, decode_batch
from .models import cpu_state_dict, head_of
from .preprocessing import Preprocessing
from .progress import Silent

log = logging.getLogger(__name__)

BN_RECALIBRATION_IMAGES = 1024  # the most recent training images kept (uint8) to re-estimate BatchNorm statistics


class EarlyStopping:
    """Stops after `patience` consecutive epochs that do not beat the best so far (never before `min_epochs`).

    `metric` is `valid_loss` (lower is better) or `valid_top1` (higher is better, ties broken by the loss).
    (The original compared with the previous epoch, so a loss that oscillated never stopped.)
    """

    def __init__(self, patience: int, metric: str = "valid_loss", min_epochs: int = 0):
        self.patience, self.metric, self.min_epochs = patience, metric, min_epochs
        self.best_loss = math.inf
        self.best_top1 = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.epochs_seen = 0

    def step(self, epoch: int, valid_loss: float, valid_top1: float = 0.0) -> bool:
        """Record an epoch; True when it is the new best. A non-finite loss is never the best."""
        self.epochs_seen = epoch + 1
        if self.metric == "valid_top1":
            better = math.isfinite(valid_loss) and (valid_top1, -valid_loss) > (self.best_top1, -self.best_loss)
        else:
            better = valid_loss < self.best_loss
        if better:
            self.best_loss, self.best_top1, self.best_epoch, self.bad_epochs = valid_loss, valid_top1, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience and self.epochs_seen >= self.min_epochs

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_top1": self.best_top1, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "epochs_seen": self.epochs_seen}

    def load_state_dict(self, state: dict) -> None:
        for key in ("best_loss", "best_top1", "best_epoch", "bad_epochs", "epochs_seen"):
            setattr(self, key, state[key])


# --- what a run is built from ------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, config: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """One parameter group, or two (backbone, head) when the backbone is frozen for the first epochs."""
    decay = config.weight_decay  # TrainConfig settles auto from the optimizer
    params: list = list(model.parameters())
    if config.freeze_backbone_epochs:
        head = {id(p) for p in head_of(getattr(model, "module", model))[1].parameters()}
        params = [{"params": [p for p in params if id(p) not in head]},
                  {"params": [p for p in params if id(p) in head]}]
    # One kernel over all parameters: on CUDA also no sync under fp16; on a CPU a step of resnet18's optimizer
    # takes a fifth of the default (foreach) time, 10-20 % of a training step at 64 px (docs/performance.md).
    fused = True if device.type in ("cuda", "cpu") else None
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=fused)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=decay, fused=fused)


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_epochs`, then cosine decay to 0, per step. A frozen backbone's group has
    factor 0 for its first `freeze_backbone_epochs` epochs (its weights stay as they were)."""
    warmup = config.warmup_epochs * steps_per_epoch
    total = max(1, config.epochs * steps_per_epoch)
    frozen_steps = config.freeze_backbone_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def backbone_factor(step: int) -> float:
        return 0.0 if step < frozen_steps else factor(step)

    lambdas = [backbone_factor, factor] if len(optimizer.param_groups) == 2 else factor
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile can work here. On CPU, Inductor builds C++ kernels: without a C++ compiler it
    would fail at the first step, so the model stays eager, with a warning."""
    if device.type == "cpu":
        candidates = [os.environ.get("CXX"), "g++", "clang++", "c++"]
        if not any(shutil.which(name) for name in candidates if name):
            log.warning("--compile true: no C++ compiler found (set CXX or install g++); training without "
                        "torch.compile.")
            return False
    return True


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only, whose narrow range lets small gradients underflow; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights (and buffers), validated and saved instead of the weights."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def make_batch_mix(config: TrainConfig, num_classes: int):
    """mixup and/or cutmix (torchvision), or None."""
    from torchvision.transforms import v2

    mixes = []
    if config.mixup:
        mixes.append(v2.MixUp(alpha=config.mixup, num_classes=num_classes))
    if config.cutmix:
        mixes.append(v2.CutMix(alpha=config.cutmix, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- named results ----------------------------------------------------------------------------------------

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
    # This rank's (true class, predicted class) per validation image, still on the device: the best epoch's
    # become the validation confusion matrix.
    predictions: torch.Tensor | None = None


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
    """The stop request (SIGTERM) ended `fit` before `epoch` (0-based) was complete; that epoch must run again."""

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
    ema: AveragedModel | None = None
    best_state: dict | None = None
    best_predictions: torch.Tensor | None = None  # (true, predicted) of every validation image at the best epoch
    history: list[EpochMetrics] = field(default_factory=list)
    next_epoch: int = 0

    @property
    def raw_model(self) -> nn.Module:
        """The model itself, without the DDP wrapper: what is trained on."""
        return getattr(self.model, "module", self.model)

    @property
    def evaluated_model(self) -> nn.Module:
        """What is validated and saved: the EMA of the weights when there is one."""
        return self.ema.module if self.ema is not None else self.raw_model


class NeverStop:
    """The stop request of a run nothing can stop (StopOnSigterm's interface: call it, or defer in the steps)."""

    def __call__(self) -> bool:
        return False

    def deferred(self):
        return contextlib.nullcontext()


never = NeverStop()


class Trainer:
    """Runs epochs of a resolved `config` (precision, channels_last and workers already decided for the device)."""

    def __init__(self, ctx: Context, config: TrainConfig, preprocessing: Preprocessing, num_classes: int,
                 train_loader, valid_loader, train_bad: BadImageTracker, valid_bad: BadImageTracker,
                 class_weights: torch.Tensor | None = None):
        self.ctx, self.config, self.preprocessing, self.num_classes = ctx, config, preprocessing, num_classes
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.train_bad, self.valid_bad = train_bad, valid_bad
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.class_weights = None if class_weights is None else class_weights.to(ctx.device)
        self.batch_mix = make_batch_mix(config, num_classes)
        self.recent = collections.deque()  # uint8 training batches kept for BatchNorm re-estimation
        self._next_epoch_batches = None  # (epoch, iterator) started before validation

    def load(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's uint8 images and targets on the device: copied (pinned, non-blocking), or decoded there
        (`--decode gpu`: a GpuBatch; rows that fail to decode leave it, into `batch.failures`)."""
        if isinstance(batch, GpuBatch):
            images = decode_batch(batch, self.ctx.device)
        else:
            images = batch.images.to(self.ctx.device, non_blocking=True)
        return images, batch.targets.to(self.ctx.device, non_blocking=True)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.preprocessing.normalize(images).contiguous(memory_format=self.memory_format)

    def to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.load(batch)
        return self.normalize(images), targets

    def _batches(self, epoch: int):
        """This epoch's training batches; the iterator may already be running (started before validation)."""
        if self._next_epoch_batches is not None and self._next_epoch_batches[0] == epoch:
            batches = self._next_epoch_batches[1]
        else:
            self.train_loader.sampler.set_epoch(epoch)
            batches = iter(self.train_loader)
        self._next_epoch_batches = None
        return batches

    def _start_next_epoch(self, epoch: int) -> None:
        """With decoding workers, start the next epoch's batches now: they decode while validation runs."""
        if epoch < self.config.epochs and self.config.num_workers:
            self.train_loader.sampler.set_epoch(epoch)
            self._next_epoch_batches = (epoch, iter(self.train_loader))

    def _keep_for_bn(self, pixels: torch.Tensor) -> None:
        """The latest uint8 batches (at most BN_RECALIBRATION_IMAGES images), where they already are."""
        if not self.config.bn_recalibration:
            return
        self.recent.append(pixels)
        while sum(len(b) for b in self.recent) - len(self.recent[0]) >= BN_RECALIBRATION_IMAGES:
            self.recent.popleft()

    def train_epoch(self, state: TrainingState, epoch: int, progress: Silent = Silent(),
                    stop_requested=never) -> TrainResult:
        """One epoch. Raises Interrupted when a stop was requested on some rank (the epoch is abandoned)."""
        model, config, ctx = state.model, self.config, self.ctx
        model.train()
        # loss x images, correct, images: on the device, read at print steps only.
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
        wait = 0.0
        steps = len(self.train_loader)
        start = tick = time.perf_counter()
        self.recent.clear()
        progress.start_epoch(epoch, steps)
        for step, batch in enumerate(self._batches(epoch), start=1):
            wait += time.perf_counter() - tick
            # Single process: the stop flag is checked every step (a Python bool, no sync). DDP ranks agree on it
            # at print steps, together with divergence, so they all stop at the same step.
            if not ctx.distributed and stop_requested():
                raise Interrupted(epoch)
            pixels, targets = self.load(batch)
            self.train_bad.record(batch.failures)
            # BatchNorm cannot train on one image, and only bad files make batches this small (drop_last): a
            # step with no weight keeps DDP ranks in lockstep without a per-step agreement. (len() of a device
            # tensor is its shape: no sync.)
            weight = 1.0 if len(targets) >= 2 else 0.0
            if weight == 0.0:
                pixels = torch.zeros(2, 3, config.image_size, config.image_size, dtype=torch.uint8, device=ctx.device)
                targets = torch.zeros(2, dtype=torch.int64, device=ctx.device)
            else:  # the filler batch is no training image: it stays out of the BatchNorm re-estimation
                self._keep_for_bn(pixels)
            images = self.normalize(pixels)
            mixed_images, mixed_targets = self.batch_mix(images, targets) if self.batch_mix else (images, targets)
            with autocast(ctx.device, config.precision):
                logits = model(mixed_images)
                loss = F.cross_entropy(logits, mixed_targets, weight=self.class_weights,
                                       label_smoothing=config.label_smoothing) * weight
            state.optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.scheduler.step()
            if state.ema is not None:
                state.ema.update_parameters(state.raw_model)
            # In-place adds of device values and Python numbers: kernels only, nothing waits for the GPU.
            sums[0] += loss.detach().double() * len(targets)
            sums[1] += (logits.argmax(1) == targets).sum() * weight
            sums[2] += len(targets) * weight
            if step % config.print_freq == 0 or step == steps:
                self._check_step(sums, stop_requested, epoch, step)  # the one deliberate sync of a print step
                loss_sum, _, seen = sums.tolist()
                progress.step(step, loss_sum / max(seen, 1))
            else:
                progress.step(step)  # the bar advances; no device value is read
            tick = time.perf_counter()
        elapsed = time.perf_counter() - start
        loss_sum, correct, seen, elapsed_sum = ctx.all_reduce_sum([*sums.tolist(), elapsed])
        elapsed_mean = elapsed_sum / ctx.world_size  # images/s of the whole job: all ranks' images per second
        self._start_next_epoch(epoch + 1)
        return TrainResult(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1),
                           images_per_second=seen / max(elapsed_mean, 1e-9),
                           data_wait_fraction=wait / max(elapsed, 1e-9))

    def _check_step(self, sums: torch.Tensor, stop_requested, epoch: int, step: int) -> None:
        diverged = not math.isfinite(sums[0].item())
        stop, diverged = self.ctx.any_rank(stop_requested(), diverged)
        if diverged:
            raise TrainingDivergedError(
                f"Training diverged: the training loss became NaN or infinite in epoch {epoch + 1} (by step {step}). "
                f"Lower --learning-rate (now {self.config.learning_rate:g}), or check the untrained model's weights."
            )
        if stop:
            raise Interrupted(epoch)

    @torch.no_grad()
    def recalibrate_batchnorm(self, model: nn.Module) -> None:
        """Re-estimate BatchNorm running statistics as exact averages over the recent training images.

        On small data the momentum-averaged statistics lag far behind weights that change fast, and
        validation in eval mode then sees the wrong normalisation (docs/recipe.md)."""
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or not self.recent:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        was_training = model.training
        model.train()
        for pixels in self.recent:
            with autocast(self.ctx.device, self.config.precision):
                model(self.normalize(pixels))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)

    @torch.inference_mode()
    def evaluate(self, model: nn.Module) -> EvalResult:
        """Loss, top-1 and top-5 over the whole validation set, summed exactly over ranks.

        `model` is the bare module, not the DDP wrapper: ranks hold different numbers of validation
        batches, and DDP's forward would run a buffer broadcast per batch. Every rank evaluates
        rank 0's weights (the ones saved), so the result is what one process would measure."""
        self.ctx.broadcast_buffers(model)
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)  # loss, top-1, top-5, images
        k = min(5, self.num_classes)
        pairs = []
        for batch in self.valid_loader:
            images, targets = self.to_device(batch)
            self.valid_bad.record(batch.failures)
            if len(targets) == 0:
                continue
            with autocast(self.ctx.device, self.config.precision):
                logits = model(images)
            logits = logits.float()
            hits = logits.topk(k, dim=1).indices == targets[:, None]
            sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
            sums[1] += hits[:, 0].sum()
            sums[2] += hits.any(dim=1).sum()
            sums[3] += len(targets)
            pairs.append(torch.stack((targets, logits.argmax(1)), dim=1))
        predictions = torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.int64, device=self.ctx.device)
        loss_sum, top1, top5, seen = self.ctx.all_reduce_sum(sums.tolist())  # the one sync of a validation
        if seen == 0:
            return EvalResult(loss=math.inf, top1=0.0, top5=None, predictions=predictions)
        return EvalResult(loss=loss_sum / seen, top1=top1 / seen, top5=top5 / seen if self.num_classes >= 5 else None,
                          predictions=predictions)

    def fit(self, state: TrainingState, on_epoch_end, progress: Silent = Silent(),
            stop_requested=never) -> TrainingState:
        """Run epochs from `state.next_epoch`. `on_epoch_end(state, metrics, stopping)` logs and checkpoints.

        `stop_requested()` is this rank's wish to stop (SIGTERM); it is agreed over all ranks during the epoch
        and after every epoch's `on_epoch_end`, and raises Interrupted."""
        if state.early_stopping.should_stop:  # resumed from the checkpoint of a run that had stopped
            return state
        for epoch in range(state.next_epoch, self.config.epochs):
            started = time.perf_counter()
            lr = state.optimizer.param_groups[-1]["lr"]  # the head's (the last group)
            with stop_requested.deferred():
                trained = self.train_epoch(state, epoch, progress, stop_requested)
            model = state.evaluated_model
            if self.config.bn_recalibration:
                progress.phase("BatchNorm re-estimation")
                self.recalibrate_batchnorm(model)
            progress.phase("validation")
            validated = self.evaluate(model)
            progress.end_epoch()
            metrics = EpochMetrics(
                epoch=epoch + 1, lr=lr, train_loss=trained.loss, train_accuracy=trained.accuracy,
                train_images_per_second=trained.images_per_second, valid_loss=validated.loss,
                valid_top1=validated.top1, valid_top5=validated.top5, data_wait_fraction=trained.data_wait_fraction,
                seconds=time.perf_counter() - started)
            state.history.append(metrics)
            if state.early_stopping.step(epoch, validated.loss, validated.top1):
                state.best_state = cpu_state_dict(model)  # a copy: the live weights keep changing
                # Read at the epoch end, and only when it is the best: no sync in the validation loop.
                state.best_predictions = self.ctx.gather_rows(validated.predictions).cpu()
            state.next_epoch = epoch + 1
            stop = self.ctx.broadcast_flag(state.early_stopping.should_stop)
            on_epoch_end(state, metrics, stopping=stop)
            if stop:
                log.info("Early stopping: the validation metric has not improved on epoch %d's for %d epochs.",
                         state.early_stopping.best_epoch + 1, state.early_stopping.bad_epochs)
                break
            if epoch + 1 < self.config.epochs and self.ctx.any_rank(stop_requested())[0]:
                raise Interrupted(epoch + 1)
        return state


def cpu_copy(obj):
    """`obj` with every tensor copied to the CPU (for a checkpoint written while training goes on)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = type(obj)((k, cpu_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state dict's module versions (load_state_dict reads them)
            copied._metadata = copy.deepcopy(obj._metadata)
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)
