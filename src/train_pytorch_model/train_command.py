"""`train`: the job itself, as a story in phases (`train_model`):

    read the data -> build the model -> settle the config -> resume -> fit -> write, log, register

Each phase is one function below, in that order. The input is one `TrainConfig` (config.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, distributed, preemption
from .azureml_v1 import log_epoch_v1
from .config import TrainConfig
from .data import (
    BadImageTracker,
    build_dataset,
    cpus_per_process,
    default_num_workers,
    evaluation_loader,
    training_loader,
)
from .errors import (
    InvalidDatasetError,
    InvalidParameterError,
    ModuleOutOfMemoryError,
    TrainingDivergedError,
    TrainingFailedError,
    TrainPyTorchModelError,
)
from .image_directory import ImageDirectory, load_image_directory, require_labeled
from .model_directory import (
    INFO_FILE,
    ModelSpec,
    finished_output,
    read_untrained_model_directory,
    training_samples,
    write_legacy_trained_files,
)
from .models import Classifier, adapt_to_classes, build_net, preprocessing_defaults, weights_digest
from .output_folder import check_output_folder, overlap, release_output, staged_output
from .preprocessing import Preprocessing
from .progress import Progress, Silent, fit_width, format_seconds
from .registry import check_model_name
from .reports import MOSAIC_CLASSES, MOSAIC_PER_CLASS, TRAINING_FILES, write_training_report
from .shard_data import process_streams
from .tasks import MultiClass, MultiLabel, resolve_task
from .tracking import Tracker, redact
from .train import (
    EarlyStopping,
    EpochMetrics,
    Trainer,
    TrainingState,
    can_compile,
    make_ema,
    make_optimizer,
    make_scaler,
    make_scheduler,
)
from .validation_split import split_validation

log = logging.getLogger("train_pytorch_model")


def run(args: argparse.Namespace) -> int:
    config = TrainConfig.from_args(args)  # validated: a bad value fails before any process group exists
    ctx = distributed.setup(config.device)
    threads = torch.get_num_threads()
    try:
        train_model(config, ctx)
    except TrainPyTorchModelError:
        raise
    except RuntimeError as exc:
        raise translate_runtime_error(exc, config.batch_size) from exc
    except MemoryError as exc:
        raise translate_runtime_error(RuntimeError("out of memory (MemoryError)"), config.batch_size) from exc
    finally:
        torch.set_num_threads(threads)
        # The exception leaving this rank, if any: the other ranks are told instead of left waiting.
        distributed.teardown(ctx, failure=sys.exc_info()[1])
    return 0


def train_model(config: TrainConfig, ctx: distributed.Context) -> dict:
    writer = checkpoint.CheckpointWriter(config.checkpoint_dir if ctx.is_main else None)
    with preemption.StopOnSigterm(lambda: writer.interrupted_error(config.epochs)) as stop_requested:
        check_request(config)  # what needs no data: refused now, not after reading it or hours of training
        seed_everything(config.random_seed)  # before the model's random initialisation
        data = read_data(config, ctx)
        model, spec = build_model(config.untrained_model, len(data.classes))
        config, preprocessing = settle(config, ctx, spec, model, training_images=len(data.train),
                                       task=data.task.name)
        configure_torch(config, ctx)
        # Needed by every run, checkpoint folder or not: the trained model records it, and a restart finds its output.
        training_data, validation_data = checkpoint.data_fingerprints(ctx, data.train, data.valid)
        identity = checkpoint.run_identity(
            model_name=spec.model_name, pretrained=spec.pretrained, classes=data.classes,
            untrained_weights=weights_digest(model.state_dict()),  # other starting weights: another run
            training_data=training_data, validation_data=validation_data, world_size=ctx.world_size,
            hyperparameters=config.identity(), data_streams=training_streams(config, ctx, data))
        if already_written(config, ctx, identity):
            return finish_restart(config, ctx, identity)
        if ctx.is_main:  # now, not after hours of training
            check_output_folder(config.trained_model, inputs=(config.untrained_model, config.training_data,
                                                              config.validation_data, config.checkpoint_dir))
        trainer = make_trainer(config, ctx, data, preprocessing)
        state = make_training_state(model, config, ctx, steps_per_epoch=len(trainer.train_loader))

        params = {**config.as_dict(), "mlflow_tracking_uri": redact(config.mlflow_tracking_uri),
                  "model_name": spec.model_name, "pretrained": spec.pretrained, "num_classes": len(data.classes),
                  "cpu_threads": torch.get_num_threads(), "world_size": ctx.world_size,
                  "training_images": len(data.train), "validation_images": len(data.valid),
                  "run_identity": identity_digest(identity)}
        tracker = Tracker(ctx.is_main, config.mlflow_tracking_uri,
                          run_name=f"train {spec.model_name} {len(data.classes)} classes "
                                   f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}")
        failed = True
        try:
            tracker.log_params(params)
            resume(config, ctx, state, identity, writer)
            state = fit(config, ctx, trainer, state, tracker, writer, identity, stop_requested)
            summary = summarize(state, config, data.task)
            if ctx.is_main:
                write_outputs(config, state, spec, data, preprocessing, params, summary, tracker, ctx)
            ctx.barrier()
            failed = False
            return summary
        finally:
            tracker.close(failed=failed)
            if ctx.is_main:
                release_output(config.trained_model)


# --- 1. read the data, build the model, settle the configuration ------------------------------------------
# (read_data and build_model are below, with the other builders.)

def settle(config: TrainConfig, ctx: distributed.Context, spec: ModelSpec, model: torch.nn.Module,
           training_images: int, task: str | None = None) -> tuple[TrainConfig, Preprocessing]:
    """Decide every `auto` for this device, architecture and data: the returned config says what really runs (it is
    what MLflow, training_info.json and the checkpoint identity record), with the preprocessing it implies.
    (Weight decay depends on the optimizer only: TrainConfig settles it itself.)"""
    if config.precision == "fp16" and ctx.device.type != "cuda":
        raise InvalidParameterError("Precision", "fp16", "fp16 needs a GPU; use bf16 or fp32 on CPU")
    on_gpu = ctx.device.type == "cuda"
    workers = config.num_workers
    defaults = preprocessing_defaults(spec.model_name)  # the architecture's size and normalisation
    image_size = config.image_size or defaults["image_size"]
    if defaults["fixed_size"] and image_size != defaults["image_size"]:
        raise InvalidParameterError("Image size", image_size, f"{spec.model_name} only takes "
                                    f"{defaults['image_size']} pixels (leave --image-size at auto)")
    if image_size < defaults["min_size"]:
        raise InvalidParameterError("Image size", image_size, f"{spec.model_name} needs at least "
                                    f"{defaults['min_size']} pixels")
    config = config.replace(
        device=str(ctx.device),
        precision=resolve_precision(config.precision, ctx.device),
        channels_last=on_gpu if config.channels_last is None else config.channels_last,
        num_workers=default_num_workers(ctx.device, ctx.local_world_size) if workers is None else workers,
        compile=config.compile and can_compile(ctx.device),
        image_size=image_size,
        task=task or config.task,  # read_data decided auto from the labels
        batch_size=trainable_batch_size(config.batch_size, training_images, ctx.world_size, model,
                                        config.training_data),
    )
    preprocessing = Preprocessing(image_size=image_size, mean=tuple(defaults["mean"]), std=tuple(defaults["std"]),
                                  crop_fraction=defaults["image_size"] / defaults["resize_size"],
                                  augmentation=config.augmentation)
    return config, preprocessing


def check_request(config: TrainConfig) -> None:
    """The registered model name (the registry's rules), and the checkpoint folder: written every epoch, so never
    inside the output or an input (a 100 MB file in the training data or the model). An input given as a table
    file stands for its folder, which holds the images."""
    if config.registered_model_name:  # "" registers nothing, as before
        check_model_name(config.registered_model_name)
    if not config.checkpoint_dir:
        return
    for role, path in (("output", config.trained_model), ("untrained model", config.untrained_model),
                       ("training data", config.training_data), ("validation data", config.validation_data)):
        if path is None:  # no --validation-data: split from the training data
            continue
        folder = path.parent if path.is_file() else path
        if overlap(config.checkpoint_dir, folder) in ("is", "is inside"):
            raise InvalidParameterError("Checkpoint dir", str(config.checkpoint_dir),
                                        f"must not be inside the {role} folder '{folder}'")


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (bf16 there is 10-20x slower
    without AVX-512)."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def configure_torch(config: TrainConfig, ctx: distributed.Context) -> None:
    if ctx.device.type == "cpu":
        # Same seed, same bits on CPU. (On GPU, cuDNN autotuning is worth more than bit-equality.)
        torch.use_deterministic_algorithms(True, warn_only=True)
        if config.num_workers:
            # Decoding workers get cores of their own: sharing cores with the model's OpenMP threads stalls
            # those at every barrier (docs/performance.md). run() restores the thread count.
            torch.set_num_threads(max(1, min(torch.get_num_threads(),
                                             cpus_per_process(ctx.local_world_size) - config.num_workers)))
    else:
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --- 2. read the data ------------------------------------------------------------------------------------------

@dataclass
class Data:
    train: ImageDirectory
    valid: ImageDirectory
    classes: list[str]  # the training categories: class i of the model is classes[i]
    task: MultiClass | MultiLabel
    validation_split: dict | None = None  # how the validation images were split off, when none were given


def read_data(config: TrainConfig, ctx: distributed.Context) -> Data:
    columns = dict(image_column=config.image_column, label_column=config.label_column)
    train = load_image_directory(config.training_data, "Training", **columns)
    require_labeled(train, "Training")
    valid = None
    if config.validation_data:
        valid = load_image_directory(config.validation_data, "Validation", **columns)
        require_labeled(valid, "Validation")
    task = resolve_task(config.task, train, valid)
    task.check_config(config)
    train = task.prepare(train, "Training")
    split = None
    if valid is None:
        train, valid, split = split_validation(train, task.stratum(train), config.validation_fraction,
                                               config.random_seed, method=f"stratified ({task.name})")
        if ctx.is_main:
            log.info("No validation data: %d of the training images held out for validation (stratified, seed %d).",
                     split["validation_images"], config.random_seed)
    else:
        valid = task.prepare(valid, "Validation")
    return Data(train, valid, task.classes(train, valid), task, split)


def trainable_batch_size(batch_size: int, training_images: int, world_size: int, model: torch.nn.Module,
                         training_data: Path) -> int:
    """The requested batch size, or fewer when the training data is smaller; refused when it cannot train."""
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_batchnorm and batch_size < 2:
        raise InvalidParameterError("Batch size", batch_size, "must be at least 2: BatchNorm layers cannot train "
                                    "on one image per step")
    per_rank = training_images // world_size
    if batch_size <= per_rank:
        return batch_size
    if per_rank < 2:
        raise InvalidDatasetError(
            f"Training data '{training_data}' has {training_images} images: too few for {world_size} process(es) "
            "(each needs at least 2)."
        )
    log.warning("Batch size %d is larger than the %d training images per process; using %d.",
                batch_size, per_rank, per_rank)
    return per_rank


def identity_digest(identity: dict) -> str:
    """A short fingerprint of the run identity, recorded with the trained model (training.run_identity)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def already_written(config: TrainConfig, ctx: distributed.Context, identity: dict) -> bool:
    """A restarted job (an Azure ML preemption after the model was written) whose own complete output is there:
    nothing to do. Rank 0 looks; every rank gets the answer."""
    done = ctx.is_main and finished_output(config.trained_model, identity_digest(identity))
    done = ctx.broadcast_object(done)
    if done and ctx.is_main:
        print(f"{config.trained_model} already holds the trained model of this run (same inputs and parameters): "
              "nothing to do. To train again, give --trained-model a new folder (and --checkpoint-dir, if any).",
              flush=True)
    return done


def finish_restart(config: TrainConfig, ctx: distributed.Context, identity: dict) -> dict:
    """What a run stopped after writing its model still owes: the registration, when it had not happened."""
    summary = json.loads((config.trained_model / INFO_FILE).read_text())["training"]
    if ctx.is_main and config.registered_model_name:
        from .registry import is_registered
        if not is_registered(config.registered_model_name, identity_digest(identity)):
            summary["registered_version"] = register(config, identity_digest(identity))
    ctx.barrier()
    return summary


# --- 3. build the model, the loaders and the optimizer ------------------------------------------------------

def build_model(untrained_model: Path, num_classes: int) -> tuple[Classifier, ModelSpec]:
    spec, model = read_untrained_model_directory(untrained_model)
    if model is None:
        model = Classifier(build_net(spec.model_name, num_classes, spec.flag_value))
        source = "random initialisation"
    else:
        model = adapt_to_classes(model, num_classes)
        source = "weights from the untrained model directory" + (" (pretrained)" if spec.pretrained else "")
    log.info("Model %s with %d classes, %s.", spec.model_name, num_classes, source)
    return model, spec


def training_streams(config: TrainConfig, ctx: distributed.Context, data: Data) -> int | None:
    """How many streams Parquet shards are read in (the batches depend on it; shard_data.py); None for files."""
    if data.train.shards is None:
        return None
    return process_streams(data.train.shards.rows, config.num_workers, ctx.world_size, config.batch_size, train=True)


def make_trainer(config: TrainConfig, ctx: distributed.Context, data: Data, preprocessing: Preprocessing) -> Trainer:
    class_index = {name: i for i, name in enumerate(data.classes)}
    if config.decode == "gpu" and (data.train.shards is not None or data.valid.shards is not None):
        raise InvalidParameterError("Decode", config.decode, "--decode gpu reads image files; Parquet shards are "
                                    "decoded on the CPU (--decode cpu)")
    if config.decode == "gpu":
        from .gpu_decode import build_gpu_dataset as builder  # workers read bytes; decode_batch decodes on device
    else:
        builder = build_dataset
    train_set = builder(data.train, class_index, preprocessing, train=True, seed=config.random_seed)
    # The validation cache keeps decoded images, so a cached validation set is decoded once, by the CPU path.
    valid_builder = build_dataset if config.cache_validation else builder
    valid_set = valid_builder(data.valid, class_index, preprocessing, train=False, seed=config.random_seed)
    common = dict(rank=ctx.rank, world_size=ctx.world_size, num_workers=config.num_workers, device=ctx.device,
                  local_world_size=ctx.local_world_size)
    train_loader = training_loader(train_set, batch_size=config.batch_size, seed=config.random_seed, **common)
    # No gradients in validation: twice the batch fits in the same memory.
    valid_loader = evaluation_loader(valid_set, batch_size=config.batch_size * 2, cache=config.cache_validation,
                                     **common)
    train_bad = BadImageTracker(data.train, "Training", config.max_bad_image_fraction)
    valid_bad = BadImageTracker(data.valid, "Validation", config.max_bad_image_fraction)
    return Trainer(ctx, config, preprocessing, len(data.classes), train_loader, valid_loader, train_bad, valid_bad,
                   task=data.task, loss_weights=data.task.loss_weights(config, train_set.targets, len(data.classes)))


def make_training_state(model: Classifier, config: TrainConfig, ctx: distributed.Context,
                        steps_per_epoch: int) -> TrainingState:
    model = model.to(ctx.device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    if config.compile:
        model.compile()  # in place: the state-dict keys, so checkpoints and the output, do not change
    wrapped = model
    if ctx.distributed:
        # Buffers are broadcast once before each validation (Trainer.evaluate), not at every step; gradients
        # live in the all-reduce buckets themselves (no copy).
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True)
    lr = config.learning_rate * ctx.world_size  # linear scaling: batch_size is per process
    optimizer = make_optimizer(wrapped, config, lr, ctx.device)
    return TrainingState(wrapped, optimizer, make_scheduler(optimizer, config, steps_per_epoch),
                         make_scaler(ctx.device, config.precision),
                         EarlyStopping(config.patience, config.early_stopping_metric, config.early_stopping_min_epochs),
                         ema=make_ema(model, config.ema_decay))


# --- 4. resume -------------------------------------------------------------------------------------------------

def resume(config: TrainConfig, ctx: distributed.Context, state: TrainingState, identity: dict,
           writer: checkpoint.CheckpointWriter) -> None:
    """Continue from the checkpoint in --checkpoint-dir, if it holds one. Last before fitting: this also puts
    back the RNG states of the epoch boundary."""
    if not config.checkpoint_dir:
        return
    saved = checkpoint.load(config.checkpoint_dir, ctx)
    if saved is None:
        return
    path = config.checkpoint_dir / checkpoint.CHECKPOINT_FILE
    checkpoint.check_compatible(saved, identity, path)
    checkpoint.restore(saved, state, path)
    writer.saved_epochs = state.next_epoch
    if ctx.is_main:
        log.info("Resuming from the checkpoint in %s: %d of %d epochs done.", config.checkpoint_dir,
                 state.next_epoch, config.epochs)


# --- 5. fit ------------------------------------------------------------------------------------------------------

def fit(config: TrainConfig, ctx: distributed.Context, trainer: Trainer, state: TrainingState, tracker: Tracker,
        writer: checkpoint.CheckpointWriter, identity: dict, stop_requested: preemption.StopOnSigterm) -> TrainingState:
    """Every epoch, logged and checkpointed; SIGTERM ends it with TrainingInterruptedError (exit 143)."""
    if ctx.is_main:
        log.info("Training on %s (%d process(es)): %d training and %d validation images, %d classes, batch %d, %s, "
                 "%d workers.", ctx.device, ctx.world_size, len(trainer.train_bad.directory),
                 len(trainer.valid_bad.directory), trainer.num_classes, config.batch_size, config.precision,
                 config.num_workers)

    progress = Progress(config.epochs, config.batch_size, config.print_freq) if ctx.is_main else Silent()

    def on_epoch_end(state: TrainingState, m: EpochMetrics, stopping: bool) -> None:
        if not ctx.is_main:
            return
        best = state.early_stopping.best_epoch + 1 == m.epoch
        log.info("%s", epoch_line(m, config, best, trainer.task))
        tracker.log_metrics(m.as_dict(), step=m.epoch)
        log_epoch_v1(m.epoch, m.as_dict())  # azureml-core v1 run, when one is live
        writer.save(state, identity)

    try:
        with preemption.stopping_cleanly(stop_requested):
            state = trainer.fit(state, on_epoch_end, progress, stop_requested=stop_requested)
    finally:
        progress.close()
    writer.join()
    return state


BEST_BY = {"valid_loss": "lowest valid loss", "valid_top1": "highest valid top-1"}


def epoch_line(m: EpochMetrics, config: TrainConfig, best: bool, task: MultiClass | MultiLabel | None = None) -> str:
    """An epoch's summary, wrapped to the terminal's width."""
    parts = [f"Epoch {m.epoch}/{config.epochs}", f"train loss {m.train_loss:.4f} acc {m.train_accuracy:.1%}",
             (task or MultiClass()).describe(m), f"lr {m.lr:.3g}",
             f"{m.train_images_per_second:.1f} img/s", format_seconds(m.seconds)]
    if best:
        parts.append(f"best so far ({BEST_BY[config.early_stopping_metric]})")
    return fit_width(parts)


def summarize(state: TrainingState, config: TrainConfig, task: MultiClass | MultiLabel) -> dict:
    """Put the best epoch's weights back into the model, and say which epoch that was. A run whose weights or
    losses are not finite writes no model."""
    best_epoch = state.early_stopping.best_epoch + 1
    broken = [k for k, v in (state.best_state or {}).items() if v.is_floating_point() and not v.isfinite().all()]
    if state.best_state is None or broken:
        raise TrainingDivergedError(
            f"Training diverged: no epoch reached a finite validation loss{' with finite weights' if broken else ''} "
            f"({len(broken)} non-finite tensors, e.g. {broken[:3]}). No model was written. Lower --learning-rate "
            f"(now {config.learning_rate:g}), or check the untrained model's weights."
        )
    state.raw_model.load_state_dict(state.best_state)
    return {
        "best_epoch": best_epoch, "epochs_run": len(state.history),
        "best_valid_loss": state.early_stopping.best_loss,
        f"best_{task.primary_metric}": getattr(state.history[best_epoch - 1], task.primary_metric),
        "stopped_early": len(state.history) < config.epochs,
    }


# --- 6. write, log, register -------------------------------------------------------------------------------------

def write_outputs(config: TrainConfig, state: TrainingState, spec: ModelSpec, data: Data,
                  preprocessing: Preprocessing, params: dict, summary: dict, tracker: Tracker,
                  ctx: distributed.Context) -> None:
    write_trained_model(config.trained_model, state.raw_model, spec, data.classes, preprocessing, data.train,
                        is_cuda=ctx.device.type == "cuda", history=state.history, summary=summary, params=params,
                        run_id=tracker.run_id,  # params carry run_identity: a restart finds its own output
                        best_predictions=state.best_predictions, task_info=task_info(data),
                        samples=augmented_samples(data, preprocessing, config.random_seed))
    best = f"best_{data.task.primary_metric}"
    print(f"Trained model written to {config.trained_model}: epoch {summary['best_epoch']} of "
          f"{summary['epochs_run']} run, the one with the {BEST_BY[config.early_stopping_metric]} (valid loss "
          f"{summary['best_valid_loss']:.4f}, {best[len('best_valid_'):]} {summary[best] or 0:.1%}).", flush=True)
    tracker.log_metrics({"best_epoch": summary["best_epoch"], "best_valid_loss": summary["best_valid_loss"],
                         best: summary[best] or 0.0}, step=len(state.history))
    for name in TRAINING_FILES:  # shown on the run's page in `mlflow ui` and Azure ML studio
        if (config.trained_model / name).exists():  # (a multi-label run has no confusion matrix)
            tracker.log_artifact(str(config.trained_model / name))
    if config.registered_model_name:
        summary["registered_version"] = register(config, params["run_identity"])


def register(config: TrainConfig, run_identity: str) -> str:
    from .registry import register_model

    version = register_model(config.trained_model, config.registered_model_name, run_identity)
    print(f"Registered model '{config.registered_model_name}' version {version}.", flush=True)
    return version


def task_info(data: Data) -> dict:
    """What training_info.json says about the task: its name, a multi-label model's threshold, and the
    validation split when one was made."""
    info = {"task": data.task.name}
    if isinstance(data.task, MultiLabel):
        info["threshold"] = data.task.threshold
    if data.validation_split is not None:
        info["validation_split"] = data.validation_split
    return info


def write_trained_model(out: Path, model: Classifier, spec, classes: list[str], preprocessing: Preprocessing,
                        train_dir: ImageDirectory, *, is_cuda: bool, history: list[EpochMetrics], summary: dict,
                        params: dict, run_id: str | None, best_predictions: torch.Tensor | None = None,
                        samples: list[tuple[torch.Tensor, int]] = (), task_info: dict | None = None) -> None:
    from .pyfunc import save_mlflow_model

    task = task_info or {"task": "multiclass"}
    with staged_output(out) as stage:
        schema = train_dir.schema
        write_legacy_trained_files(
            stage, model=model, spec=spec, classes=classes, preprocessing=preprocessing, is_cuda=is_cuda,
            training_schema=schema, training_samples=training_samples(train_dir, schema),
            extra_info={**task, "training": {**params, **summary, "mlflow_run_id": run_id}},
            run_identity=params.get("run_identity"),
        )
        write_training_report(stage, history, summary["best_epoch"], classes, best_predictions, samples)
        save_mlflow_model(stage, classes, metadata={"model_name": spec.model_name, "classes": classes,
                                                    **{k: task[k] for k in ("task", "threshold") if k in task}},
                          examples=train_dir, threshold=task.get("threshold"))


def augmented_samples(data: Data, preprocessing: Preprocessing, seed: int) -> list[tuple[torch.Tensor, int]]:
    """A few training images of each class (the first classes), cropped and flipped as in the first epoch.
    (Multi-label: grouped by each image's rarest label.)"""
    class_index = {name: i for i, name in enumerate(data.classes)}
    dataset = build_dataset(data.train, class_index, preprocessing, train=True, seed=seed)
    rows: dict[int, list[int]] = {}
    for row, target in enumerate(data.task.stratum(data.train)):
        if 0 <= target < MOSAIC_CLASSES and len(rows.setdefault(target, [])) < MOSAIC_PER_CLASS:
            rows[target].append(row)
    samples = []
    for target in sorted(rows):
        for row in rows[target]:
            image, _, _, error = dataset[row]
            if error is None:
                samples.append((image, target))
    return samples


def translate_runtime_error(exc: RuntimeError, batch_size: int) -> TrainPyTorchModelError | RuntimeError:
    text = str(exc).lower()
    if any(s in text for s in ("out of memory", "can't allocate memory", "out of shared memory", "alloc_failed")):
        return ModuleOutOfMemoryError(
            f"Memory has been exhausted ({str(exc).splitlines()[0][:200]}). Reduce --batch-size (now {batch_size}) "
            "or --image-size, or use a machine with more memory."
        )
    if "dataloader worker" in text or "unable to write to file </torch_" in text:  # the latter: /dev/shm is full
        return TrainingFailedError(
            f"An image decoding worker died ({str(exc).splitlines()[0][:200]}). This is usually host memory or "
            "shared memory (/dev/shm) running out: lower --num-workers or --batch-size."
        )
    return exc
