"""Shared test fixtures: the legacy fixtures bundled in examples/, and small generated image folders."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO / "examples"  # the designer fixtures, bundled so a lone clone passes
RESNET18 = SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"
# train's flags for a run of seconds on this CPU: tests add --epochs, --batch-size etc. as they need.
FAST_TRAIN = ("--image-size", "32", "--num-workers", "0")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (closed again: a server or a refusal test takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(argv: list[str], health_path: str, port: int, log_path: Path, *, env: dict | None = None,
                   cwd: Path | None = None, timeout_s: float = 180):
    """Start a server process (its own session), wait until `health_path` answers 200, yield its URL, then stop
    the whole process group. The log's tail is in every failure message."""
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.poll() is None, f"{argv[:4]} exited: {log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}{health_path}", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no {health_path} in {timeout_s}s: {log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, 15)  # the server and its workers
        process.wait(timeout=30)


def post_json(url: str, body, content_type: str = "application/json") -> tuple[int, object]:
    """POST a JSON body (or raw bytes) to a test server: (HTTP status, decoded JSON answer), errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Fail (instead of hanging the suite) if the block takes longer than `seconds`: a read that blocks on a
    FIFO, a worker that never answers."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds}s: a hang")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def copy_writable(src: Path, dst: Path) -> Path:
    """copytree without the fixtures' read-only modes."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for folder, _, _ in os.walk(dst):
        os.chmod(folder, 0o755)
    return dst


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test logs to its own sqlite store and runs in its own folder (MLflow puts artifacts in ./mlruns)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the process-wide setting too: an earlier in-process run may have changed it
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield
    while mlflow.active_run():  # a test that failed mid-run must not leave its run open for the next
        mlflow.end_run()


@pytest.fixture
def shared_fixtures() -> Path:
    return SHARED_FIXTURES


@pytest.fixture
def legacy_image_dir() -> Path:
    return SHARED_FIXTURES / "legacy_image_directory"


@pytest.fixture
def resnet18_dir() -> Path:
    return SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"


@pytest.fixture
def densenet121_dir() -> Path:
    return SHARED_FIXTURES / "legacy_untrained_model" / "densenet121"


def class_pattern(label: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An easy-to-learn image: class k is a bright band in position k, plus noise."""
    w, h = size
    pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    band = h // 4
    top = (label * band) % max(1, h - band)
    pixels[top:top + band, :, label % 3] = 230
    return pixels


def write_image_folder(root: Path, classes: dict[str, int], size=(40, 36), suffix=".png", seed=0) -> Path:
    """An ImageFolder tree `<class>/<n><suffix>` with `classes[name]` images each."""
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(count):
            Image.fromarray(class_pattern(label, size, rng)).save(folder / f"{n}{suffix}")
    return root


@pytest.fixture
def make_image_folder(tmp_path):
    """Factory: make_image_folder("train", {"a": 6, "b": 6}, size=(40, 36), suffix=".png")."""
    def make(name: str, classes: dict[str, int], **kwargs) -> Path:
        return write_image_folder(tmp_path / name, classes, **kwargs)
    return make


MULTILABEL_CLASSES = ("can", "carton", "milk_bottle", "water_bottle")  # AutoML's multi-label fridge objects


def write_multilabel_mltable(root: Path, count: int = 16, size=(32, 32), seed=0) -> Path:
    """An MLTable folder in AutoML's multi-label shape: `images/<n>.png`, and JSON Lines rows
    `{"image_url": "images/<n>.png", "label": ["can", "milk_bottle"]}`. Class k draws band k; every class has
    images, and some images have one label, some several, one none."""
    from train_pytorch_model.tables import write_mltable

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(count):
        labels = [k for k in range(len(MULTILABEL_CLASSES)) if (n >> k) & 1 or n % len(MULTILABEL_CLASSES) == k]
        labels = [] if n == count - 1 else labels
        pixels = rng.integers(0, 40, size=(size[1], size[0], 3), dtype=np.uint8)
        band = size[1] // len(MULTILABEL_CLASSES)
        for k in labels:
            pixels[k * band:(k + 1) * band, :, k % 3] = 230
        Image.fromarray(pixels).save(root / "images" / f"{n}.png")
        rows.append((f"images/{n}.png", [MULTILABEL_CLASSES[k] for k in labels]))
    write_mltable(root, iter(rows))
    return root


def train_tiny_model(root: Path, classes=("cat", "dog", "fox")) -> Path:
    """A trained model directory in seconds: resnet18, 32 px, 1 epoch on generated images, its own MLflow store."""
    from train_pytorch_model.cli import main

    data = write_image_folder(root / "images", {name: 3 for name in classes})
    out = root / "trained"
    assert main(["train", "--untrained-model", str(SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"),
                 "--training-data", str(data), "--validation-data", str(data), "--trained-model", str(out),
                 "--image-size", "32", "--epochs", "1", "--batch-size", "9", "--num-workers", "0",
                 "--mlflow-tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]) == 0
    return out


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m train_pytorch_model ...` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "train_pytorch_model", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or os.getcwd(), timeout=600)


@pytest.fixture
def cli():
    return run_cli
