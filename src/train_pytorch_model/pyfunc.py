"""The trained model directory as an MLflow model.

`MLmodel` declares a `python_function` flavor whose loader is this module (MLflow calls
`_load_pyfunc(model_dir)`), with a copy of this package under `code/`, so serving needs no
pickle and no install of our package: `mlflow.pyfunc.load_model(dir).predict(df)`.

Input: a DataFrame with column `image` holding raw image bytes or base64 strings.
Output: column `label` (the category name) and `probability_<category>` per class.
"""

from __future__ import annotations

import base64
import binascii
import platform
import shutil
from pathlib import Path

import pandas as pd
import torch

from .errors import InvalidDatasetError
from .model_directory import TrainedModel, read_trained_model_directory
from .preprocessing import ImageDecodeError, decode_image

PACKAGE_DIR = Path(__file__).resolve().parent
PREDICT_BATCH = 64


def probability_column(label: str) -> str:
    return f"probability_{label}"


class ImageClassifierPyfunc:
    """What `mlflow.pyfunc.load_model` returns the implementation of."""

    def __init__(self, trained: TrainedModel):
        self.trained = trained
        self.transform = trained.preprocessing.eval_transform()

    def _image_bytes(self, value, row: int) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str):
            try:
                return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidDatasetError(f"Row {row}: 'image' is a string but not valid base64.") from None
        raise InvalidDatasetError(f"Row {row}: 'image' must be bytes or a base64 string, got {type(value).__name__}.")

    @torch.inference_mode()
    def predict_tensors(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Softmax probabilities for uint8 CHW tensors (resized already when the recipe says so)."""
        model, prep = self.trained.model, self.trained.preprocessing
        same_size = len({tuple(t.shape) for t in images}) == 1
        groups = [torch.stack(images)] if same_size else [t.unsqueeze(0) for t in images]
        return torch.cat([model(prep.normalize(batch)).softmax(dim=1) for batch in groups])

    def predict(self, model_input, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise InvalidDatasetError(f"Input needs a column 'image' (bytes or base64); got columns {list(frame.columns)}.")
        size_hint = self.trained.preprocessing.resize_size
        probabilities = []
        values = list(frame["image"])
        for start in range(0, len(values), PREDICT_BATCH):
            tensors = []
            for row, value in enumerate(values[start:start + PREDICT_BATCH], start=start):
                try:
                    tensors.append(self.transform(decode_image(self._image_bytes(value, row), size_hint)))
                except ImageDecodeError as exc:
                    raise InvalidDatasetError(f"Row {row}: 'image' is not a readable image ({exc}).") from None
            probabilities.append(self.predict_tensors(tensors))
        classes = self.trained.classes
        probs = torch.cat(probabilities).numpy() if probabilities else torch.empty(0, len(classes)).numpy()
        result = pd.DataFrame({"label": [classes[i] for i in probs.argmax(axis=1)] if len(probs) else []})
        for index, label in enumerate(classes):
            result[probability_column(label)] = probs[:, index] if len(probs) else []
        return result


def _load_pyfunc(data_path: str) -> ImageClassifierPyfunc:
    """MLflow's hook: `data_path` is the model directory."""
    return ImageClassifierPyfunc(read_trained_model_directory(data_path))


def save_mlflow_model(stage: Path, classes: list[str], metadata: dict) -> None:
    """Add MLmodel, environment files and a copy of this package to `stage` (the legacy files stay)."""
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

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
        f"- python={python_version}\n- pip\n- pip:\n" + "".join(f"  - {r}\n" for r in requirements) + "name: mlflow-env\n"
    )
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label")] + [ColSpec("double", probability_column(c)) for c in classes]),
    )
    model = Model(signature=signature, metadata=metadata)
    mlflow.pyfunc.add_to_model(model, loader_module=__name__, code="code",
                               conda_env="conda.yaml", python_env="python_env.yaml")
    model.save(str(stage / "MLmodel"))
