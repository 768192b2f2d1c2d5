"""Register a saved MLflow model folder in the MLflow model registry of the tracking server.

The trainer writes the model with `save_model` into its output folder, because MLflow 3
`log_model` calls the logged-model API that Azure ML answers with 404
(Azure/azure-sdk-for-python#44896). Registration therefore starts from that folder: its files
are uploaded as plain run artifacts, then `runs:/<run>/<path>` is registered. MLflow resolves
such a URI to the run's artifact location (the folder holds an MLmodel file) and never
touches the logged-model API, so this works on Azure ML (workspace registry) and on a local
sqlite store alike.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import InvalidModelDirectoryError, InvalidParameterError

log = logging.getLogger(__name__)

ARTIFACT_PATH = "trained_model"
RUN_IDENTITY_TAG = "train_pytorch_model.run_identity"  # on each version: which training run it holds
# The strictest registry we register into: Azure ML's model names (letters, digits, '-', '_', '.'; a letter or digit
# first; at most 255), which MLflow's own rules ('/' and ':' refused) allow too. Checked before training.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


def check_model_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise InvalidParameterError(
            "registered_model_name", name, "must be 1 to 255 letters, digits, '-', '_' or '.', starting with a "
            "letter or digit (the model registry's naming rules; Azure ML's are the strictest)")


def is_registered(name: str, run_identity: str) -> bool:
    """Whether a version of `name` already holds the model of the run `run_identity`."""
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name = '{name}'")  # a checked name holds no quote
    return any(v.tags.get(RUN_IDENTITY_TAG) == run_identity for v in versions)


def register_model(model_dir: Path, name: str, run_identity: str | None = None) -> str:
    """Register `model_dir` (an MLflow model folder) as a new version of `name`, tagged with the `run_identity`
    that wrote it; return the version."""
    import mlflow

    model_dir = Path(model_dir)
    if not (model_dir / "MLmodel").is_file():
        raise InvalidModelDirectoryError(
            f"Cannot register '{model_dir}': it has no MLmodel file, so it is not an MLflow model folder."
        )
    check_model_name(name)

    # Use the caller's run if one is active; otherwise start one. In an Azure ML job
    # MLFLOW_RUN_ID is set, so start_run() attaches to the job's own run.
    owns_run = mlflow.active_run() is None
    run = mlflow.start_run() if owns_run else mlflow.active_run()
    try:
        mlflow.log_artifacts(str(model_dir), artifact_path=ARTIFACT_PATH)
        tags = {RUN_IDENTITY_TAG: run_identity} if run_identity else None
        version = mlflow.register_model(f"runs:/{run.info.run_id}/{ARTIFACT_PATH}", name, tags=tags)
    except BaseException:
        if owns_run:
            mlflow.end_run("FAILED")
        raise
    if owns_run:
        mlflow.end_run()
    log.info("Registered model '%s' version %s at %s", version.name, version.version, mlflow.get_registry_uri())
    return str(version.version)
