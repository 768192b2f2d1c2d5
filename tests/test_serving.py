"""A trained model served by a real `mlflow models serve` process on 127.0.0.1: every request format."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.models import Model
from PIL import Image

from conftest import REPO, free_port, post_json, running_server, train_tiny_model, write_image_folder
from train_pytorch_model.pyfunc import _load_pyfunc

pytestmark = pytest.mark.slow  # processes, servers or long runs: in `make test`, not in `make test-fast`

REQUESTS = REPO / "deploy" / "requests"
CLASSES = ["cat", "dog", "fox"]
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    out = train_tiny_model(root, CLASSES)
    # sweep.yml's primary metric is a per-epoch metric this training run really logged.
    run_id = json.loads((out / "training_info.json").read_text())["training"]["mlflow_run_id"]
    history = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_metric_history(run_id, "valid_top1")
    assert [m.step for m in history] == [1]
    return out


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """One server for the module: it takes seconds to start."""
    yield from serve(trained, tmp_path_factory)


def serve(model: Path, tmp_path_factory):
    """`mlflow models serve` of `model` on a free port; yields its URL. The venv's bin goes first on PATH, where
    MLflow looks for `uvicorn`."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port)]
    with running_server(argv, "/ping", port, tmp_path_factory.mktemp("serve-log") / "serve.log", env=env,
                        timeout_s=START_TIMEOUT_S) as url:
        yield url


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    return post_json(f"{url}/invocations", body, content_type)


@pytest.fixture(scope="module")
def images(trained) -> list[bytes]:
    root = write_image_folder(trained.parent / "requests", {name: 1 for name in CLASSES}, seed=7)
    return [next((root / name).iterdir()).read_bytes() for name in CLASSES]


@pytest.fixture(scope="module")
def expected(trained, images) -> pd.DataFrame:
    """The in-process answer for the same images: what the server must return."""
    return mlflow.pyfunc.load_model(str(trained)).predict(pd.DataFrame({"image": images}))


def b64(images: list[bytes]) -> list[str]:
    return [base64.b64encode(image).decode() for image in images]


def check_predictions(answer: dict, expected: pd.DataFrame) -> None:
    predictions = pd.DataFrame(answer["predictions"])
    assert list(predictions["Scored Labels"]) == list(expected["Scored Labels"])
    columns = [f"Scored Probabilities_{c}" for c in CLASSES]
    assert (predictions[columns] - expected[columns]).abs().to_numpy().max() < 1e-6


def test_every_mlflow_request_format_is_answered(server, images, expected):
    texts = b64(images)
    bodies = {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[t] for t in texts]}},
        "dataframe_records": {"dataframe_records": [{"image": t} for t in texts]},
        "inputs (columns)": {"inputs": {"image": texts}},
        "inputs (list)": {"inputs": texts},
        "instances": {"instances": [{"image": t} for t in texts]},
    }
    for name, body in bodies.items():
        status, answer = post(server, body)
        assert status == 200, (name, answer)
        check_predictions(answer, expected)
    status, answer = post(server, ("image\n" + "\n".join(texts) + "\n").encode(), "text/csv")
    assert status == 200, answer
    check_predictions(answer, expected)


def test_azure_ml_input_data_and_the_sample_requests(server, trained):
    """deploy/requests/: the MLflow bodies as they are; Azure ML's `input_data` is a split DataFrame, which
    its MLflow server hands over as such: posted here as `dataframe_split`, and given to predict directly."""
    model = mlflow.pyfunc.load_model(str(trained))
    azure = json.loads((REQUESTS / "online-input-data.json").read_text())
    image = base64.b64decode(azure["input_data"]["data"][0][0])
    want = model.predict(pd.DataFrame({"image": [image]}))
    for name in ("mlflow-dataframe-split.json", "mlflow-inputs.json"):
        status, answer = post(server, json.loads((REQUESTS / name).read_text()))
        assert status == 200, (name, answer)
        assert [p["Scored Labels"] for p in answer["predictions"]] == list(want["Scored Labels"])
    status, answer = post(server, {"dataframe_split": azure["input_data"]})
    assert status == 200, answer
    assert [p["Scored Labels"] for p in answer["predictions"]] == list(want["Scored Labels"])
    assert list(_load_pyfunc(str(trained)).predict(azure)["Scored Labels"]) == list(want["Scored Labels"])


def test_the_input_example_is_a_valid_serving_request(server, trained, expected):
    serving_input = Model.load(str(trained)).get_serving_input(str(trained))
    assert serving_input is not None
    assert len(mlflow.models.validate_serving_input(str(trained), serving_input)) == 1
    status, answer = post(server, json.loads(serving_input))
    assert status == 200, answer
    assert answer["predictions"][0]["Scored Labels"] in CLASSES


def test_the_batch_scoring_script_scores_files_and_keeps_bad_ones(trained, images, expected, tmp_path, monkeypatch):
    """deploy/batch/score_images.py as Azure ML runs it: init() once, run(mini_batch of file paths)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("score_images", REPO / "deploy" / "batch" / "score_images.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    files = []
    for index, image in enumerate(images):
        files.append(tmp_path / f"{index}.png")
        files[-1].write_bytes(image)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(trained.parent))  # the model folder sits below it
    script.init()
    rows = script.run([str(f) for f in files] + [str(tmp_path / "bad.png")])
    assert list(rows["file"]) == ["0.png", "1.png", "2.png", "bad.png"]
    assert list(rows["Scored Labels"][:3]) == list(expected["Scored Labels"])
    assert rows["error"][:3].eq("").all() and "is not a readable image" in rows["error"][3]


def test_a_bad_image_is_a_400_that_names_the_row(server, images):
    good, bad = b64(images[:1])[0], base64.b64encode(b"not an image at all").decode()
    status, answer = post(server, {"dataframe_split": {"columns": ["image"], "data": [[good], [bad]]}})
    assert status == 400
    assert "InvalidDatasetError: Row 1: 'image' is not a readable image" in json.dumps(answer)
    status, answer = post(server, {"inputs": {"image": ["%%% not base64"]}})
    assert status == 400
    assert "is not a readable image" in json.dumps(answer)


def test_the_server_returns_explanations_when_asked_and_refuses_too_many(server, images, expected):
    """Issue 25: `params: {"explain": true}` adds a heat-map PNG per image; its cost is bounded per request."""
    from train_pytorch_model.pyfunc import MAX_EXPLAINED_IMAGES

    split = {"columns": ["image"], "data": [[t] for t in b64(images)]}
    status, answer = post(server, {"dataframe_split": split, "params": {"explain": True}})
    assert status == 200, answer
    check_predictions(answer, expected)
    for row in answer["predictions"]:
        with Image.open(io.BytesIO(base64.b64decode(row["explanation"]))) as picture:
            assert picture.format == "PNG" and picture.size == (32, 32)
    many = {"columns": ["image"], "data": [[b64(images[:1])[0]]] * (MAX_EXPLAINED_IMAGES + 1)}
    status, answer = post(server, {"dataframe_split": many, "params": {"explain": True}})
    assert status == 400 and f"at most {MAX_EXPLAINED_IMAGES} images" in json.dumps(answer)


@pytest.fixture(scope="module")
def multilabel_model(tmp_path_factory) -> Path:
    from conftest import write_multilabel_mltable
    from train_pytorch_model.cli import main

    root = tmp_path_factory.mktemp("serving-multilabel")
    data = write_multilabel_mltable(root / "ml", count=12)
    assert main(["train", "--untrained-model", str(REPO / "examples" / "legacy_untrained_model" / "resnet18"),
                 "--training-data", str(data), "--trained-model", str(root / "model"), "--image-size", "32",
                 "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
                 "--mlflow-tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]) == 0
    return root / "model"


def test_a_served_multilabel_model_answers_label_sets_and_a_threshold_param(multilabel_model, tmp_path_factory):
    from conftest import MULTILABEL_CLASSES

    images = [(multilabel_model.parent / "ml" / "images" / f"{n}.png").read_bytes() for n in range(4)]
    expected = mlflow.pyfunc.load_model(str(multilabel_model)).predict(pd.DataFrame({"image": images}))
    columns = [f"Scored Probabilities_{c}" for c in sorted(MULTILABEL_CLASSES)]
    texts = b64(images)
    url = next(server := serve(multilabel_model, tmp_path_factory))
    try:
        bodies = [{"dataframe_split": {"columns": ["image"], "data": [[t] for t in texts]}},
                  {"dataframe_records": [{"image": t} for t in texts]}, {"inputs": texts},
                  {"instances": [{"image": t} for t in texts]}]
        for body in bodies:
            status, answer = post(url, body)
            assert status == 200, answer
            predictions = pd.DataFrame(answer["predictions"])
            assert list(predictions["Scored Labels"]) == list(expected["Scored Labels"])
            assert (predictions[columns] - expected[columns]).abs().to_numpy().max() < 1e-6
        status, answer = post(url, {"dataframe_records": [{"image": t} for t in texts], "params": {"threshold": 0.0}})
        assert status == 200, answer
        assert all(json.loads(row["Scored Labels"]) == sorted(MULTILABEL_CLASSES) for row in answer["predictions"])
    finally:
        server.close()  # stops the server (the generator's finally)
