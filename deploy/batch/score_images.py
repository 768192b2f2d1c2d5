"""Batch scoring script of deploy/batch-deployment.yml: a mini-batch of image files -> predictions.

Azure ML calls `init()` once per worker and `run(mini_batch)` with a list of file paths; the rows it
returns are appended to the deployment's output file. An unreadable image gets a row with its reason
in `error` instead of failing the mini-batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

model = None


def _model_folder(root: Path) -> Path:
    """AZUREML_MODEL_DIR holds the registered model's folder (named after its artifact path)."""
    found = sorted(root.rglob("MLmodel"), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"No MLmodel file under {root}: register the trained model folder of train.")
    return found[0].parent


def init() -> None:
    global model
    model = mlflow.pyfunc.load_model(str(_model_folder(Path(os.environ["AZUREML_MODEL_DIR"]))))


def run(mini_batch: list[str]) -> pd.DataFrame:
    rows = []
    for path in map(Path, mini_batch):
        try:
            prediction = model.predict(pd.DataFrame({"image": [path.read_bytes()]})).iloc[0].to_dict()
            rows.append({"file": path.name, **prediction, "error": ""})
        except Exception as exc:  # one bad file must not fail the others: its row says why
            rows.append({"file": path.name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    return pd.DataFrame(rows)
