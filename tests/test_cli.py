"""The command line: `--help` and argument errors never import torch (each command imports what it needs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from train_pytorch_model.cli import COMMANDS

PROBE = r"""
import sys
from train_pytorch_model.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    print("exit", exit.code, file=sys.stderr)
print("pandas imported:", "pandas" in sys.modules)
print("torch imported:", "torch" in sys.modules)
"""


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_without_importing_torch():
    result = run("--help")
    assert "exit 0" in result.stderr
    assert result.stdout.strip().endswith("torch imported: False"), result.stdout
    for name in COMMANDS:
        assert name in result.stdout


def test_usage_errors_do_not_import_torch():
    for argv in ([], ["no-such-command"], ["--bogus"]):
        result = run(*argv)
        assert "exit 2" in result.stderr and result.stderr.strip().splitlines()[-2].startswith("UsageError: ")
        assert result.stdout.strip().endswith("torch imported: False"), (argv, result.stdout)


def test_evaluate_is_torch_free_up_to_its_output():
    """evaluate reads tables only: its arguments, and a bad one, cost no torch (nor pandas) import."""
    result = run("evaluate", "--help")
    assert "--scored-data" in result.stdout and result.stdout.strip().endswith("torch imported: False")
    result = run("evaluate", "--scored-data", "x")
    assert "the following arguments are required: --evaluation" in result.stderr
    assert result.stdout.strip().endswith("torch imported: False")
    assert "pandas imported: False" in result.stdout  # nor pandas: it takes a second on its own


@pytest.mark.slow
def test_a_command_gets_its_own_arguments():
    result = run("export", "--help")
    assert "--format" in result.stdout and "exit 0" in result.stderr


def test_a_mistyped_architecture_gets_the_closest_name_at_once():
    """`init-model --model-name resnet-18` listed 80 names after importing torch: now the closest, torch-free."""
    result = run("init-model", "--model-name", "resnet-18", "--untrained-model", "out")
    last = result.stderr.strip().splitlines()[-2]
    assert last.startswith("UsageError: ") and "did you mean resnet18?" in last and "alexnet" not in last
    assert result.stdout.strip().endswith("torch imported: False")
    assert "did you mean vit_b_16?" in run("init-model", "--model-name", "vit-b16", "--untrained-model", "o").stderr
    several = run("init-model", "--model-name", "mobilenet", "--untrained-model", "o").stderr
    assert "did you mean mobilenet_v2, " in several


def test_init_model_refuses_a_seed_beyond_64_bits_as_a_usage_error():
    for seed in (str(10**25), "10^25", "-1"):
        result = run("init-model", "--model-name", "resnet18", "--untrained-model", "out", "--random-seed", seed)
        assert result.stderr.strip().splitlines()[-2].startswith("UsageError: "), (seed, result.stderr)
        assert "exit 2" in result.stderr and result.stdout.strip().endswith("torch imported: False")


@pytest.mark.slow
def test_every_commands_integer_flags_are_strict():
    """One parser for every `type=int` flag of every command: `1_0`, ` 2 ` and other scripts' digits are refused."""
    for argv in (["score", "--trained-model", "m", "--image-directory", "d", "--scored-data", "s", "--batch-size"],
                 ["train", "--untrained-model", "m", "--training-data", "t", "--validation-data", "v",
                  "--trained-model", "o", "--epochs"]):
        for text in ("1_0", " 2 ", "\u0662"):
            result = run(*argv, text)
            assert "exit 2" in result.stderr and "an integer (digits 0-9)" in result.stderr, (argv, text)
    for text in ("1_0", " 2 ", "\u0662"):  # and every `type=float` flag likewise
        result = run("convert", "--input", "i", "--image-directory", "o", "--max-extracted-gib", text)
        assert "exit 2" in result.stderr and "a number (digits 0-9" in result.stderr, text


def test_usage_names_the_program_as_it_was_invoked(tmp_path):
    """`train-pytorch-model --help` said "usage: python -m train_pytorch_model"."""
    script = tmp_path / "train-pytorch-model"
    script.write_text("import sys\nfrom train_pytorch_model.cli import main\nsys.exit(main())\n")
    assert subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          timeout=120).stdout.startswith("usage: train-pytorch-model ")
    module = subprocess.run([sys.executable, "-m", "train_pytorch_model", "train", "--help"], capture_output=True,
                            text=True, timeout=120).stdout
    assert module.startswith("usage: python -m train_pytorch_model train ")
    assert "(default 5)" in module and "(default auto)" in module  # argparse's %(default)s
    top = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "or any torchvision classification architecture" in " ".join(top.split())


def test_no_help_restates_its_default_as_a_literal():
    """Every command's help says its default through argparse's %(default)s, so it cannot go stale."""
    import argparse
    import re

    from train_pytorch_model.cli import build_parser

    checked = 0
    for command in COMMANDS:
        parser = build_parser(command)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        for action in sub._actions:
            if not action.help or action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
                continue
            checked += 1
            assert not re.search(rf"default:? {re.escape(str(action.default))}\b", action.help), \
                (command, action.dest, action.help)
    assert checked >= 30
