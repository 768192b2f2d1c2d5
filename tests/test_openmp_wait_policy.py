"""CPU training on a shared machine: OpenMP threads spin briefly at barriers, then sleep (issue 22), set before
torch loads OpenMP; a user's own setting wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_pytorch_model.cli import bounded_openmp_spinning

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI on a command that imports torch and then fails on its input; reports the policy in the environment
# at the moment torch is first imported.
PROBE = """
import builtins, os, sys
real_import = builtins.__import__
def spy(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        print("at torch import:", os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), flush=True)
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
from train_pytorch_model import cli
cli.main(["train", "--untrained-model", "missing", "--training-data", "missing", "--validation-data", "missing",
          "--trained-model", "out"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("user, expected", [({}, "None 10000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),
                                            ({"GOMP_SPINCOUNT": "5"}, "None 5")])
def test_the_spin_count_is_set_before_torch_loads_and_a_users_own_wins(tmp_path, user, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(REPO / "src")
    env.update(user)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.splitlines()[0] == f"at torch import: {expected}", done.stdout + done.stderr
    assert "Error" in done.stderr.strip().splitlines()[-1]  # it went on to the command (missing inputs)


def test_a_users_spin_count_or_policy_is_left_alone():
    assert bounded_openmp_spinning(env := {}) is None and env == {"GOMP_SPINCOUNT": "10000"}
    for mine in ({"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": "3000"}):
        env = dict(mine)
        bounded_openmp_spinning(env)
        assert env == mine
