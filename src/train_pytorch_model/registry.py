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
from pathlib import Path

from .errors import InvalidModelDirectoryError, InvalidParameterError

log = logging.getLogger(__name__)

ARTIFACT_PATH = "trained_model"


def register_model(model_dir: Path, name: str) -> str:
    """Register `model_dir` (an MLflow model folder) as a new version of `name`; return the version."""
    import mlflow

    model_dir = Path(model_dir)
    if not (model_dir / "MLmodel").is_file():
        raise InvalidModelDirectoryError(
            f"Cannot register '{model_dir}': it has no MLmodel file, so it is not an MLflow model folder."
        )
    if not name or not name.strip():
        raise InvalidParameterError("registered_model_name", name, "give a non-empty model name")

    # Use the caller's run if one is active; otherwise start one. In an Azure ML job
    # MLFLOW_RUN_ID is set, so start_run() attaches to the job's own run.
    owns_run = mlflow.active_run() is None
    run = mlflow.start_run() if owns_run else mlflow.active_run()
    try:
        mlflow.log_artifacts(str(model_dir), artifact_path=ARTIFACT_PATH)
        version = mlflow.register_model(f"runs:/{run.info.run_id}/{ARTIFACT_PATH}", name.strip())
    except BaseException:
        if owns_run:
            mlflow.end_run("FAILED")
        raise
    if owns_run:
        mlflow.end_run()
    log.info("Registered model '%s' version %s at %s", version.name, version.version, mlflow.get_registry_uri())
    return str(version.version)
