"""Preemption (preemption.py): SIGTERM ends every command with a named last line and exit 143, from the first
moment `python -m train_pytorch_model` runs (issue 21 item 22)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM now (the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def torch_is_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to see the handler")
def test_sigterm_while_torch_is_imported_ends_with_a_named_error(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "train_pytorch_model", "train", "--untrained-model", str(tmp_path / "m"),
         "--training-data", str(tmp_path / "t"), "--validation-data", str(tmp_path / "v"),
         "--trained-model", str(tmp_path / "out")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 60
    while not catches_sigterm(process.pid):  # the earliest moment a handler can exist
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.001)
    # The handler is there before torch: the signal lands during the imports (or just before them).
    assert not torch_is_loaded(process.pid)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("CommandInterruptedError: SIGTERM stopped the command")
    assert not (tmp_path / "out").exists()
