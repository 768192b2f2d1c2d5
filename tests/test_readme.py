"""The README's commands run as written: every block marked `<!-- readme: run -->` is executed, in order, in a
folder laid out like a clone (the repo's files linked in, `out/` fresh), with this venv as `.venv`.
Every other shell block must say why it is not run (an Azure workspace, CI's own commands)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # processes, servers or long runs: in `make test`, not in `make test-fast`

README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- (?P<marker>[^>]*) -->\n)?```(?P<language>\w+)\n(?P<body>.*?)```", re.S)
LINKED = ("examples", "src", "components", "component.yaml", "deploy", "environment", "pipeline.yml", "sweep.yml")


def blocks():
    return [m.groupdict() for m in BLOCK.finditer(README)]


def test_every_shell_block_is_run_or_says_why_not():
    shell = [b for b in blocks() if b["language"] == "bash"]
    assert len(shell) >= 5
    for block in shell:
        marker = block["marker"] or ""
        assert marker == "readme: run" or marker.startswith("readme: not run ("), block["body"][:200]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(Path(sys.prefix))  # this test's venv, as the README's `.venv`
    return root


def test_the_readme_commands_run_as_written(clone):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}", "OMP_NUM_THREADS": "2"}
    ran = 0
    for block in blocks():
        if block["marker"] != "readme: run":
            continue
        if block["language"] == "bash":
            command = ["bash", "-euo", "pipefail", "-c", block["body"]]
        else:
            command = [str(clone / ".venv" / "bin" / "python"), "-c", block["body"]]
        result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=900,
                                start_new_session=True)
        assert result.returncode == 0, f"{block['body'][:300]}\n--- stderr:\n{result.stderr[-3000:]}"
        ran += 1
    assert ran >= 5
    assert (clone / "out" / "trained_model" / "MLmodel").is_file()
    assert (clone / "out" / "evaluation" / "metrics.json").is_file()
    assert (clone / "out" / "exported" / "model.onnx").is_file()
    assert (clone / "out" / "component_model" / "MLmodel").is_file()
