"""`train`: the job itself. Read the three input directories, build the model, fit, write the
trained model directory (legacy ModelDirectory + MLflow model), log and register.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, distributed
from .azureml_v1 import log_epoch_v1
from .data import (BadImageTracker, build_dataset, cpus_per_process, default_num_workers, evaluation_loader,
                   training_loader)
from .errors import (InvalidDatasetError, InvalidParameterError, ModuleOutOfMemoryError, TrainingFailedError,
                     TrainPyTorchModelError)
from .image_directory import ImageDirectory, load_image_directory, require_labeled
from .model_directory import (check_output_folder, read_untrained_model_directory, staged_output, training_samples,
                              write_legacy_trained_files)
from .models import Classifier, adapt_to_classes, build_net
from .preprocessing import AUGMENTATIONS, Preprocessing
from .tracking import Tracker
from .train import (EarlyStopping, EpochMetrics, Hyperparameters, Interrupted, Trainer, TrainingState, compile_model,
                    make_optimizer, make_scaler, make_scheduler)

log = logging.getLogger("train_pytorch_model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("directories")
    io.add_argument("--untrained-model", required=True, type=Path, help="untrained model directory (DenseNet/ResNet)")
    io.add_argument("--training-data", required=True, type=Path, help="labeled training ImageDirectory")
    io.add_argument("--validation-data", required=True, type=Path, help="labeled validation ImageDirectory")
    io.add_argument("--trained-model", required=True, type=Path, help="output folder (new or empty)")
    io.add_argument("--checkpoint-dir", type=Path, default=None,
                    help="folder for the resume checkpoint, written every epoch; when it holds one, training resumes "
                         "from it (same command after a preemption). Give it a new folder per training run")
    p = parser.add_argument_group("designer parameters")
    p.add_argument("--epochs", type=int, default=5, help="maximum number of epochs (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step, per process (default 16)")
    p.add_argument("--learning-rate", type=float, default=0.001, help="peak learning rate (default 0.001)")
    p.add_argument("--random-seed", type=int, default=1, help="seed of every random generator (default 1)")
    p.add_argument("--patience", type=int, default=3,
                   help="stop after this many epochs without a better validation loss; 0 never stops early (default 3)")
    x = parser.add_argument_group("extras")
    x.add_argument("--image-size", type=int, default=224, help="square side images are resized/cropped to (default 224)")
    x.add_argument("--augmentation", choices=AUGMENTATIONS, default="flip_crop",
                   help="training augmentation: random crop + horizontal flip, crop only, or none (default flip_crop)")
    x.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: momentum 0.9, Nesterov, weight decay 1e-4 (the original's); adamw: weight decay 0.05")
    x.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear learning-rate warm-up (default 0)")
    x.add_argument("--num-workers", default="auto", help="image decoding processes per training process (default auto)")
    x.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    x.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 autocast on GPUs that support it, fp16 on older GPUs, fp32 on CPU")
    x.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto",
                   help="NHWC memory format; auto: on GPU only")
    x.add_argument("--compile", choices=("true", "false"), default="false",
                   help="torch.compile the model: faster steps on GPU for long runs, after a compile of a minute "
                        "or more (default false)")
    x.add_argument("--max-bad-image-fraction", type=float, default=0.05,
                   help="unreadable images are skipped with a warning; fail when more than this fraction is bad (default 0.05)")
    x.add_argument("--print-freq", type=int, default=10, help="progress line every N steps (default 10)")
    x.add_argument("--mlflow-tracking-uri", default=None,
                   help="MLflow tracking URI (default: the active run / MLFLOW_TRACKING_URI / sqlite:///mlflow.db)")
    x.add_argument("--registered-model-name", default=None,
                   help="register the trained model under this name in the MLflow model registry")


@dataclass
class Settings:
    """The parsed, validated and resolved parameters of one run."""

    args: argparse.Namespace
    hp: Hyperparameters
    num_workers: int


def _check(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise InvalidParameterError(name, value, rule)


def validate(args: argparse.Namespace, device: torch.device, local_world_size: int = 1) -> Settings:
    _check("Epochs", args.epochs, args.epochs >= 1, "must be an integer >= 1")
    _check("Batch size", args.batch_size, args.batch_size >= 1, "must be an integer >= 1")
    _check("Learning rate", args.learning_rate, math.isfinite(args.learning_rate) and args.learning_rate > 0,
           "must be a finite number > 0")
    _check("Patience", args.patience, args.patience >= 0, "must be an integer >= 0 (0 disables early stopping)")
    _check("Image size", args.image_size, 32 <= args.image_size <= 4096, "must be between 32 and 4096 pixels")
    _check("Warmup epochs", args.warmup_epochs, 0 <= args.warmup_epochs < max(args.epochs, 1) or args.warmup_epochs == 0,
           "must be >= 0 and smaller than epochs")
    _check("Max bad image fraction", args.max_bad_image_fraction,
           math.isfinite(args.max_bad_image_fraction) and 0 <= args.max_bad_image_fraction <= 1, "must be between 0 and 1")
    _check("Print frequency", args.print_freq, args.print_freq >= 1, "must be an integer >= 1")
    if args.num_workers == "auto":
        workers = default_num_workers(device, local_world_size)
    else:
        _check("Num workers", args.num_workers, str(args.num_workers).isdigit(), "must be 'auto' or an integer >= 0")
        workers = int(args.num_workers)
    hp = Hyperparameters(
        epochs=args.epochs, learning_rate=args.learning_rate, patience=args.patience, optimizer=args.optimizer,
        warmup_epochs=args.warmup_epochs, precision=resolve_precision(args.precision, device),
        channels_last=(device.type == "cuda") if args.channels_last == "auto" else args.channels_last == "true",
        compile=args.compile == "true", print_freq=args.print_freq,
    )
    if hp.precision == "fp16" and device.type != "cuda":
        raise InvalidParameterError("Precision", "fp16", "fp16 needs a GPU; use bf16 or fp32 on CPU")
    return Settings(args, hp, workers)


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (bf16 there is 10-20x slower without AVX-512)."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def check_classes(train: ImageDirectory, valid: ImageDirectory) -> list[str]:
    """The class list (training categories by id order) after checking both datasets agree."""
    counts = Counter(train.labels)
    classes = list(train.categories)
    present = [c for i, c in enumerate(classes) if counts.get(i)]
    if len(present) < 2:
        raise InvalidDatasetError(
            f"Training data '{train.root}' has images of {len(present)} class(es) {present}; "
            "a classifier needs at least 2 classes with images."
        )
    empty = [c for i, c in enumerate(classes) if not counts.get(i)]
    if empty:
        log.warning("Training categories without any image (the model can never predict them): %s", empty)
    used = {valid.categories[i] for i in set(valid.labels)}
    extra = sorted(used - set(classes))
    if extra:
        raise InvalidDatasetError(
            f"Validation data '{valid.root}' has categories {extra} that the training data '{train.root}' "
            f"does not have (training categories: {classes[:20]}). Both must use the same category names."
        )
    return classes


def build_model(args, num_classes: int) -> tuple[Classifier, object]:
    spec, model = read_untrained_model_directory(args.untrained_model)
    if model is None:
        model = Classifier(build_net(spec.model_name, num_classes, spec.flag_value))
        source = "random initialisation"
    else:
        model = adapt_to_classes(model, num_classes)
        source = "weights from the untrained model directory" + (" (pretrained)" if spec.pretrained else "")
    log.info("Model %s with %d classes, %s.", spec.model_name, num_classes, source)
    return model, spec


def run(args: argparse.Namespace) -> int:
    ctx = distributed.setup(args.device)
    threads = torch.get_num_threads()
    try:
        train_model(args, ctx)
    except TrainPyTorchModelError:
        raise
    except RuntimeError as exc:
        raise translate_runtime_error(exc, args.batch_size) from exc
    except MemoryError as exc:
        raise translate_runtime_error(RuntimeError("out of memory (MemoryError)"), args.batch_size) from exc
    finally:
        torch.set_num_threads(threads)
        # The exception leaving this rank, if any: the other ranks are told instead of left waiting.
        distributed.teardown(ctx, failure=sys.exc_info()[1])
    return 0


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


def train_model(args: argparse.Namespace, ctx: distributed.Context) -> dict:
    settings = validate(args, ctx.device, ctx.local_world_size)
    if ctx.is_main:
        check_output_folder(args.trained_model)  # now, not after hours of training
    hp = settings.hp
    seed_everything(args.random_seed)
    if ctx.device.type == "cpu":
        # Same seed, same bits on CPU. (On GPU, cuDNN autotuning is worth more than bit-equality.)
        torch.use_deterministic_algorithms(True, warn_only=True)
        if settings.num_workers:
            # Decoding workers get cores of their own: sharing cores with the model's OpenMP threads stalls
            # those at every barrier (docs/performance.md). run() restores the thread count.
            torch.set_num_threads(max(1, min(torch.get_num_threads(),
                                             cpus_per_process(ctx.local_world_size) - settings.num_workers)))
    else:
        torch.backends.cudnn.benchmark = True

    train_dir = load_image_directory(args.training_data, "Training")
    valid_dir = load_image_directory(args.validation_data, "Validation")
    require_labeled(train_dir, "Training")
    require_labeled(valid_dir, "Validation")
    classes = check_classes(train_dir, valid_dir)
    class_index = {name: i for i, name in enumerate(classes)}

    per_rank = len(train_dir) // ctx.world_size
    batch_size = args.batch_size
    if batch_size > per_rank:
        if per_rank < 2:
            raise InvalidDatasetError(
                f"Training data '{train_dir.root}' has {len(train_dir)} images: too few for {ctx.world_size} process(es) "
                "(each needs at least 2)."
            )
        log.warning("Batch size %d is larger than the %d training images per process; using %d.", batch_size, per_rank, per_rank)
        batch_size = per_rank

    model, spec = build_model(args, len(classes))
    preprocessing = Preprocessing(image_size=args.image_size, augmentation=args.augmentation)
    train_set = build_dataset(train_dir, class_index, preprocessing, train=True, seed=args.random_seed)
    valid_set = build_dataset(valid_dir, class_index, preprocessing, train=False, seed=args.random_seed)
    common = dict(rank=ctx.rank, world_size=ctx.world_size, num_workers=settings.num_workers, device=ctx.device)
    train_loader = training_loader(train_set, batch_size=batch_size, seed=args.random_seed, **common)
    # No gradients in validation: twice the batch fits in the same memory.
    valid_loader = evaluation_loader(valid_set, batch_size=batch_size * 2, **common)

    model = model.to(ctx.device, memory_format=torch.channels_last if hp.channels_last else torch.contiguous_format)
    if hp.compile:
        hp.compile = compile_model(model, ctx.device)
    raw_model = model
    if ctx.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    lr = hp.learning_rate * ctx.world_size  # linear scaling: batch_size is per process
    optimizer = make_optimizer(model, hp, lr)
    scheduler = make_scheduler(optimizer, hp, len(train_loader))
    scaler = make_scaler(ctx.device, hp.precision)
    state = TrainingState(model, optimizer, scheduler, scaler, EarlyStopping(hp.patience))

    tracker = Tracker(ctx.is_main, args.mlflow_tracking_uri)
    params = {
        "model_name": spec.model_name, "pretrained": spec.pretrained, "num_classes": len(classes),
        "epochs": hp.epochs, "batch_size": batch_size, "learning_rate": args.learning_rate, "random_seed": args.random_seed,
        "patience": hp.patience, "image_size": args.image_size, "augmentation": args.augmentation,
        "optimizer": hp.optimizer, "warmup_epochs": hp.warmup_epochs, "precision": hp.precision,
        "channels_last": hp.channels_last, "compile": hp.compile, "num_workers": settings.num_workers,
        "cpu_threads": torch.get_num_threads(), "world_size": ctx.world_size,
        "device": str(ctx.device), "training_images": len(train_dir), "validation_images": len(valid_dir),
    }
    tracker.log_params(params)
    identity = resume_from = None
    if args.checkpoint_dir:
        identity = checkpoint.run_identity(
            model_name=spec.model_name, pretrained=spec.pretrained, classes=classes, train_dir=train_dir,
            valid_dir=valid_dir, world_size=ctx.world_size,
            hyperparameters={k: params[k] for k in ("epochs", "batch_size", "learning_rate", "random_seed", "patience",
                                                    "image_size", "augmentation", "optimizer", "warmup_epochs",
                                                    "precision")},
        )
        resume_from = checkpoint.load(args.checkpoint_dir, ctx)
        if resume_from is not None:
            checkpoint.check_compatible(resume_from, identity, args.checkpoint_dir / checkpoint.CHECKPOINT_FILE)
    if ctx.is_main:
        log.info("Training on %s (%d process(es)): %d training and %d validation images, %d classes, batch %d, %s, %d workers.",
                 ctx.device, ctx.world_size, len(train_dir), len(valid_dir), len(classes), batch_size, hp.precision,
                 settings.num_workers)

    def log_progress(epoch, step, steps, loss, ips):
        if ctx.is_main:
            log.info("  epoch %d/%d  step %d/%d  loss %.4f  %.1f img/s", epoch + 1, hp.epochs, step, steps, loss, ips)

    def on_epoch_end(state: TrainingState, m: EpochMetrics, stopping: bool) -> None:
        if not ctx.is_main:
            return
        best = state.early_stopping.best_epoch + 1 == m.epoch
        top5 = f"  top-5 {m.valid_top5:.1%}" if m.valid_top5 is not None else ""
        log.info("Epoch %d/%d  train loss %.4f acc %.1f%%  valid loss %.4f top-1 %.1f%%%s  lr %.3g  %.1f img/s  %.1fs%s",
                 m.epoch, hp.epochs, m.train_loss, 100 * m.train_accuracy, m.valid_loss, 100 * m.valid_top1, top5,
                 m.lr, m.train_images_per_second, m.seconds, "  (best)" if best else "")
        tracker.log_metrics(m.as_dict(), step=m.epoch)
        log_epoch_v1(m.epoch, m.as_dict())  # azureml-core v1 run, when one is live
        if args.checkpoint_dir:
            checkpoint.save(args.checkpoint_dir, state, raw_model, identity)

    train_bad = BadImageTracker(train_dir, "Training", args.max_bad_image_fraction)
    valid_bad = BadImageTracker(valid_dir, "Validation", args.max_bad_image_fraction)
    trainer = Trainer(ctx, hp, preprocessing, len(classes), train_loader, valid_loader, train_bad, valid_bad)
    if resume_from is not None:
        # Last before fitting: this also puts back the RNG states of the epoch boundary.
        checkpoint.restore(resume_from, state, raw_model, args.checkpoint_dir / checkpoint.CHECKPOINT_FILE)
        del resume_from
        if ctx.is_main:
            log.info("Resuming from the checkpoint in %s: %d of %d epochs done.", args.checkpoint_dir,
                     state.next_epoch, hp.epochs)
    failed = True
    try:
        with checkpoint.StopOnSigterm() as stop_requested:
            try:
                state = trainer.fit(state, on_epoch_end, log_progress, should_interrupt=stop_requested)
            except (Interrupted, RuntimeError) as exc:
                # (A SIGTERM to the whole process group also ends the DataLoader workers: a RuntimeError here.)
                if isinstance(exc, RuntimeError) and not stop_requested():
                    raise
                raise checkpoint.interrupted(args.checkpoint_dir, state.next_epoch, hp.epochs,
                                             all_ranks=isinstance(exc, Interrupted)) from None
        if state.best_state is not None:
            raw_model.load_state_dict(state.best_state)
        best_epoch = state.early_stopping.best_epoch + 1
        summary = {
            "best_epoch": best_epoch, "epochs_run": len(state.history),
            "best_valid_loss": state.early_stopping.best_loss,
            "best_valid_top1": state.history[best_epoch - 1].valid_top1 if best_epoch > 0 else None,
            "stopped_early": len(state.history) < hp.epochs,
        }
        if ctx.is_main:
            write_trained_model(args.trained_model, raw_model, spec, classes, preprocessing, train_dir,
                                is_cuda=ctx.device.type == "cuda", history=state.history, summary=summary,
                                params=params, run_id=tracker.run_id)
            log.info("Best epoch %d (validation loss %.4f, top-1 %.1f%%). Trained model written to %s",
                     best_epoch, summary["best_valid_loss"], 100 * (summary["best_valid_top1"] or 0), args.trained_model)
            tracker.log_metrics({"best_epoch": best_epoch, "best_valid_loss": summary["best_valid_loss"],
                                 "best_valid_top1": summary["best_valid_top1"] or 0.0}, step=len(state.history))
            for name in ("metrics.csv", "training_curves.png"):
                tracker.log_artifact(str(Path(args.trained_model) / name))
            if args.registered_model_name:
                from .registry import register_model
                version = register_model(Path(args.trained_model), args.registered_model_name)
                log.info("Registered model '%s' version %s.", args.registered_model_name, version)
                summary["registered_version"] = version
        ctx.barrier()
        failed = False
        return summary
    finally:
        tracker.close(failed=failed)


def write_trained_model(out: Path, model: Classifier, spec, classes: list[str], preprocessing: Preprocessing,
                        train_dir: ImageDirectory, *, is_cuda: bool, history: list[EpochMetrics], summary: dict,
                        params: dict, run_id: str | None) -> None:
    from .pyfunc import save_mlflow_model
    from .reports import plot_training_curves, write_metrics_csv

    with staged_output(out) as stage:
        schema = train_dir.schema
        write_legacy_trained_files(
            stage, model=model, spec=spec, classes=classes, preprocessing=preprocessing, is_cuda=is_cuda,
            training_schema=schema, training_samples=training_samples(train_dir, schema),
            extra_info={"training": {**params, **summary, "mlflow_run_id": run_id}},
        )
        write_metrics_csv(stage / "metrics.csv", history)
        plot_training_curves(stage / "training_curves.png", history)
        save_mlflow_model(stage, classes, metadata={"model_name": spec.model_name, "classes": classes})
