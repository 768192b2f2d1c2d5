"""The GPU check on an offline host (issue 22), proven on this CPU: `GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh`
from a fresh clone + `.whl/`, in a network namespace of its own (`unshare -n`), by a Python that has only what a
typical PyTorch host has.

The simulated host: a venv made from this Python's base interpreter, without system site-packages, whose
site-packages holds links to this venv's builds of HOST_PACKAGES and their dependencies (and pip) — nothing else:
no mlflow, no train_pytorch_model. Same CPython and same package builds as the project's venv, so what it cannot
show is a host with other versions of those packages or another CPython; the wheelhouse itself covers 3.10-3.13.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import wheelhouse  # noqa: E402


def test_the_wheelhouse_brings_mlflow_and_never_torch():
    needed = wheelhouse.wanted()
    assert {"mlflow-skinny", "pydantic", "opentelemetry-api"} <= set(needed)
    assert not {"torch", "torchvision", "triton", "numpy", "pandas", "pillow", "protobuf"} & set(needed)
    assert all(version == metadata.version(name) for name, version in needed.items())  # the tested versions
    if (REPO / ".whl" / "requirements.txt").is_file():  # made here by `make wheelhouse`
        assert sum(f.stat().st_size for f in (REPO / ".whl").iterdir()) <= wheelhouse.MAX_MIB * 2**20
        assert not list((REPO / ".whl").glob("torch-*"))


def host_python(root: Path) -> Path:
    """A Python with only the host's packages (linked from this venv), pip included."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name in [*wheelhouse.closure(wheelhouse.HOST_PACKAGES), "pip"]:
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists() and not top.endswith(".pth"):
                (site / top).symlink_to(source)
    return python


def wheels(tmp_path_factory) -> Path:
    """The repository's .whl/ when `make wheelhouse` made it, else a fresh one (needs PyPI)."""
    if (REPO / ".whl" / "requirements.txt").is_file():
        return REPO / ".whl"
    out = tmp_path_factory.mktemp("wheels") / ".whl"
    assert wheelhouse.main(["--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_the_host_python_lacks_what_the_wheelhouse_brings(tmp_path):
    python = host_python(tmp_path / "host")
    probe = "import torch, torchvision, numpy, PIL, yaml, sklearn, pip; import importlib.util as u; " \
            "print(u.find_spec('mlflow') is None, u.find_spec('train_pytorch_model') is None)"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root for unshare -n")
def test_smoke_check_runs_offline_from_a_fresh_clone_with_the_wheelhouse(tmp_path, tmp_path_factory):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", head.strip()], check=True)
    shutil.copytree(wheels(tmp_path_factory), clone / ".whl")
    python = host_python(tmp_path / "host")
    out = tmp_path / "results"
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "GPU_CHECK_SMOKE": "1",
           "GPU_CHECK_OUT": str(out), "TMPDIR": str(tmp_path), "PYTHON": "python", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["unshare", "-n", "--", "bash", "benchmarks/gpu_check.sh"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["environment.txt", "gpu_check.log", "hazard.md", "logs.txt", "nvidia-smi.txt", "summary.md",
                     "throughput.json"], files
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    environment = (out / "environment.txt").read_text()
    # torch from the host; mlflow from the wheels, installed into the check's private temporary folder
    assert f"torch: {metadata.version('torch')}" in environment
    mlflow_line = next(line for line in environment.splitlines() if line.startswith("mlflow:"))
    assert str(tmp_path) in mlflow_line and "/site/mlflow" in mlflow_line, mlflow_line
    report = json.loads((out / "throughput.json").read_text())
    measured = {r["name"] for r in report["results"]}
    assert any(n.startswith("ceiling") for n in measured) and any("gpu-decode" in n for n in measured) or \
        any("gpu-decode" in n for n, _ in report["skipped"]), (measured, report["skipped"])
    assert any(n.startswith("train") and "cpu-decode" in n for n in measured), measured
    assert not report["failed"], report["failed"]
    summary = (out / "summary.md").read_text()
    assert "| / eager ceiling (same batch) |" in summary and "no CUDA device here, nothing to check" in summary
    assert not list(clone.glob("gpu_check_output")) and not list(tmp_path.glob("gpu_check.*"))  # data: removed
