"""Output folders that cannot go wrong (issue 14): no overwrite through `..`, no output inside an input, one
writer at a time, a restart that finds its own finished output, and a full disk that leaves nothing behind.
Real files and real processes throughout."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from train_pytorch_model.errors import OutputDirectoryError
from train_pytorch_model.model_directory import ModelSpec, finished_output, write_legacy_trained_files
from train_pytorch_model.models import Classifier, build_net
from train_pytorch_model.output_folder import check_output_folder, release_output, staged_output
from train_pytorch_model.preprocessing import Preprocessing

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "train_pytorch_model", *args], capture_output=True, text=True,
                          env=env, timeout=300, preexec_fn=preexec_fn)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_dot_dot_into_an_existing_folder_is_not_new(tmp_path):
    existing = tmp_path / "out" / "existing"
    existing.mkdir(parents=True)
    (existing / "model").write_bytes(b"the user's own file")
    sneaky = existing / "new" / ".."
    with pytest.raises(OutputDirectoryError, match="not empty"):
        check_output_folder(sneaky)
    result = run_cli("init-model", "--model-name", "squeezenet1_1", "--untrained-model", str(sneaky))
    assert result.returncode == 1 and last_line(result).startswith("OutputDirectoryError:"), result.stderr
    assert (existing / "model").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in existing.iterdir()) == ["model"]


def test_a_link_to_an_existing_folder_is_that_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputDirectoryError, match="not empty"):
        check_output_folder(tmp_path / "link")


@pytest.mark.parametrize("where", ["equal", "inside", "holding", "inside via .."])
def test_an_output_inside_or_around_an_input_is_refused(tmp_path, where):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    out = {"equal": data, "inside": data / "trained", "holding": tmp_path,
           "inside via ..": tmp_path / "elsewhere" / ".." / "data" / "cat" / "trained"}[where]
    with pytest.raises(OutputDirectoryError, match="input folder"):
        check_output_folder(out, inputs=(tmp_path / "other", data))
    check_output_folder(tmp_path / "trained", inputs=(data, None))  # a sibling is fine
    release_output(tmp_path / "trained")
    assert not (tmp_path / "trained").exists()


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from train_pytorch_model.output_folder import check_output_folder, staged_output
    out, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    check_output_folder(out)          # before "training": takes the lock
    ready.write_text("locked")
    while not go.exists():            # "training"
        time.sleep(0.05)
    with staged_output(out) as stage:
        (stage / "code").mkdir()
        (stage / "code" / "first.py").write_text("first")
        (stage / "_meta.yaml").write_text("type: ModelDirectory\\n")
""")


@pytest.mark.slow
@pytest.mark.parametrize("precreated", [False, True], ids=["new folder", "empty mount point"])
def test_a_second_writer_is_refused_before_it_starts(tmp_path, precreated):
    out = tmp_path / "out"
    if precreated:
        out.mkdir()
    ready, go = tmp_path / "ready", tmp_path / "go"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ready), str(go)],
                              env={**os.environ, "PYTHONPATH": SRC})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the first writer did not start"
            time.sleep(0.05)
        if precreated:  # the whole command, as a second job would run it
            second = run_cli("init-model", "--model-name", "squeezenet1_1", "--untrained-model", str(out))
            assert second.returncode == 1, second.stderr
            assert last_line(second).startswith("OutputDirectoryError:") and "another run" in last_line(second)
        else:  # this test process is the second writer
            with pytest.raises(OutputDirectoryError, match="another run"):
                check_output_folder(out)
            with pytest.raises(OutputDirectoryError, match="another run"):
                with staged_output(out):
                    pass
        go.write_text("go")
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    # Only the first run's files, never mixed, no code/code/.
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["_meta.yaml", "code", "code/first.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out", "ready"]  # no lock file, no stage left
    # And the next writer finds it finished: refused as not empty.
    with pytest.raises(OutputDirectoryError, match="not empty"):
        check_output_folder(out)


def test_the_lock_is_released_after_writing_and_after_a_failure(tmp_path):
    out = tmp_path / "out"
    check_output_folder(out)
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage / "model").write_bytes(b"x")
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with staged_output(out) as stage:  # the lock is free again
        (stage / "model").write_bytes(b"ok")
    assert (out / "model").read_bytes() == b"ok"


def complete_trained_directory(out: Path, run_identity: str | None) -> None:
    classes = ["a", "b"]
    with staged_output(out) as stage:
        write_legacy_trained_files(stage, model=Classifier(build_net("squeezenet1_1", 2)),
                                   spec=ModelSpec("squeezenet1_1"), classes=classes, preprocessing=Preprocessing(),
                                   is_cuda=False, training_schema={}, training_samples=[],
                                   extra_info={"training": {"epochs": 1}}, run_identity=run_identity)
        (stage / "MLmodel").write_text("flavors: {}\n")  # pyfunc writes it; its content is not looked at here


def test_a_restart_finds_its_own_finished_output(tmp_path):
    out = tmp_path / "trained"
    assert not finished_output(out, "run-1")
    complete_trained_directory(out, "run-1")
    info = json.loads((out / "training_info.json").read_text())
    assert info["training"] == {"epochs": 1, "run_identity": "run-1"}
    assert (out / "README.txt").is_file()  # squeezenet is not one of designer's 13
    assert finished_output(out, "run-1")
    assert finished_output(out / "x" / "..", "run-1")
    assert not finished_output(out, "run-2")  # another run's output stays refused
    (out / "MLmodel").unlink()
    assert not finished_output(out, "run-1")  # incomplete: not finished
    (out / "MLmodel").write_text("flavors: {}\n")
    (out / "training_info.json").write_text("{not json")
    assert not finished_output(out, "run-1")


def _small_file_size_limit():
    """Files may grow to 1 MiB; past that a write fails with EFBIG (SIGXFSZ ignored), like a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


@pytest.mark.slow
def test_a_write_that_fails_midway_is_a_named_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "untrained"
    result = run_cli("init-model", "--model-name", "resnet18", "--untrained-model", str(out),
                     preexec_fn=_small_file_size_limit)  # resnet18's `model` file is 45 MB
    assert result.returncode == 1, result.stderr
    line = last_line(result)
    assert line.startswith("OutputDirectoryError:") and "Nothing was written" in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == []
