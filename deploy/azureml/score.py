"""Scoring script for the Azure ML inference server (`azureml-inference-server-http`, what managed online
endpoints run): the trained model folder served with both Azure ML request shapes.

    {"input_data": {"columns": ["image"], "data": ["<base64>", ...]}}   AutoML for images
    {"input_data": ["<base64>", ...]}                                    the model catalog's models

The reply is a JSON list, one object per image: `Scored Labels` and `Scored Probabilities_<class>`. A body with
`"params": {"explain": true}` beside `input_data` also gets an `explanation` per image: a base64 PNG heat map of
what drove the prediction (at most 8 images per such request; docs/reports.md).
A bad request (not JSON, an unreadable image, a URL instead of image bytes) gets HTTP 400 with the error line.
Locally: `AZUREML_MODEL_DIR=out azmlinfsrv --entry_script deploy/azureml/score.py` (docs/deploy.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow.pyfunc
from azureml_inference_server_http.api.aml_response import AMLResponse
from mlflow.exceptions import MlflowException

MAX_BODY_BYTES = 100 * 2**20  # a few dozen full-size images in base64; the server itself sets no limit
model = None


def find_model(root: Path) -> Path:
    """The MLflow model folder: `AZUREML_MODEL_DIR` itself, or the one folder under it with an MLmodel
    (Azure ML mounts a registered model as `<dir>/<artifact folder>`)."""
    if (root / "MLmodel").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/MLmodel") if p.is_file())
    if len(found) != 1:
        raise RuntimeError(f"AZUREML_MODEL_DIR={root} holds {len(found)} MLflow models; expected exactly one.")
    return found[0]


def init() -> None:
    global model
    model = mlflow.pyfunc.load_model(str(find_model(Path(os.environ["AZUREML_MODEL_DIR"]))))


def run(raw_data) -> AMLResponse | list:
    # The model's own package (its code/ copy, on sys.path once MLflow loaded the model) parses the request:
    # the same rules as every other way of serving it.
    from train_pytorch_model.errors import TrainPyTorchModelError
    from train_pytorch_model.pyfunc import request_frame

    try:
        if len(raw_data) > MAX_BODY_BYTES:
            raise ValueError(f"the request body is over {MAX_BODY_BYTES // 2**20} MiB; send fewer images per request")
        body = json.loads(raw_data)
        params = body.pop("params", None) if isinstance(body, dict) else None
        if params is not None and not isinstance(params, dict):
            raise ValueError("'params' must be an object, e.g. {\"explain\": true}")
        return model.predict(request_frame(body), params=params).to_dict(orient="records")
    except (TrainPyTorchModelError, ValueError, MlflowException) as exc:  # JSONDecodeError is a ValueError
        return AMLResponse({"error": f"{type(exc).__name__}: {exc}"}, 400, json_str=True)
