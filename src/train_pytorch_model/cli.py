"""Command line: `python -m train_pytorch_model <command> ...`.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
this file only wires them together and turns our errors into the one-line stderr contract.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import TrainPyTorchModelError

# command name -> (module, one-line help). Modules import lazily: `--help` stays instant.
COMMANDS = {
    "train": ("train_command", "train a classifier from an untrained model directory and two image directories"),
    "init-model": ("init_model", "write an untrained DenseNet/ResNet model directory (designer's DenseNet/ResNet modules)"),
    "convert": ("convert", "turn an ImageFolder tree, flat folder or archive into an ImageDirectory"),
    "score": ("score", "score an image directory with a trained model directory"),
    "evaluate": ("evaluate", "accuracy, per-class metrics and a confusion matrix from a scored table"),
    "run-component": ("component_runner", "run a component YAML locally, binding inputs like Azure ML does"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train_pytorch_model", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(f"{__package__}.{module_name}")
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except TrainPyTorchModelError as exc:
        # The contract: stderr ends with exactly one line naming the error class.
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
