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
        check_output_folder(sneaky, inputs=())
    result = run_cli("init-model", "--model-name", "squeezenet1_1", "--untrained-model", str(sneaky))
    assert result.returncode == 1 and last_line(result).startswith("OutputDirectoryError:"), result.stderr
    assert (existing / "model").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in existing.iterdir()) == ["model"]


def test_a_link_to_an_existing_folder_is_that_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputDirectoryError, match="not empty"):
        check_output_folder(tmp_path / "link", inputs=())


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
    check_output_folder(out, inputs=())          # before "training": takes the lock
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
                check_output_folder(out, inputs=())
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
        check_output_folder(out, inputs=())


def test_the_lock_is_released_after_writing_and_after_a_failure(tmp_path):
    out = tmp_path / "out"
    check_output_folder(out, inputs=())
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


# --- issue 21: an interrupted publication into a mounted output is ours, refused by readers, redone ---------------

CROSS_DEVICE_WRITER = textwrap.dedent("""
    import errno, os, signal, sys, threading
    from pathlib import Path
    from train_pytorch_model.output_folder import staged_output

    out, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    real_rename, real_replace = os.rename, os.replace

    def inside(path):
        return Path(path) == out or out in Path(path).parents

    def cross_device(move):  # the staging folder is on another file system than `out` (an Azure ML mount)
        def moved(source, target, *args, **kwargs):
            if inside(target) and not inside(source):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return move(source, target, *args, **kwargs)
        return moved

    def kill_when_entries_appear():  # killed as a preempted node is, once `kill_at` entries are visible
        while len(os.listdir(out)) < kill_at:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    os.rename, os.replace = cross_device(real_rename), cross_device(real_replace)
    with staged_output(out) as stage:
        for name in ("model", "training_info.json", "model_spec.yaml", "_samples.json"):
            (stage / name).write_bytes(os.urandom(8 << 20))
        (stage / "_meta.yaml").write_text("type: ModelDirectory\\n")
        (stage / "MLmodel").write_text("flavors: {}\\n")
        threading.Thread(target=kill_when_entries_appear, daemon=True).start()
    print("published")
""")


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 3])
def test_a_publication_killed_midway_across_file_systems_is_refused_then_redone(tmp_path, kill_after):
    from train_pytorch_model.errors import InvalidModelDirectoryError
    from train_pytorch_model.model_directory import read_trained_model_directory
    from train_pytorch_model.output_folder import JOURNAL

    out = tmp_path / "mounted"
    out.mkdir()
    killed = subprocess.run([sys.executable, "-c", CROSS_DEVICE_WRITER, str(out), str(kill_after)],
                            env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    visible = sorted(p.name for p in out.iterdir())
    assert JOURNAL in visible and "_meta.yaml" not in visible and "MLmodel" not in visible, visible
    # Never a partial file under a result's name: each copied entry arrives whole, renamed into place.
    for name in ("model", "training_info.json", "model_spec.yaml", "_samples.json"):
        if name in visible:
            assert (out / name).stat().st_size == 8 << 20
    with pytest.raises(InvalidModelDirectoryError, match="incomplete: the run writing it was stopped"):
        read_trained_model_directory(out)
    assert not finished_output(out, "any run")

    # The same command again: the leftovers are recognised as ours, removed, and the output written whole.
    with staged_output(out) as stage:
        (stage / "model").write_bytes(b"weights")
        (stage / "_meta.yaml").write_text("type: ModelDirectory\n")
    assert sorted(p.name for p in out.iterdir()) == ["_meta.yaml", "model"]


def test_a_publication_stopped_by_sigterm_takes_back_what_it_moved_in(tmp_path, monkeypatch):
    from train_pytorch_model import output_folder
    from train_pytorch_model.preemption import Terminated

    out = tmp_path / "mounted"
    out.mkdir()
    real_rename = os.rename
    moved = []

    def rename(source, target):
        real_rename(source, target)
        if Path(target).parent == out and not Path(target).name.startswith(".partial-"):
            moved.append(target)
            if len(moved) == 2:
                raise Terminated()  # what the SIGTERM handler raises between two moves

    monkeypatch.setattr(output_folder.tempfile, "mkdtemp", _mkdtemp_not_beside(out))
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Terminated):
        with staged_output(out) as stage:
            for name in ("a", "b", "c", "_meta.yaml"):
                (stage / name).write_text(name)
    assert list(out.iterdir()) == []  # nothing of this run is left, not even its journal
    assert not list(tmp_path.glob(".*"))


def _mkdtemp_not_beside(out: Path):
    """An output whose parent is not writable (an Azure ML mount): staged inside it."""
    import tempfile
    real = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out.parent:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)
    return mkdtemp


def test_a_foreign_journal_or_a_name_it_does_not_list_keeps_the_output_refused(tmp_path):
    from train_pytorch_model.output_folder import JOURNAL

    out = tmp_path / "out"
    out.mkdir()
    (out / "model").write_text("the user's")
    (out / JOURNAL).write_text(json.dumps({"written_by": "someone else", "entries": ["model"]}))
    with pytest.raises(OutputDirectoryError, match="not empty"):
        check_output_folder(out, inputs=())
    (out / JOURNAL).write_text(json.dumps({"written_by": "train_pytorch_model publication", "entries": ["other"]}))
    with pytest.raises(OutputDirectoryError, match="not empty"):
        check_output_folder(out, inputs=())
    (out / JOURNAL).write_text(json.dumps({"written_by": "train_pytorch_model publication",
                                           "entries": ["../keep", "model/../../keep"]}))
    (tmp_path / "keep").write_text("mine")
    with pytest.raises(OutputDirectoryError, match="not empty"):
        check_output_folder(out, inputs=())
    assert (out / "model").read_text() == "the user's" and (tmp_path / "keep").read_text() == "mine"


def mount_tmpfs(folder: Path) -> None:
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode(errors='replace').strip()})")


def train_into(out: Path, train_dir: Path, *extra: str) -> subprocess.Popen:
    from conftest import FAST_TRAIN, RESNET18
    return subprocess.Popen(
        [sys.executable, "-m", "train_pytorch_model", "train", "--untrained-model", str(RESNET18),
         "--training-data", str(train_dir), "--validation-data", str(train_dir), "--trained-model", str(out),
         *FAST_TRAIN, "--epochs", "1", "--batch-size", "4", *extra],
        env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def signal_when(process: subprocess.Popen, seen, signum: int) -> str:
    deadline = time.monotonic() + 240
    while not seen():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.001)
    process.send_signal(signum)
    return process.communicate(timeout=120)[1]


@pytest.mark.slow
@pytest.mark.parametrize("signum, moment", [(signal.SIGKILL, "first entry"), (signal.SIGTERM, "model staged")])
def test_a_preempted_write_into_a_mounted_output_finishes_on_the_rerun(tmp_path, make_image_folder, signum, moment):
    """The Azure ML case for real: the output is a mount point (tmpfs) whose parent is writable. Killed at the
    moment its first entry appears (or stopped by SIGTERM once the weights are staged), the same command
    again must finish, and nothing partial ever reads as a model."""
    from train_pytorch_model.errors import DirectoryEmptyError, InvalidModelDirectoryError
    from train_pytorch_model.model_directory import read_trained_model_directory

    train_dir = make_image_folder("train", {"a": 4, "b": 4})
    out = tmp_path / "mounted"
    mount_tmpfs(out)
    try:
        def seen() -> bool:
            entries = list(out.iterdir())
            if moment == "first entry":
                return bool(entries)
            return any((entry / "model").exists() for entry in entries if entry.is_dir())

        stderr = signal_when(train_into(out, train_dir), seen, signum)
        if signum == signal.SIGTERM:
            assert stderr.strip().splitlines()[-1].startswith("TrainingInterruptedError: "), stderr[-2000:]
        with pytest.raises((InvalidModelDirectoryError, DirectoryEmptyError)):  # nothing partial reads as a model
            read_trained_model_directory(out)
        rerun = train_into(out, train_dir)
        _, stderr = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, stderr[-3000:]
        trained = read_trained_model_directory(out)
        assert trained.classes == ["a", "b"]
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(out)], check=False)


# --- issue 21: every command refuses an output inside its own input (one check: reserved_output) ------------------

@pytest.mark.parametrize("command", ["score", "convert", "export", "evaluate"])
def test_every_command_refuses_an_output_inside_its_own_input(tmp_path, command, capsys):
    from train_pytorch_model.cli import main

    given = tmp_path / "input"
    (given / "sub").mkdir(parents=True)
    (given / "sub" / "file.png").write_bytes(b"x")
    out = given / "sub" / "result"
    args = {"score": ["score", "--trained-model", str(given), "--image-directory", str(given / "sub"),
                      "--scored-data", str(out)],
            "convert": ["convert", "--input", str(given), "--image-directory", str(out)],
            "export": ["export", "--trained-model", str(given), "--exported-model", str(out), "--format", "pt2"],
            "evaluate": ["evaluate", "--scored-data", str(given), "--evaluation", str(out)]}[command]
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("OutputDirectoryError: ") and "is inside the input folder" in last, last
    assert not out.exists() and sorted(p.name for p in (given / "sub").iterdir()) == ["file.png"]


# --- issue 21: a user's own `.<output>.lock` beside the output is never deleted -------------------------------------

def test_a_users_lock_named_file_beside_the_output_is_kept_ours_is_removed(tmp_path):
    from train_pytorch_model.output_folder import LOCK_SIGNATURE

    out = tmp_path / "trained"
    users = tmp_path / ".trained.lock"
    users.write_text("my notes about the run")
    with staged_output(out) as stage:
        (stage / "model").write_bytes(b"w")
    assert users.read_text() == "my notes about the run"

    users.unlink()
    (tmp_path / ".again.lock").write_bytes(LOCK_SIGNATURE)  # left by a killed run of ours
    with staged_output(tmp_path / "again") as stage:
        (stage / "model").write_bytes(b"w")
    assert not (tmp_path / ".again.lock").exists()
    with staged_output(tmp_path / "third") as stage:  # and the lock file we create goes too
        (stage / "model").write_bytes(b"w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "third", "trained"]
