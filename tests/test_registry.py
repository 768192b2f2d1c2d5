"""register_model against a real, local sqlite-backed MLflow model registry."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from train_pytorch_model.errors import InvalidModelDirectoryError, InvalidParameterError
from train_pytorch_model.registry import ARTIFACT_PATH, register_model


class AddOne(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return model_input + 1


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh sqlite tracking + registry store; artifacts land under tmp_path too."""
    monkeypatch.chdir(tmp_path)  # the default artifact root ./mlruns is resolved against the cwd
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID",
                "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(key, raising=False)
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def saved_model(tmp_path):
    """A model folder written with save_model, like the trainer's output."""
    path = tmp_path / "trained_model"
    # Explicit requirements: skips MLflow's (slow) requirement inference.
    mlflow.pyfunc.save_model(path, python_model=AddOne(), pip_requirements=["mlflow"])
    return path


def test_registers_a_version_that_loads(tracking, saved_model):
    version = register_model(saved_model, "image-classifier")

    assert version == "1"
    client = MlflowClient()
    model_version = client.get_model_version("image-classifier", "1")
    assert model_version.run_id, "the version must point back to the run holding its files"
    assert client.get_run(model_version.run_id).info.status == "FINISHED"
    loaded = mlflow.pyfunc.load_model("models:/image-classifier/1")
    assert loaded.predict(pd.DataFrame({"x": [1, 2]}))["x"].tolist() == [2, 3]


def test_second_registration_is_version_2(tracking, saved_model):
    assert register_model(saved_model, "image-classifier") == "1"
    assert register_model(saved_model, "image-classifier") == "2"
    assert mlflow.pyfunc.load_model("models:/image-classifier/2") is not None


def test_the_registered_files_outlive_the_output_folder(tracking, saved_model):
    import shutil

    register_model(saved_model, "image-classifier")
    shutil.rmtree(saved_model)  # an Azure ML output folder is gone after the job
    assert mlflow.pyfunc.load_model("models:/image-classifier/1") is not None


def test_uses_the_callers_active_run_and_leaves_it_open(tracking, saved_model):
    with mlflow.start_run() as run:
        register_model(saved_model, "image-classifier")
        assert mlflow.active_run().info.run_id == run.info.run_id
    assert MlflowClient().get_model_version("image-classifier", "1").run_id == run.info.run_id
    artifacts = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, ARTIFACT_PATH)]
    assert f"{ARTIFACT_PATH}/MLmodel" in artifacts


def test_never_calls_the_logged_model_api(tracking, saved_model, monkeypatch):
    # Azure ML answers MLflow 3's logged-model endpoints with 404 (azure-sdk-for-python#44896).
    def not_found(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("404: logged models are not supported here")

    for method in ("create_logged_model", "get_logged_model", "search_logged_models",
                   "finalize_logged_model", "record_logged_model", "set_logged_model_tags"):
        monkeypatch.setattr(SqlAlchemyStore, method, not_found)
    assert register_model(saved_model, "image-classifier") == "1"
    assert mlflow.pyfunc.load_model("models:/image-classifier/1") is not None


def test_rejects_a_folder_that_is_not_an_mlflow_model(tracking, tmp_path):
    (tmp_path / "legacy_only").mkdir()
    (tmp_path / "legacy_only" / "_meta.yaml").write_text("type: ModelDirectory\n")
    with pytest.raises(InvalidModelDirectoryError, match="MLmodel"):
        register_model(tmp_path / "legacy_only", "image-classifier")


def test_rejects_an_empty_name(tracking, saved_model):
    with pytest.raises(InvalidParameterError, match="registered_model_name"):
        register_model(saved_model, "  ")
