"""Faults on expensive compute: a killed job leaves no partial model, and a dead decoding worker
or exhausted memory ends the run with a named error instead of a hang or a stack dump.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import SHARED_FIXTURES, deadline, write_image_folder
from train_pytorch_model import data as data_module
from train_pytorch_model.cli import main
from train_pytorch_model.errors import InvalidModelDirectoryError
from train_pytorch_model.model_directory import read_trained_model_directory
from train_pytorch_model.models import Classifier

RESNET18 = SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"

# Runs in a subprocess: imports once, then forks one writer per trial and SIGKILLs it after a
# delay spread over (and past) the measured duration of a whole write.
KILL_HELPER = textwrap.dedent(r"""
    import json, os, random, signal, sys, tempfile, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)  # no thread pools to break across fork()
    import matplotlib.pyplot  # imported once, before forking
    import mlflow.pyfunc
    from train_pytorch_model.image_directory import load_image_directory
    from train_pytorch_model.model_directory import read_untrained_model_directory
    from train_pytorch_model.models import Classifier, build_net
    from train_pytorch_model.preprocessing import Preprocessing
    from train_pytorch_model.train import EpochMetrics
    from train_pytorch_model.train_command import write_trained_model

    base, train_path, mode, trials = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    spec, _ = read_untrained_model_directory(sys.argv[5])
    train_dir = load_image_directory(train_path, "Training")
    model = Classifier(build_net("resnet18", 2))
    history = [EpochMetrics(1, 0.001, 0.7, 0.5, 10.0, 0.69, 0.5, None, 0.1, 1.0)]
    summary = {"best_epoch": 1, "epochs_run": 1, "best_valid_loss": 0.69, "best_valid_top1": 0.5,
               "stopped_early": False}

    def write(out):
        if mode == "mounted":  # like an Azure ML output mount: the parent folder is not writable
            real_mkdtemp = tempfile.mkdtemp
            def mkdtemp(*args, dir=None, **kwargs):
                if dir is not None and Path(dir) == out.parent:
                    raise PermissionError(13, "Permission denied")
                return real_mkdtemp(*args, dir=dir, **kwargs)
            tempfile.mkdtemp = mkdtemp
            out.mkdir()
        write_trained_model(out, model, spec, ["a", "b"], Preprocessing(image_size=32), train_dir, is_cuda=False,
                            history=history, summary=summary, params={"epochs": 1}, run_id=None)

    def fork_write(out):
        pid = os.fork()
        if pid == 0:
            try:
                write(out)
            finally:
                os._exit(0)
        return pid

    # A complete write, timed: the kills are spread over this duration.
    start = time.perf_counter()
    os.waitpid(fork_write(base / "reference"), 0)
    duration = time.perf_counter() - start
    print(json.dumps({"duration": duration}), flush=True)
    rng = random.Random(0)
    for trial in range(trials):
        delay = duration * (2.5 * trial / (trials - 1)) * rng.uniform(0.9, 1.1)  # up to well past the end
        pid = fork_write(base / f"out{trial}")
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"trial": trial, "delay": delay, "killed": os.WIFSIGNALED(status)}), flush=True)
""")


def files_below(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def run_kill_trials(tmp_path: Path, mode: str, trials: int) -> tuple[Path, list[dict]]:
    train = write_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    base = tmp_path / "outputs"
    base.mkdir()
    helper = tmp_path / "kill_helper.py"
    helper.write_text(KILL_HELPER)
    result = subprocess.run([sys.executable, str(helper), str(base), str(train), mode, str(trials), str(RESNET18)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return base, reports


def assert_loadable(out: Path) -> None:
    trained = read_trained_model_directory(out)
    assert trained.classes == ["a", "b"] and isinstance(trained.model, Classifier)


@pytest.mark.slow
def test_sigkill_while_writing_leaves_nothing_or_everything(tmp_path):
    base, reports = run_kill_trials(tmp_path, "normal", trials=10)
    reference = files_below(base / "reference")
    assert {"MLmodel", "_meta.yaml", "model", "model_spec.yaml", "training_info.json"} <= reference
    assert_loadable(base / "reference")

    outcomes = {"absent": 0, "complete": 0, "killed mid-write": 0}
    for report in reports[1:]:
        out = base / f"out{report['trial']}"
        staging = list(base.glob(f".{out.name}.partial-*"))
        if out.exists() and any(out.iterdir()):
            assert files_below(out) == reference, f"partial output after a kill at {report['delay']:.3f}s"
            assert_loadable(out)
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
            if staging and any(staging[0].iterdir()):
                outcomes["killed mid-write"] += 1  # the writer died with files staged: none reached `out`
    print("kill outcomes:", outcomes)
    # The kills really spanned the write: some before it ended, some after.
    assert outcomes["killed mid-write"] >= 1 and outcomes["complete"] >= 1, (outcomes, reports)

    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(str(base / "reference"))
    assert model.metadata.metadata["classes"] == ["a", "b"]


@pytest.mark.slow
def test_sigkill_on_a_mounted_output_never_shows_markers_early(tmp_path):
    """Where the output is a mount point (no rename onto it), files move in one by one, `_meta.yaml` and
    `MLmodel` last: a folder with a marker is complete for that reader; without one, readers see no model."""
    base, reports = run_kill_trials(tmp_path, "mounted", trials=10)
    reference = files_below(base / "reference")
    legacy = reference - {"MLmodel"}
    for report in reports[1:]:
        out = base / f"out{report['trial']}"
        visible = {f for f in files_below(out) if not f.startswith(".partial-")} if out.exists() else set()
        if "_meta.yaml" in visible:
            assert legacy - {"_meta.yaml"} <= visible, "_meta.yaml arrived before the rest"
            assert_loadable(out)
        if "MLmodel" in visible:
            assert visible == reference, "MLmodel arrived before the rest"
        if visible and "_meta.yaml" not in visible:  # files without the marker: no reader takes it for a model
            with pytest.raises(InvalidModelDirectoryError):
                read_trained_model_directory(out)
    assert any((base / f"out{r['trial']}" / "MLmodel").exists() for r in reports[1:]), reports

    # Our leftover staging folder does not block the next run into the same (mounted) folder.
    from train_pytorch_model.output_folder import check_output_folder, staged_output
    stale = base / "rerun"
    (stale / ".partial-left-by-a-killed-run").mkdir(parents=True)
    check_output_folder(stale, inputs=())
    with staged_output(stale) as stage:
        (stage / "_meta.yaml").write_text("type: ModelDirectory\n")
    assert sorted(p.name for p in stale.iterdir()) == ["_meta.yaml"]


# --- a DataLoader worker that dies, memory that runs out ----------------------------------------------------------


def _train_argv(tmp_path: Path, *extra: str) -> list[str]:
    train = write_image_folder(tmp_path / "train", {"a": 4, "b": 4})
    valid = write_image_folder(tmp_path / "valid", {"a": 2, "b": 2}, seed=1)
    return ["train", "--untrained-model", str(RESNET18), "--training-data", str(train), "--validation-data", str(valid),
            "--trained-model", str(tmp_path / "out"), "--epochs", "1", "--image-size", "32", "--batch-size", "4",
            *extra]


@pytest.mark.slow
@pytest.mark.parametrize("death", ["exit", "sigkill"])
def test_dead_decoding_worker_is_a_named_error_not_a_hang(tmp_path, capsys, monkeypatch, death):
    real_item = data_module.decoded_item  # every training image goes through it, whichever transform decodes

    def decode_then_die(dataset, source, *args, **kwargs):
        if Path(source).name == "2.png":  # a worker process meets this file and dies (OOM killer, segfault...)
            if death == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_item(dataset, source, *args, **kwargs)

    monkeypatch.setattr(data_module, "decoded_item", decode_then_die)  # inherited by forked workers
    with deadline(240):
        code = main(_train_argv(tmp_path, "--num-workers", "1"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("TrainingFailedError: An image decoding worker died"), err[-3000:]
    assert "--num-workers" in last and "--batch-size" in last
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["allocator", "MemoryError"])
def test_out_of_memory_is_a_named_error_with_the_batch_size_hint(tmp_path, capsys, monkeypatch, kind):
    real_forward = Classifier.forward

    def forward_needing_too_much(self, x):
        if self.training:  # a real failed allocation: far more than any machine has
            if kind == "allocator":
                torch.empty(2**62, dtype=torch.uint8)
            else:
                bytearray(2**62)
        return real_forward(self, x)

    monkeypatch.setattr(Classifier, "forward", forward_needing_too_much)
    code = main(_train_argv(tmp_path, "--num-workers", "0"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("ModuleOutOfMemoryError: Memory has been exhausted"), err[-3000:]
    assert "Reduce --batch-size (now 4)" in last
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA out-of-memory needs a GPU")
def test_cuda_out_of_memory_is_a_named_error(tmp_path, capsys, monkeypatch):
    real_forward = Classifier.forward

    def forward_needing_too_much(self, x):
        if self.training:
            torch.empty(2**50, dtype=torch.uint8, device=x.device)  # 1 PiB
        return real_forward(self, x)

    monkeypatch.setattr(Classifier, "forward", forward_needing_too_much)
    code = main(_train_argv(tmp_path, "--num-workers", "0", "--device", "cuda"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("ModuleOutOfMemoryError: ") and "--batch-size (now 4)" in last
    assert not (tmp_path / "out").exists()


def test_unexpected_exception_still_ends_with_one_named_line(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("no such thing")

    monkeypatch.setattr("train_pytorch_model.train_command.resolve_task", broken)
    code = main(_train_argv(tmp_path, "--num-workers", "0"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("UnexpectedError: KeyError: 'no such thing'."), err[-2000:]
    assert "Traceback (most recent call last)" in err  # kept above, for whoever debugs it
    assert not (tmp_path / "out").exists()
