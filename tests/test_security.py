"""Inputs come from users' storage and the job runs unattended: nothing in an input may run code,
reach outside the input folders, or leak the environment.

Every payload here is real: it would create a marker file if it were executed or imported, and
the tests prove that by running the payload the unsafe way first.
"""

from __future__ import annotations

import importlib
import json
import pickle
import re
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import SHARED_FIXTURES, copy_writable, run_cli, write_image_folder
from train_pytorch_model.cli import main
from train_pytorch_model.data import build_dataset
from train_pytorch_model.errors import InvalidDatasetError, InvalidModelDirectoryError
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.model_directory import (
    ModelSpec,
    read_model_spec,
    read_trained_model_directory,
    read_untrained_model_directory,
    write_legacy_trained_files,
)
from train_pytorch_model.models import Classifier, build_net
from train_pytorch_model.preprocessing import Preprocessing

RESNET18 = SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"
FAST = ["--epochs", "1", "--image-size", "32", "--batch-size", "4", "--num-workers", "0"]



def train_argv(model: Path, train: Path, valid: Path, out: Path) -> list[str]:
    return ["train", "--untrained-model", str(model), "--training-data", str(train), "--validation-data", str(valid),
            "--trained-model", str(out), *FAST]


# --- model_spec.yaml never makes us import anything ---------------------------------------------------------------


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    """An importable module `evil_probe_<id>` that creates a marker file when imported."""
    name = f"evil_probe_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported.marker"
    package_dir = tmp_path / "sitepkgs"
    package_dir.mkdir()
    (package_dir / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass ResNet:\n    pass\nclass DenseNet:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(package_dir))
    return name, marker


def test_probe_module_really_creates_its_marker(probe_module):
    name, marker = probe_module
    importlib.import_module(name)
    assert marker.exists()
    del sys.modules[name]


@pytest.mark.parametrize("module, cls", [
    ("PROBE", "ResNet"), ("PROBE", "DenseNet"), ("PROBE.sub", "ResNet"), ("os", "system"), ("subprocess", "Popen"),
    ("builtins", "eval"),
    ("azureml.designer.modules.dl.pytorch.initialize_models.vision.classification.resnet", "PROBE"),
])
@pytest.mark.slow
def test_model_spec_module_and_class_are_never_imported(tmp_path, probe_module, capsys, module, cls):
    name, marker = probe_module
    model = copy_writable(RESNET18, tmp_path / "model")
    spec = yaml.safe_load((model / "model_spec.yaml").read_text())
    spec["flavor_extras"]["module"] = module.replace("PROBE", name)
    spec["flavor_extras"]["class"] = cls.replace("PROBE", name)
    (model / "model_spec.yaml").write_text(yaml.safe_dump(spec))
    modules_before = set(sys.modules)

    with pytest.raises(InvalidModelDirectoryError, match="nothing named by a file is imported"):
        read_model_spec(model)
    train = write_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    assert main(train_argv(model, train, train, tmp_path / "out")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("InvalidModelDirectoryError: ")

    assert not marker.exists()
    assert name not in sys.modules
    assert not {m for m in set(sys.modules) - modules_before if m.split(".")[0] in (name, "subprocess")}


@pytest.mark.parametrize("where", ["model_spec.yaml", "_meta.yaml"])
def test_yaml_python_tags_are_not_constructed(tmp_path, where):
    marker = tmp_path / "yaml.marker"
    payload = f"!!python/object/apply:builtins.open [{str(marker)!r}, 'w']"
    # The payload is real: the unsafe loader creates the marker.
    yaml.unsafe_load(payload).close()
    assert marker.exists()
    marker.unlink()

    model = copy_writable(RESNET18, tmp_path / "model")
    text = (model / where).read_text()
    key = "flavor" if where == "model_spec.yaml" else "extension"
    (model / where).write_text(text.replace(f"{key}:", f"{key}: {payload}\n_old_{key}:", 1))
    with pytest.raises(InvalidModelDirectoryError, match="is not valid YAML.*python/object/apply"):
        read_model_spec(model)
    assert not marker.exists()


# --- a `model` file carrying a pickle that runs code ---------------------------------------------------------------


class _CreatesMarker:
    """Unpickling this calls open(path, 'w'): a stand-in for any code execution."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_files(marker: Path) -> dict[str, object]:
    torch.manual_seed(0)
    state = Classifier(build_net("resnet18", 2)).state_dict()
    return {
        "pickle-only": _CreatesMarker(str(marker)),
        "inside-a-real-state-dict": {**state, "model.fc.weight": state["model.fc.weight"],
                                     "extra": _CreatesMarker(str(marker))},
        "plain-pickle-file": "PLAIN",
    }


@pytest.mark.parametrize("kind", ["pickle-only", "inside-a-real-state-dict", "plain-pickle-file"])
def test_malicious_pickle_in_untrained_model_is_refused(tmp_path, capsys, kind):
    marker = tmp_path / "pickle.marker"
    payload = _malicious_files(marker)[kind]
    model = copy_writable(RESNET18, tmp_path / "model")
    if payload == "PLAIN":
        (model / "model").write_bytes(pickle.dumps(_CreatesMarker(str(marker))))
    else:
        torch.save(payload, model / "model")

    # The payload is real: loading it the unsafe way creates the marker.
    if payload == "PLAIN":
        pickle.loads((model / "model").read_bytes()).close()
    else:
        loaded = torch.load(model / "model", weights_only=False)
        (loaded if kind == "pickle-only" else loaded["extra"]).close()
    assert marker.exists()
    marker.unlink()

    with pytest.raises(InvalidModelDirectoryError, match="Only plain state dicts"):
        read_untrained_model_directory(model)
    train = write_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    out = tmp_path / "out"
    assert main(train_argv(model, train, train, out)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("InvalidModelDirectoryError: ") and str(model / "model") in last
    if kind != "plain-pickle-file":  # (a bare protocol-4 pickle already fails on its first opcode)
        assert "open was not an allowed global" in last  # names what the pickle tried to call
    assert "weights_only" not in last  # torch's own text suggests weights_only=False: never pass that on
    assert not marker.exists()
    assert not out.exists()


def test_malicious_pickle_in_trained_model_is_refused(tmp_path):
    marker = tmp_path / "pickle.marker"
    out = tmp_path / "trained"
    out.mkdir()
    write_legacy_trained_files(out, model=Classifier(build_net("resnet18", 2)), spec=ModelSpec("resnet18"),
                               classes=["a", "b"], preprocessing=Preprocessing(image_size=32), is_cuda=False,
                               training_schema={}, training_samples=[], extra_info={})
    read_trained_model_directory(out)  # intact: loads
    torch.save(_CreatesMarker(str(marker)), out / "model")
    with pytest.raises(InvalidModelDirectoryError, match="Only plain state dicts"):
        read_trained_model_directory(out)
    assert not marker.exists()


# --- nothing outside the input folder is read ------------------------------------------------------------------


@pytest.fixture
def outside_image(tmp_path) -> Path:
    secret = tmp_path / "elsewhere" / "private.png"
    secret.parent.mkdir()
    Image.new("RGB", (40, 36), (1, 2, 3)).save(secret)
    return secret


def _items(directory):
    dataset = build_dataset(directory, {n: i for i, n in enumerate(directory.categories)}, Preprocessing(image_size=32),
                            train=False, seed=0)
    return {directory.files[i]: dataset[i] for i in range(len(dataset))}


def test_symlinked_files_leading_outside_are_not_read(tmp_path, outside_image):
    train = write_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    (train / "a" / "link-out.png").symlink_to(outside_image)
    (train / "b" / "link-in.png").symlink_to(train / "a" / "0.png")  # inside the folder: fine
    (train / "c").symlink_to(outside_image.parent, target_is_directory=True)  # a class folder outside

    directory = load_image_directory(train, "Training")
    assert "c" not in directory.categories and not any(f.startswith("c/") for f in directory.files)
    items = _items(directory)
    image, _, _, error = items["a/link-out.png"]
    assert image is None and "outside the input folder" in error
    assert items["b/link-in.png"][0] is not None and items["b/link-in.png"][3] is None


def test_images_lst_row_through_a_symlinked_folder_is_not_read(tmp_path, outside_image):
    train = tmp_path / "train"
    (train / "image").mkdir(parents=True)
    for n in range(4):
        Image.new("RGB", (40, 36)).save(train / "image" / f"{n}.png")
    (train / "escape").symlink_to(outside_image.parent, target_is_directory=True)
    rows = [("image/0.png", "a"), ("image/1.png", "a"), ("image/2.png", "b"), ("escape/private.png", "b")]
    schema = load_image_directory(write_image_folder(tmp_path / "tree", {"a": 1, "b": 1})).schema
    (train / "_schema.json").write_text(json.dumps(schema))
    (train / "images.lst").write_text("".join(
        json.dumps({"image_info": {"file_name": f}, "category": c}) + "\n" for f, c in rows))
    directory = load_image_directory(train, "Training")
    image, _, _, error = _items(directory)["escape/private.png"]
    assert image is None and "outside the input folder" in error


def test_image_list_symlinked_outside_is_refused(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    outside = tmp_path / "outside.lst"
    outside.write_text("")
    (train / "_meta.yaml").write_text("type: ImageDirectory\nimage_list: list.lst\n")
    (train / "list.lst").symlink_to(outside)
    with pytest.raises(InvalidDatasetError, match="symlink leading outside the folder"):
        load_image_directory(train, "Training")


def test_training_on_links_out_fails_naming_them(tmp_path, outside_image, capsys):
    train = write_image_folder(tmp_path / "train", {"a": 3})
    (train / "b").mkdir()
    for n in range(3):
        (train / "b" / f"{n}.png").symlink_to(outside_image)
    valid = write_image_folder(tmp_path / "valid", {"a": 2, "b": 2})
    model = copy_writable(RESNET18, tmp_path / "model")
    out = tmp_path / "out"
    assert main(train_argv(model, train, valid, out)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("InvalidDatasetError: ")
    assert re.search(r"'b/\d\.png' \(the path \(or a symlink on it\) leads outside the input folder\)", last), last
    assert not out.exists()


# --- the environment never reaches logs, files or MLflow ------------------------------------------------------------


@pytest.mark.slow
def test_secrets_in_the_environment_are_not_logged_or_saved(tmp_path):
    secrets = {
        "AZUREML_SECRET": f"azml-{uuid.uuid4().hex}",
        "AZURE_CLIENT_SECRET": f"client-{uuid.uuid4().hex}",
        "AZUREML_RUN_TOKEN": f"token-{uuid.uuid4().hex}",
        "MY_DATABASE_PASSWORD": f"pw-{uuid.uuid4().hex}",
    }
    train = write_image_folder(tmp_path / "train", {"a": 4, "b": 4})
    valid = write_image_folder(tmp_path / "valid", {"a": 2, "b": 2}, seed=1)
    out = tmp_path / "out"
    work = tmp_path / "cwd"  # MLflow's default artifact root is relative to the working folder
    work.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(*train_argv(RESNET18, train, valid, out), "--mlflow-tracking-uri", uri,
                     env={**secrets, "MLFLOW_TRACKING_URI": uri}, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "MLmodel").is_file()

    import mlflow
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    recorded = " ".join([*map(str, runs[0].data.params.items()), *map(str, runs[0].data.tags.items())])

    scanned = 0
    for name, value in secrets.items():
        assert value not in result.stdout and value not in result.stderr, name
        assert value not in recorded, name
        for path in tmp_path.rglob("*"):  # the output folder, MLflow's database and artifact store
            if path.is_file() and not path.is_symlink():
                assert value.encode() not in path.read_bytes(), f"{name} found in {path}"
                scanned += 1
    assert scanned > 4 * 20  # the output folder, its code/ copy and the MLflow store were really read


def test_tracking_uri_credentials_never_reach_the_log(caplog, monkeypatch, tmp_path):
    import logging

    from train_pytorch_model.tracking import Tracker, redact

    assert redact("https://user:s3cr3t@mlflow.example.com/?sig=abc&x=1") == "https://***@mlflow.example.com/?sig=***&x=1"
    assert redact(f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    # A real (unreachable) server with credentials in the URI: tracking fails, the secret is not printed.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with caplog.at_level(logging.INFO):
        tracker = Tracker(True, "http://user:s3cr3t@127.0.0.1:9/")
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.close()
    assert "MLflow tracking failed" in caplog.text
    assert "s3cr3t" not in caplog.text
