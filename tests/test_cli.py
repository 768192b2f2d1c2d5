"""The command line: `--help` and argument errors never import torch (each command imports what it needs)."""

from __future__ import annotations

import subprocess
import sys

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


def test_a_command_gets_its_own_arguments():
    result = run("export", "--help")
    assert "--format" in result.stdout and "exit 0" in result.stderr
