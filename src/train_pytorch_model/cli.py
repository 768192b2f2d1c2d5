"""Command line: `python -m train_pytorch_model <command> ...`.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int` (train: its
arguments in config.py, its run in train_command.py); this file only wires them together and turns our errors
into the one-line stderr contract. Only the chosen command's modules are imported: `--help` and a mistyped
command never import torch.

Output streams, for every command: progress and log lines go to stderr, the final result summary (what was
written where) to stdout, so `2>/dev/null` leaves just the result.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback

from .config import integer, number
from .errors import ModuleOutOfMemoryError, TrainPyTorchModelError, UnexpectedError, UsageError
from .preemption import Terminated, command_interrupted, install_early_handler

# command name -> (module of its arguments, module of its `run`, one-line help). Modules import lazily: `--help`
# stays instant, and `run`'s module (torch) only once the arguments parsed.
COMMANDS = {
    "train": ("config", "train_command",
              "train a classifier (multi-class or multi-label) from an untrained model directory and "
              "labeled images; validation images optional"),
    "init-model": ("init_model", "init_model", "write an untrained model directory: designer's DenseNet/ResNet or "
                   "any torchvision classification architecture (--model-name)"),
    "convert": ("convert", "convert", "turn any input train reads (folder, table, MLTable, archive, shards) into an "
                "ImageDirectory, an MLTable or Parquet shards"),
    "score": ("score", "score", "score images (a folder, shards, an archive, image files) with a trained model: "
              "parquet + csv, heat maps with --explain"),
    "evaluate": ("evaluate", "evaluate", "metrics, per-class metrics, confusion matrix and report.html from a "
                 "scored table"),
    "export": ("export", "export", "export a trained model directory to ONNX and torch.export (.pt2) for other "
               "runtimes"),
    "run-component": ("component_runner", "component_runner",
                      "run a component YAML locally, binding inputs like Azure ML does"),
}


def program_name() -> str:
    """How the user invoked us: `train-pytorch-model` (the installed script) or `python -m train_pytorch_model`."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m train_pytorch_model" if invoked in ("", "-c", "__main__.py") else invoked


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors ending in the same one-line `<ErrorClass>: <message>` as every error, and one
    strict parser for every `type=int` and `type=float` flag of every command (ASCII digits only: no `1_0`, ` 2 `)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", int, integer)
        self.register("type", float, number)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        error = UsageError(f"{self.prog}: {message}. See `{self.prog} --help`.")
        print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        raise SystemExit(error.exit_code)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command listed; only `command`'s module imported, for its arguments and `run`."""
    parser = ArgumentParser(prog=program_name(), description="Train PyTorch Model: train, score, evaluate and "
                            "export image classifiers; each command's --help lists its flags.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (arguments_module, run_module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(f"{__package__}.{arguments_module}").add_arguments(sub)
            sub.set_defaults(_run_module=f"{__package__}.{run_module}")
    return parser


OPENMP_SPIN_COUNT = "10000"  # see bounded_openmp_spinning


def bounded_openmp_spinning(environ=os.environ) -> None:
    """OpenMP threads waiting at a barrier spin OPENMP_SPIN_COUNT times, then sleep (libgomp's default is 300,000,
    up to ~15 ms of spinning on CPUs with a slow `pause`), unless the user chose (OMP_WAIT_POLICY or
    GOMP_SPINCOUNT set). libgomp reads it once, when torch loads it: call this before torch is imported.

    On a CPU shared with other processes, a spinning thread waits for one that lost its core and burns its own
    time slice meanwhile. benchmarks/omp_wait_policy.py (docs/performance.md) on the 2-core Xeon: 10,000 spins
    train as fast as the default on a quiet machine (1.00x; 1,000 spins and PASSIVE lose 15-28 % there, where
    a thread that slept must be woken for the next parallel region) and 6.6x faster with two other processes
    spinning on the machine (1,000 spins: 9.3x). On a GPU the CPU threads do little math either way."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def configure_logging() -> None:
    """Log lines on stderr; with a UTC timestamp when stderr is a log file (an Azure ML job's std_log.txt),
    bare on a terminal, where the progress bar shows the time."""
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    bounded_openmp_spinning()  # first: before a command's module imports torch
    if argv is None:  # the program itself (the `train-pytorch-model` script): SIGTERM from now on is named
        install_early_handler()
    configure_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        args = build_parser(argv[0] if argv else None).parse_args(argv)
        return int(importlib.import_module(args._run_module).run(args) or 0)
    except TrainPyTorchModelError as exc:
        return report(exc)
    except Terminated:  # SIGTERM before (or outside) a command's own handling: imports, argument checks
        return report(command_interrupted())
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except MemoryError:
        hint = f" (now {args.batch_size})" if isinstance(getattr(args, "batch_size", None), int) else ""
        return report(ModuleOutOfMemoryError(
            f"Memory has been exhausted. Reduce --batch-size{hint} or --image-size, lower --num-workers, "
            "or use a machine with more memory."
        ))
    except Exception as exc:  # the last line must still name an error, whatever happened
        traceback.print_exc()  # above the one-line error, for whoever debugs it
        first_line = (str(exc).splitlines() or [""])[0][:300]
        return report(UnexpectedError(
            f"{type(exc).__name__}: {first_line}. This is not a known input problem; the traceback above shows "
            "where it happened. Please report it with that traceback."
        ))


def report(exc: TrainPyTorchModelError) -> int:
    """The contract: stderr ends with exactly one line naming the error class."""
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return exc.exit_code
