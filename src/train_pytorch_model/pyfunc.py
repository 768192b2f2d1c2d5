"""The trained model directory as an MLflow model.

`MLmodel` declares a `python_function` flavor whose loader is this module (MLflow calls
`_load_pyfunc(model_dir)`), with a copy of this package under `code/`, so serving needs no
pickle and no install of our package: `mlflow.pyfunc.load_model(dir).predict(df)`.

Input: a DataFrame with column `image` holding raw image bytes or base64 (text or bytes), which is
what every request format of `mlflow models serve` becomes (`dataframe_split`, `dataframe_records`,
`inputs`, `instances`, CSV), and what Azure ML's two request shapes become: AutoML's
`{"input_data": {"columns": ["image"], "data": [...]}}` and the catalog models' `{"input_data": ["<base64>", ...]}`
(`request_frame`, which `deploy/azureml/score.py` calls too). Image URLs are refused by name: the model never
uses the network. The MLmodel carries a signature and an input example (one
small image), so `mlflow.models.get_serving_input` and Azure ML's test tab have a request to show.
Output: the predictions table of `predictions.py`: `Scored Labels` and `Scored Probabilities_<class>`.
A multi-label model's `Scored Labels` is the predicted set (JSON list text) at its threshold (0.5 unless
trained otherwise), stored in `training_info.json` and as the MLmodel's `model_config`; override it per
load (`mlflow.pyfunc.load_model(uri, model_config={"threshold": 0.3})`) or per request (`params`:
`{"threshold": 0.3}`, declared in the signature).

Explanations on request: the MLflow param `explain: true` (`{"dataframe_split": ..., "params": {"explain": true}}`)
adds column `explanation`, a base64 PNG per image: the image as the model saw it under a Grad-CAM heat map of the
predicted class (explain.py); for a multi-label model, JSON text {label: base64 PNG} of its (at most 5) predicted
labels. Bounded: at most MAX_EXPLAINED_IMAGES images per such request and model inputs of at
most MAX_EXPLAINED_SIDE pixels a side (a backward pass costs about twice the forward), else a named error.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import platform
import re
import shutil
from pathlib import Path

import pandas as pd
import torch

from .errors import InvalidDatasetError, InvalidParameterError, quote
from .image_directory import ImageDirectory
from .model_directory import TrainedModel, read_trained_model_directory
from .predictions import EXPLANATION_COLUMN, SCORED_LABELS, predicted_labels, probability_column
from .preprocessing import ImageDecodeError, decode_image

PACKAGE_DIR = Path(__file__).resolve().parent
PREDICT_BATCH = 64
MAX_IMAGE_BYTES = 32 * 2**20  # per image in a request; decode_image bounds the pixels
EXAMPLE_SIDE = 32  # pixels of the input example's longer side: a request body of a few hundred bytes
IMAGE_COLUMN = "image"
EXPLAIN_PARAM = "explain"
MAX_EXPLAINED_IMAGES = 8  # per request that asks for explanations
MAX_EXPLAINED_SIDE = 1024  # pixels of the model input's longer side (legacy models without a resize keep the size)
_BASE64 = re.compile(rb"[A-Za-z0-9+/\s]*={0,2}\s*")
_DATA_URL = re.compile(rb"data:[\w/+.-]*;base64,")
_URL = re.compile(rb"\s*[A-Za-z][A-Za-z0-9+.-]{1,15}://")  # https://, azureml://, wasbs://, file://, ...


def image_bytes(value, row: int) -> bytes:
    """The encoded image in one request cell: raw bytes, base64 text or base64 bytes.

    MLflow hands base64 *text* over as bytes on the `inputs`/`instances` path, so bytes that are
    valid base64 are decoded first; no PNG/JPEG/... file is valid base64 (their magic bytes are not)."""
    is_text = isinstance(value, str)
    if is_text:
        value = value.encode("utf-8", errors="replace")
    elif isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    elif not isinstance(value, bytes):
        raise InvalidDatasetError(f"Row {row}: '{IMAGE_COLUMN}' must be image bytes or a base64 string, "
                                  f"got {type(value).__name__} {quote(value, 60)}.")
    too_big = InvalidDatasetError(f"Row {row}: '{IMAGE_COLUMN}' is over the {MAX_IMAGE_BYTES // 2**20} MiB limit "
                                  "per image; send a smaller image.")
    if len(value) > 2 * MAX_IMAGE_BYTES:  # base64 of the largest allowed image, line breaks included, is smaller
        raise too_big
    if is_text and _URL.match(value):
        url = quote(value[:60].decode(errors="replace"))
        raise InvalidDatasetError(f"Row {row}: '{IMAGE_COLUMN}' is a URL ({url}); the model never fetches from the "
                                  "network: send the image file base64-encoded.")
    text = _DATA_URL.sub(b"", value[:64], count=1) + value[64:] if value.startswith(b"data:") else value
    data = None
    if _BASE64.fullmatch(text):
        try:
            data = base64.b64decode(text)
        except (binascii.Error, ValueError):
            pass
    if data is None and is_text:
        raise InvalidDatasetError(f"Row {row}: '{IMAGE_COLUMN}' is a string but not valid base64 "
                                  f"({quote(value[:40].decode(errors='replace'), 60)}); send the image file "
                                  "base64-encoded.")
    data = value if data is None else data
    if len(data) > MAX_IMAGE_BYTES:
        raise too_big
    return data


class ImageClassifierPyfunc:
    """What `mlflow.pyfunc.load_model` returns the implementation of."""

    def __init__(self, trained: TrainedModel, threshold: float | None = None):
        self.trained = trained
        self.transform = trained.preprocessing.eval_transform()
        self.threshold = trained.threshold if threshold is None else checked_threshold(threshold)

    @torch.inference_mode()
    def predict_tensors(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Class probabilities (softmax, or a multi-label model's sigmoids) for uint8 CHW tensors (resized
        already when the recipe says so)."""
        model, prep = self.trained.model, self.trained.preprocessing
        same_size = len({tuple(t.shape) for t in images}) == 1
        groups = [torch.stack(images)] if same_size else [t.unsqueeze(0) for t in images]
        return torch.cat([self.trained.probabilities(model(prep.normalize(batch))) for batch in groups])

    def predict(self, model_input, params=None) -> pd.DataFrame:
        frame = request_frame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise InvalidDatasetError(f"Input needs a column '{IMAGE_COLUMN}' (image bytes or base64); "
                                      f"got columns {quote(list(frame.columns))}.")
        size_hint = self.trained.preprocessing.resize_size
        probabilities = []
        values = list(frame[IMAGE_COLUMN])
        explain = wants_explanations(params)
        if explain and len(values) > MAX_EXPLAINED_IMAGES:
            raise InvalidDatasetError(f"A request with '{EXPLAIN_PARAM}' may hold at most {MAX_EXPLAINED_IMAGES} "
                                      f"images (this one has {len(values)}): explanations cost a backward pass each.")
        explained = []
        for start in range(0, len(values), PREDICT_BATCH):
            tensors = []
            for row, value in enumerate(values[start:start + PREDICT_BATCH], start=start):
                try:
                    tensors.append(self.transform(decode_image(image_bytes(value, row), size_hint)))
                except ImageDecodeError as exc:
                    raise InvalidDatasetError(f"Row {row}: '{IMAGE_COLUMN}' is not a readable image ({exc}).") from None
                if explain and max(tensors[-1].shape[-2:]) > MAX_EXPLAINED_SIDE:
                    raise InvalidDatasetError(
                        f"Row {row}: the model sees this image at {tuple(tensors[-1].shape[-2:])} pixels; explanations "
                        f"are given for at most {MAX_EXPLAINED_SIDE} pixels a side. Send a smaller image.")
            explained += tensors if explain else []
            probabilities.append(self.predict_tensors(tensors))
        classes = self.trained.classes
        probs = torch.cat(probabilities).numpy() if probabilities else torch.empty(0, len(classes)).numpy()
        requested = (params or {}).get("threshold")  # None: not in this request (MLflow fills in None)
        threshold = self.threshold if requested is None else checked_threshold(requested)
        result = pd.DataFrame({SCORED_LABELS: predicted_labels(probs, classes, self.trained.is_multilabel, threshold)})
        for index, label in enumerate(classes):
            result[probability_column(label)] = probs[:, index].astype("float64") if len(probs) else []
        if explain:
            from .explain import labels_to_explain

            targets = labels_to_explain(probs, self.trained.is_multilabel, threshold)
            result[EXPLANATION_COLUMN] = [self.explanation(image, labels) for image, labels in zip(explained, targets)]
        return result

    def explanation(self, image: torch.Tensor, targets: list[int]) -> str:
        """Base64 PNG of `image` (uint8 CHW, as the model sees it) under the heat map of its predicted class; for a
        multi-label model, JSON text {label: base64 PNG} of its predicted labels (explain.labels_to_explain)."""
        from .explain import explained_images, png_bytes

        prep = self.trained.preprocessing
        copies = image.unsqueeze(0).expand(len(targets), -1, -1, -1)
        pictures = explained_images(self.trained.model, prep.normalize, copies,
                                    torch.tensor(targets, dtype=torch.long)) if targets else []
        texts = [base64.b64encode(png_bytes(picture)).decode("ascii") for picture in pictures]
        if not self.trained.is_multilabel:
            return texts[0]
        return json.dumps({self.trained.classes[t]: text for t, text in zip(targets, texts)})


def wants_explanations(params) -> bool:
    """The `explain` param: true/false (a JSON boolean, or its text as some clients send it)."""
    value = (params or {}).get(EXPLAIN_PARAM, False)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", ""):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise InvalidDatasetError(f"Param '{EXPLAIN_PARAM}' must be true or false, got {quote(value, 40)}.")


def request_frame(model_input) -> pd.DataFrame:
    """A DataFrame with an `image` column from what predict is given, Azure ML's request bodies included:
    `{"input_data": {"columns": [...], "data": [...]}}` (AutoML's shape) and `{"input_data": [...]}`
    (the catalog models' shape: one image per item). A one-column frame with no column names, which is
    what a bare list becomes on the way in, is taken as the image column."""
    if isinstance(model_input, dict) and set(model_input) == {"input_data"}:
        body = model_input["input_data"]
        if isinstance(body, dict) and "data" in body:
            model_input = _frame(body["data"], columns=body.get("columns"), index=body.get("index"))
        elif isinstance(body, list):
            model_input = pd.DataFrame({IMAGE_COLUMN: body})
        else:
            raise InvalidDatasetError("'input_data' must be a list of images or {'columns': [...], 'data': [...]}; "
                                      f"got {type(body).__name__}.")
    frame = model_input if isinstance(model_input, pd.DataFrame) else _frame(model_input)
    if IMAGE_COLUMN not in frame.columns and list(frame.columns) == [0]:
        frame = frame.rename(columns={0: IMAGE_COLUMN})
    return frame


def _frame(data, **kwargs) -> pd.DataFrame:
    try:
        return pd.DataFrame(data, **kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidDatasetError(f"Input cannot be read as a table with an '{IMAGE_COLUMN}' column: {exc}.") from None


def checked_threshold(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InvalidParameterError("Threshold", value, "must be a number from 0 to 1")
    return float(value)


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> ImageClassifierPyfunc:
    """MLflow's hook: `data_path` is the model directory; `model_config` may override the threshold."""
    return ImageClassifierPyfunc(read_trained_model_directory(data_path), (model_config or {}).get("threshold"))


def save_mlflow_model(stage: Path, classes: list[str], metadata: dict, *,
                      examples: ImageDirectory | None = None, threshold: float | None = None) -> None:
    """Add MLmodel, environment files, an input example and a copy of this package to `stage` (the
    legacy files stay). `examples`: the training data, whose first image, shrunk to a thumbnail, is the
    example; without it the example is a grey square."""
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.models.utils import _save_example  # what MLflow's own flavors call: example + serving example
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    code_dir = stage / "code"
    shutil.copytree(PACKAGE_DIR, code_dir / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    requirements = [
        f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={__import__('torchvision').__version__.split('+')[0]}",
        "pillow", "pandas", "numpy", "pyyaml",
    ]
    python_version = platform.python_version()
    (stage / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (stage / "python_env.yaml").write_text(
        f"python: {python_version}\nbuild_dependencies:\n- pip\ndependencies:\n- -r requirements.txt\n"
    )
    (stage / "conda.yaml").write_text(
        "channels:\n- conda-forge\ndependencies:\n"
        f"- python={python_version}\n- pip\n- pip:\n" + "".join(f"  - {r}\n" for r in requirements)
        + "name: mlflow-env\n"
    )
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", SCORED_LABELS)]
                       + [ColSpec("double", probability_column(c)) for c in classes]
                       + [ColSpec("string", EXPLANATION_COLUMN, required=False)]),
        # MLflow hands a request's params to predict only when the signature declares them. A multi-label model
        # (`threshold` given) also takes a threshold; its default is None, not the threshold: MLflow passes the
        # default to every call, which would hide a threshold given by `model_config` at load.
        params=ParamSchema([ParamSpec(EXPLAIN_PARAM, "boolean", False)]
                           + ([ParamSpec("threshold", "double", None)] if threshold is not None else [])),
    )
    model = Model(signature=signature, metadata=metadata)
    _save_example(model, pd.DataFrame({IMAGE_COLUMN: [example_png(examples)]}), str(stage))
    mlflow.pyfunc.add_to_model(model, loader_module=__name__, code="code", conda_env="conda.yaml",
                               python_env="python_env.yaml",
                               model_config={"threshold": threshold} if threshold is not None else None)
    model.save(str(stage / "MLmodel"))


def example_png(examples: ImageDirectory | None) -> bytes:
    """A PNG thumbnail (longer side EXAMPLE_SIDE) of the first image of `examples`, or a grey square: the
    input example. Read through the input opener, as training reads it (never a link out of the folder, a
    FIFO or a device)."""
    from PIL import Image

    image = Image.new("RGB", (EXAMPLE_SIDE, EXAMPLE_SIDE), (128, 128, 128))
    if examples is not None and len(examples):
        try:
            image = decode_image(examples.image_source(0), EXAMPLE_SIDE, inside=examples.root)
            image.thumbnail((EXAMPLE_SIDE, EXAMPLE_SIDE))
        except ImageDecodeError:
            pass  # the example only illustrates the request: a grey square does as well
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
