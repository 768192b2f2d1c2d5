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
import dataclasses
import logging
import math
import os
import shutil
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from . import preemption
from .config import TrainConfig
from .data import BadImageTracker
from .distributed import Context
from .errors import TrainingDivergedError, quote
from .models import cpu_state_dict, head_of
from .preprocessing import Preprocessing
from .progress import Silent
from .tasks import MultiClass, MultiLabel

log = logging.getLogger(__name__)

# BatchNorm statistics are re-estimated on the most recent training images (kept as uint8): a quarter of an epoch's,
# at least 128 (all of a smaller epoch), at most 1,024. A forward pass costs about a third of a training step, so
# the re-estimation costs about 8 % of an epoch (a third when it re-read up to 1,024 of a 512-image epoch); 128
# images give every channel's statistics thousands of values even in the last 2x2 feature maps of a 64 px input.
BN_RECALIBRATION_IMAGES = 1024
BN_RECALIBRATION_MIN_IMAGES = 128
BN_RECALIBRATION_SHARE = 0.25


def bn_recalibration_images(epoch_images: int) -> int:
    """How many recent training images re-estimate BatchNorm statistics after an epoch of `epoch_images`."""
    share = int(BN_RECALIBRATION_SHARE * epoch_images)
    return min(BN_RECALIBRATION_IMAGES, max(BN_RECALIBRATION_MIN_IMAGES, share))


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


class WeightAverage(AveragedModel):
    """An exponential moving average of the weights and buffers (AveragedModel's state dict, so checkpoints
    keep their keys) whose update never waits for the device. AveragedModel's own update reads its step
    counter, a CPU tensor, and copies it to the device every step: a host sync per step. Here the average
    starts as the weights themselves (W_0, as torch's EMA formula states) and every update is one lerp kernel
    per dtype; the counter is only counted, on the host."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay
        self.n_averaged += 1  # the copy made above is the first average
        self._source: weakref.ref | None = None  # the model `_lists` were built for
        self._lists: tuple[list, list, list, list] = ([], [], [], [])

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged_floats, current_floats, averaged_counts, current_counts = self._tensor_lists(model)
        torch._foreach_lerp_(averaged_floats, current_floats, 1 - self.decay)
        if averaged_counts:
            torch._foreach_copy_(averaged_counts, current_counts)
        self.n_averaged += 1

    def _tensor_lists(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(averaged, current) floating-point weights and buffers, then (averaged, current) integer buffers
        (BatchNorm's batch counters), built once per model: walking a ResNet-50's modules every step costs more
        host time than the kernels, and the tensors are the same all run long (updated in place)."""
        if self._source is None or self._source() is not model:
            averaged = [*self.module.parameters(), *self.module.buffers()]
            current = [t.detach() for t in (*model.parameters(), *model.buffers())]
            floats = [i for i, t in enumerate(averaged) if t.is_floating_point()]
            counts = [i for i, t in enumerate(averaged) if not t.is_floating_point()]
            self._source = weakref.ref(model)
            self._lists = ([averaged[i] for i in floats], [current[i] for i in floats],
                           [averaged[i] for i in counts], [current[i] for i in counts])
        return self._lists


def make_ema(model: nn.Module, decay: float) -> WeightAverage | None:
    """An exponential moving average of the weights (and buffers), validated and saved instead of the weights."""
    return WeightAverage(model, decay) if decay else None


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
    """One pass over the whole validation set, exact over every rank. Multi-class: top1/top5 (top5 None with
    fewer than 5 classes); multi-label: the multilabel_metrics summary instead."""

    loss: float
    top1: float | None
    top5: float | None
    # This rank's (true class, predicted class) per validation image, still on the device: the best epoch's
    # become the validation confusion matrix (multi-class).
    predictions: torch.Tensor | None = None
    iou: float | None = None
    f1_micro: float | None = None
    f1_macro: float | None = None
    map: float | None = None
    exact_match: float | None = None


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
    decode_fallbacks: int | None = None  # --decode gpu: JPEGs the device decoder refused, decoded by PIL instead
    # multi-label runs (tasks.py): their validation metrics instead of top-1/top-5
    valid_iou: float | None = None
    valid_f1_micro: float | None = None
    valid_f1_macro: float | None = None
    valid_map: float | None = None
    valid_exact_match: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


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

    def state_dict(self) -> dict:
        """Live references (the checkpoint writer copies them to the CPU at once)."""
        finished_epoch = self.next_epoch - 1
        best_is_current = self.best_state is not None and self.early_stopping.best_epoch == finished_epoch
        return {
            "next_epoch": self.next_epoch,
            "model": self.raw_model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "early_stopping": self.early_stopping.state_dict(),
            # The best weights usually are this epoch's: stored once.
            "best_state": None if best_is_current else self.best_state,
            "best_is_current": best_is_current,
            "best_predictions": self.best_predictions,
            "history": [dataclasses.asdict(m) for m in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Back to where `state_dict` was taken (into a freshly built state of the same run). Raises ValueError,
        KeyError, TypeError or RuntimeError when `state` does not fit."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError("the checkpoint was written with another --ema-decay setting")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        fields = [f.name for f in dataclasses.fields(EpochMetrics)]  # tolerant of a column added since
        self.history = [EpochMetrics(**{name: m.get(name) for name in fields}) for m in state["history"]]
        self.best_state = cpu_state_dict(self.evaluated_model) if state["best_is_current"] else state["best_state"]
        self.best_predictions = state.get("best_predictions")  # absent in checkpoints written before it was kept
        self.next_epoch = state["next_epoch"]

    @staticmethod
    def invalid_field(state: dict, epochs: int) -> str | None:
        """The first field of a `state_dict` (read from an untrusted file) that is not what it writes, or None."""
        next_epoch = state.get("next_epoch")
        if not isinstance(next_epoch, int) or isinstance(next_epoch, bool) or not 1 <= next_epoch <= epochs:
            return f"next_epoch {quote(next_epoch)} is not between 1 and {epochs}"
        for key in ("model", "optimizer", "scheduler", "scaler", "early_stopping"):
            if not isinstance(state.get(key), dict):
                return f"{key}: missing or not a mapping"
        if not _is_state_dict(state["model"]):
            return "model: not a state dict"
        if state.get("ema") is not None and not _is_state_dict(state["ema"]):
            return "ema: not a state dict"
        if not isinstance(state.get("best_is_current"), bool):
            return "best_is_current: not true/false"
        if not state["best_is_current"] and state.get("best_state") is not None \
                and not _is_state_dict(state["best_state"]):
            return "best_state: not a state dict"
        stopping = state["early_stopping"]
        for key in ("best_loss", "best_top1"):
            if not isinstance(stopping.get(key), (int, float)) or isinstance(stopping.get(key), bool) \
                    or math.isnan(stopping[key]):
                return f"early_stopping.{key} {quote(stopping.get(key))} is not a number"
        for key in ("best_epoch", "bad_epochs", "epochs_seen"):
            value = stopping.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value <= next_epoch:
                return f"early_stopping.{key} {quote(value)} is not an epoch count of this run"
        predictions = state.get("best_predictions")
        if predictions is not None and not (isinstance(predictions, torch.Tensor) and predictions.dtype == torch.int64
                                            and predictions.dim() == 2 and predictions.shape[1] == 2):
            return "best_predictions: not (true, predicted) class pairs"
        history = state.get("history")
        if not isinstance(history, list) or len(history) != next_epoch or not all(isinstance(m, dict) for m in history):
            return f"history: not {next_epoch} epochs of metrics"
        return None


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


class Trainer:
    """Runs epochs of a resolved `config` (precision, channels_last and workers already decided for the device)."""

    def __init__(self, ctx: Context, config: TrainConfig, preprocessing: Preprocessing, num_classes: int,
                 train_loader, valid_loader, train_bad: BadImageTracker, valid_bad: BadImageTracker,
                 task: MultiClass | MultiLabel | None = None, loss_weights: torch.Tensor | None = None):
        self.ctx, self.config, self.preprocessing, self.num_classes = ctx, config, preprocessing, num_classes
        self.task = task or MultiClass()
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.train_bad, self.valid_bad = train_bad, valid_bad
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.loss_weights = None if loss_weights is None else loss_weights.to(ctx.device)
        self.batch_mix = make_batch_mix(config, num_classes)
        self.recent = collections.deque()  # uint8 training batches kept for BatchNorm re-estimation
        self.bn_images = BN_RECALIBRATION_IMAGES  # how many of them (set per epoch from its size)
        self._next_epoch_batches = None  # (epoch, iterator) started before validation

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # The layout is set on the uint8 batch, a quarter of the float's bytes (a no-op when it already has it).
        return self.preprocessing.normalize(images.contiguous(memory_format=self.memory_format))

    def to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and targets on the device. A batch moves itself there: copied (data.Batch) or
        decoded there (`--decode gpu`: rows that fail to decode leave it, into `batch.failures`)."""
        images, targets = batch.to_device(self.ctx.device)
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
        """The latest uint8 batches (`bn_images` images, less than a batch more), where they already are."""
        if not self.config.bn_recalibration:
            return
        self.recent.append(pixels)
        while sum(len(b) for b in self.recent) - len(self.recent[0]) >= self.bn_images:
            self.recent.popleft()

    def train_epoch(self, state: TrainingState, epoch: int, progress: Silent = Silent(),
                    stop_requested=preemption.never) -> TrainResult:
        """One epoch. Raises Interrupted when a stop was requested on some rank (the epoch is abandoned)."""
        model, config, ctx = state.model, self.config, self.ctx
        model.train()
        # loss x images, correct, images: on the device, read at print steps only.
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
        wait = 0.0
        steps = len(self.train_loader)
        start = tick = time.perf_counter()
        self.recent.clear()
        self.bn_images = bn_recalibration_images(steps * config.batch_size)
        progress.start_epoch(epoch, steps)
        for step, batch in enumerate(self._batches(epoch), start=1):
            wait += time.perf_counter() - tick
            # Single process: the stop flag is checked every step (a Python bool, no sync). DDP ranks agree on it
            # at print steps, together with divergence, so they all stop at the same step.
            if not ctx.distributed and stop_requested():
                raise preemption.Interrupted(epoch)
            pixels, targets = batch.to_device(ctx.device)
            self.train_bad.record(batch.failures)
            # BatchNorm cannot train on one image, and only bad files make batches this small (drop_last): a
            # step with no weight keeps DDP ranks in lockstep without a per-step agreement. (len() of a device
            # tensor is its shape: no sync.)
            weight = 1.0 if len(targets) >= 2 else 0.0
            if weight == 0.0:  # a whole batch of zeros: a compiled model sees no new shape
                pixels = torch.zeros(config.batch_size, 3, config.image_size, config.image_size, dtype=torch.uint8,
                                     device=ctx.device)
                targets = self.task.filler_targets(config.batch_size, self.num_classes, ctx.device)
            else:  # the filler batch is no training image: it stays out of the BatchNorm re-estimation
                self._keep_for_bn(pixels)
            images = self.normalize(pixels)
            mixed_images, mixed_targets = self.batch_mix(images, targets) if self.batch_mix else (images, targets)
            with autocast(ctx.device, config.precision):
                logits = model(mixed_images)
                loss = self.task.loss(logits, mixed_targets, self.loss_weights, config.label_smoothing) * weight
            state.optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.scheduler.step()
            if state.ema is not None:
                state.ema.update_parameters(state.raw_model)
            # In-place adds of device values and Python numbers: kernels only, nothing waits for the GPU.
            sums[0] += loss.detach().double() * len(targets)
            sums[1] += self.task.correct(logits, targets) * weight
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
            raise preemption.Interrupted(epoch)

    def _decode_fallbacks(self) -> float | None:
        """`--decode gpu`: the JPEGs the device decoder has refused so far, over all ranks (at epoch ends only)."""
        if self.config.decode != "gpu":
            return None
        from .gpu_decode import decoder_for

        return self.ctx.all_reduce_sum([decoder_for(self.ctx.device).fallbacks])[0]

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # --compile: one graph, the training step's (fit says why)
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
    @torch.compiler.set_stance("force_eager")  # --compile: one graph, the training step's (fit says why)
    def evaluate(self, model: nn.Module) -> EvalResult:
        """The task's validation metrics (loss and top-1/top-5, or the multi-label ones) over the whole
        validation set, exact over ranks.

        `model` is the bare module, not the DDP wrapper: ranks hold different numbers of validation
        batches, and DDP's forward would run a buffer broadcast per batch. Every rank evaluates
        rank 0's weights (the ones saved), so the result is what one process would measure."""
        self.ctx.broadcast_buffers(model)
        model.eval()
        validation = self.task.validation(self.num_classes, self.ctx.device)
        for batch in self.valid_loader:
            images, targets = self.to_device(batch)
            self.valid_bad.record(batch.failures)
            if len(targets) == 0:
                continue
            with autocast(self.ctx.device, self.config.precision):
                logits = model(images)
            validation.add(logits.float(), targets)
        return EvalResult(**validation.result(self.ctx))

    def fit(self, state: TrainingState, on_epoch_end, progress: Silent = Silent(),
            stop_requested=preemption.never) -> TrainingState:
        """Run epochs from `state.next_epoch`. `on_epoch_end(state, metrics, stopping)` logs and checkpoints.

        `stop_requested()` is this rank's wish to stop (SIGTERM); it is agreed over all ranks during the epoch
        and after every epoch's `on_epoch_end`, and raises Interrupted.

        With `--compile`, only the training step runs compiled (one graph: its batches all have one shape, the
        filler batch included); BatchNorm re-estimation and validation run the same module eagerly."""
        if state.early_stopping.should_stop:  # resumed from the checkpoint of a run that had stopped
            return state
        for epoch in range(state.next_epoch, self.config.epochs):
            started = time.perf_counter()
            fallbacks = self._decode_fallbacks()
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
                seconds=time.perf_counter() - started,
                decode_fallbacks=None if fallbacks is None else int(self._decode_fallbacks() - fallbacks),
                valid_iou=validated.iou, valid_f1_micro=validated.f1_micro, valid_f1_macro=validated.f1_macro,
                valid_map=validated.map, valid_exact_match=validated.exact_match)
            state.history.append(metrics)
            if state.early_stopping.step(epoch, validated.loss, validated.top1 or 0.0):
                state.best_state = cpu_state_dict(model)  # a copy: the live weights keep changing
                # Read at the epoch end, and only when it is the best: no sync in the validation loop.
                if validated.predictions is not None:
                    state.best_predictions = self.ctx.gather_rows(validated.predictions).cpu()
            state.next_epoch = epoch + 1
            stop = self.ctx.broadcast_flag(state.early_stopping.should_stop)
            on_epoch_end(state, metrics, stopping=stop)
            if stop:
                log.info("Early stopping: the validation metric has not improved on epoch %d's for %d epochs.",
                         state.early_stopping.best_epoch + 1, state.early_stopping.bad_epochs)
                break
            if epoch + 1 < self.config.epochs and self.ctx.any_rank(stop_requested())[0]:
                raise preemption.Interrupted(epoch + 1)
        return state
