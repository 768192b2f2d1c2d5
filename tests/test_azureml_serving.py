"""The trained model behind the real Azure ML inference server (`azureml-inference-server-http`, what managed
online endpoints run), started on 127.0.0.1 with deploy/azureml/score.py: both Azure ML request shapes."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import (
    MULTILABEL_CLASSES,
    REPO,
    RESNET18,
    free_port,
    post_json,
    running_server,
    train_tiny_model,
    write_image_folder,
    write_multilabel_mltable,
)

pytestmark = pytest.mark.slow

REQUESTS = REPO / "deploy" / "requests"
CLASSES = ["cat", "dog", "fox"]
# The server pins its own OpenTelemetry and pydantic: `make venv` installs it into a folder of its own beside
# the venv's packages, as Azure ML's inference image keeps it apart from the model's environment.
SERVER_PACKAGES = Path(sys.prefix) / "azureml-serving"  # sys.prefix: the venv
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tiny_model(tmp_path_factory.mktemp("azureml-serving"), CLASSES)


def serving(model: Path, log_folder: Path):
    """The inference server on 127.0.0.1 with deploy/azureml/score.py, serving `model`: its URL while in use."""
    assert (SERVER_PACKAGES / "azureml_inference_server_http").is_dir(), f"run `make venv`: no {SERVER_PACKAGES}"
    port = free_port()
    # AZUREML_MODEL_DIR is the folder Azure ML mounts the registered model under.
    env = {**os.environ, "AZUREML_MODEL_DIR": str(model.parent), "PYTHONPATH": str(SERVER_PACKAGES)}
    argv = [sys.executable, "-m", "azureml_inference_server_http.amlserver",
            "--entry_script", str(REPO / "deploy" / "azureml" / "score.py"), "--port", str(port)]
    return running_server(argv, "/", port, log_folder / "server.log", env=env, cwd=model.parent,
                          timeout_s=START_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    with serving(trained, tmp_path_factory.mktemp("azmlinfsrv-log")) as url:
        yield url


def score(url: str, body) -> tuple[int, object]:
    return post_json(f"{url}/score", body)


@pytest.fixture(scope="module")
def images(trained) -> list[bytes]:
    root = write_image_folder(trained.parent / "requests", {name: 1 for name in CLASSES}, seed=11)
    return [next((root / name).iterdir()).read_bytes() for name in CLASSES]


def expected(trained: Path, images: list[bytes]) -> pd.DataFrame:
    return mlflow.pyfunc.load_model(str(trained)).predict(pd.DataFrame({"image": images}))


def check(answer, want: pd.DataFrame) -> None:
    got = pd.DataFrame(answer)
    assert list(got["Scored Labels"]) == list(want["Scored Labels"])
    columns = [f"Scored Probabilities_{c}" for c in CLASSES]
    assert (got[columns] - want[columns]).abs().to_numpy().max() < 1e-5


def test_automl_and_catalog_request_shapes_return_predictions(server, trained, images):
    texts = [base64.b64encode(image).decode() for image in images]
    want = expected(trained, images)
    for body in ({"input_data": {"columns": ["image"], "data": texts}},   # AutoML for images
                 {"input_data": {"columns": ["image"], "data": [[t] for t in texts]}},  # a split DataFrame
                 {"input_data": texts}):                                   # the model catalog's models
        status, answer = score(server, body)
        assert status == 200, (body.keys(), answer)
        check(answer, want)


def test_the_request_files_in_deploy_are_answered(server, trained):
    for name in ("automl-input-data.json", "catalog-input-data.json", "online-input-data.json"):
        body = json.loads((REQUESTS / name).read_text())
        data = body["input_data"]["data"] if isinstance(body["input_data"], dict) else body["input_data"]
        image = base64.b64decode(data[0][0] if isinstance(data[0], list) else data[0])
        status, answer = score(server, body)
        assert status == 200, (name, answer)
        assert [row["Scored Labels"] for row in answer] == list(expected(trained, [image])["Scored Labels"])


def test_urls_bad_images_and_bad_json_are_a_400_with_the_error_line(server, images):
    good = base64.b64encode(images[0]).decode()
    status, answer = score(server, {"input_data": [good, "https://example.com/cat.jpg"]})
    assert status == 400 and "InvalidDatasetError: Row 1: 'image' is a URL" in answer["error"]
    assert "never fetches from the network" in answer["error"]
    status, answer = score(server, {"input_data": [base64.b64encode(b"not an image").decode()]})
    assert status == 400 and "Row 0: 'image' is not a readable image" in answer["error"]
    status, answer = score(server, b"{not json")
    assert status == 400 and answer["error"].startswith("JSONDecodeError")
    status, answer = score(server, {"input_data": 42})
    assert status == 400 and "'input_data' must be a list of images" in answer["error"]


def test_explanations_are_returned_when_the_params_ask(server, trained, images):
    """Issue 25: `"params": {"explain": true}` beside `input_data`: a heat-map PNG per image, bounded per request."""
    texts = [base64.b64encode(image).decode() for image in images]
    status, answer = score(server, {"input_data": texts, "params": {"explain": True}})
    assert status == 200, answer
    check(answer, expected(trained, images))
    assert all(base64.b64decode(row["explanation"]).startswith(b"\x89PNG") for row in answer)
    status, answer = score(server, {"input_data": texts * 3, "params": {"explain": True}})
    assert status == 400 and "at most 8 images" in answer["error"]
    status, answer = score(server, {"input_data": texts, "params": {"explain": "perhaps"}})
    assert status == 400 and "explain" in answer["error"]
    status, answer = score(server, {"input_data": texts, "params": ["explain"]})
    assert status == 400 and "'params' must be an object" in answer["error"]


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory) -> Path:
    """A multi-label model (AutoML's fridge-objects shape), trained in seconds; its images beside it."""
    from train_pytorch_model.cli import main

    root = tmp_path_factory.mktemp("azureml-serving-multilabel")
    data = write_multilabel_mltable(root / "ml", count=16)
    out = root / "trained"
    assert main(["train", "--untrained-model", str(RESNET18),
                 "--training-data", str(data), "--trained-model", str(out), "--epochs", "1", "--batch-size", "8",
                 "--image-size", "32", "--num-workers", "0",
                 "--mlflow-tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]) == 0
    return out


def test_a_multilabel_model_answers_with_its_labels_and_the_requested_threshold(multilabel, tmp_path_factory):
    """Every label over the threshold per image, as MLflow's own predict gives them; `"params": {"threshold": t}`
    changes it per request."""
    images = [(multilabel.parent / "ml" / "images" / f"{n}.png").read_bytes() for n in range(4)]
    texts = [base64.b64encode(image).decode() for image in images]
    served = mlflow.pyfunc.load_model(str(multilabel))
    want = served.predict(pd.DataFrame({"image": images}))
    with serving(multilabel, tmp_path_factory.mktemp("azmlinfsrv-multilabel-log")) as url:
        status, answer = score(url, {"input_data": {"columns": ["image"], "data": texts}})
        assert status == 200, answer
        got = pd.DataFrame(answer)
        assert list(got["Scored Labels"]) == list(want["Scored Labels"])
        columns = [f"Scored Probabilities_{c}" for c in MULTILABEL_CLASSES]
        assert (got[columns] - want[columns]).abs().to_numpy().max() < 1e-5
        for threshold, labels in ((0.0, sorted(MULTILABEL_CLASSES)), (1.0, [])):
            status, answer = score(url, {"input_data": texts, "params": {"threshold": threshold}})
            assert status == 200, answer
            assert [sorted(json.loads(row["Scored Labels"])) for row in answer] == [labels] * len(texts)
        status, answer = score(url, {"input_data": texts, "params": {"threshold": "high"}})
        assert status == 400 and "threshold" in answer["error"]
