"""Registering the result: register_model against a real, local sqlite-backed MLflow model
registry, and the optional azureml-core (SDK v1) metric logging."""

from __future__ import annotations

import shutil
import sys
import types

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from train_pytorch_model import azureml_v1
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


# --- azureml-core (SDK v1) metrics: optional, off unless a live v1 run exists ------------------

EPOCH_METRICS = {"epoch": 3, "lr": 0.0005, "train_images_per_second": 120.5, "train_loss": 0.8,
                 "train_accuracy": 0.75, "valid_loss": 0.9, "valid_top1": 0.6, "valid_top5": 0.95,
                 "data_wait_fraction": 0.1, "seconds": 4.2}


def test_v1_row_uses_the_original_names_in_the_original_order():
    row = azureml_v1.v1_metric_row(EPOCH_METRICS)
    assert list(row) == ["learning rate", "Train images per second", "Train loss", "Train error",
                         "Valid loss", "Top-1 validation accuracy", "Top-5 validation accuracy"]
    assert row["Train error"] == pytest.approx(0.25)
    assert (row["learning rate"], row["Train loss"], row["Valid loss"]) == (0.0005, 0.8, 0.9)
    assert (row["Top-1 validation accuracy"], row["Top-5 validation accuracy"]) == (0.6, 0.95)


def test_v1_row_top5_is_one_when_the_trainer_has_none():
    # The trainer leaves top-5 out under five classes; the original logged 1.0 there.
    metrics = {k: v for k, v in EPOCH_METRICS.items() if k != "valid_top5"}
    assert azureml_v1.v1_metric_row(metrics)["Top-5 validation accuracy"] == 1.0
    assert azureml_v1.v1_metric_row({**metrics, "valid_top5": None})["Top-5 validation accuracy"] == 1.0


def test_v1_row_names_a_missing_metric():
    with pytest.raises(KeyError, match="valid_loss"):
        azureml_v1.v1_metric_row({k: v for k, v in EPOCH_METRICS.items() if k != "valid_loss"})


class FakeRun:
    def __init__(self, run_id: str):
        self.id = run_id
        self.rows = []

    def log_row(self, name, description=None, **kwargs):
        self.rows.append((name, kwargs))


@pytest.fixture
def v1_run(monkeypatch):
    """Install a stand-in `azureml.core` (SDK v1 is not installable offline) and yield a setter."""
    core = types.ModuleType("azureml.core")
    core.Run = types.SimpleNamespace(get_context=lambda: None)
    monkeypatch.setitem(sys.modules, "azureml", types.ModuleType("azureml"))
    monkeypatch.setitem(sys.modules, "azureml.core", core)
    azureml_v1.live_v1_run.cache_clear()

    def use(run):
        core.Run.get_context = lambda: run
        azureml_v1.live_v1_run.cache_clear()
        return run

    yield use
    azureml_v1.live_v1_run.cache_clear()


def test_v1_logging_is_a_silent_no_op_without_azureml_core(monkeypatch):
    monkeypatch.setitem(sys.modules, "azureml.core", None)  # makes `import azureml.core` fail
    azureml_v1.live_v1_run.cache_clear()
    assert azureml_v1.live_v1_run() is None
    assert azureml_v1.log_epoch_v1(1, EPOCH_METRICS) is None
    azureml_v1.live_v1_run.cache_clear()


def test_v1_logging_skips_an_offline_run(v1_run):
    run = v1_run(FakeRun("OfflineRun_0f6b2c"))
    azureml_v1.log_epoch_v1(1, EPOCH_METRICS)
    assert run.rows == []


def test_v1_logging_logs_one_row_per_epoch_to_a_live_run(v1_run):
    run = v1_run(FakeRun("train_pytorch_model_1700000000_abcd"))
    azureml_v1.log_epoch_v1(1, EPOCH_METRICS)
    azureml_v1.log_epoch_v1(2, EPOCH_METRICS)
    assert [name for name, _ in run.rows] == [azureml_v1.TABLE_NAME] * 2
    assert run.rows[1][1] == {"epoch": 2, **azureml_v1.v1_metric_row(EPOCH_METRICS)}


def test_v1_logging_only_on_rank_0(v1_run, monkeypatch):
    run = v1_run(FakeRun("live"))
    monkeypatch.setenv("RANK", "1")
    azureml_v1.log_epoch_v1(1, EPOCH_METRICS)
    assert run.rows == []


def test_v1_logging_failure_does_not_stop_training(v1_run):
    class BrokenRun(FakeRun):
        def log_row(self, name, description=None, **kwargs):
            raise RuntimeError("service unavailable")

    v1_run(BrokenRun("live"))
    azureml_v1.log_epoch_v1(1, EPOCH_METRICS)  # warns, does not raise


# --- issue 21 item 8: the name is checked before training; a restart registers what it had not ---------------------

def train_cli(untrained, data, out, *extra) -> list[str]:
    from conftest import FAST_TRAIN
    return ["train", "--untrained-model", str(untrained), "--training-data", str(data), "--validation-data",
            str(data), "--trained-model", str(out), *FAST_TRAIN, "--batch-size", "4", "--epochs", "1", *extra]


@pytest.mark.parametrize("name", ["x;y", "a/b", " padded ", "-leading-dash", "n" * 256])
def test_a_registered_model_name_the_registry_refuses_is_refused_before_training(tmp_path, resnet18_dir, capsys,
                                                                                 name):
    from train_pytorch_model.cli import main

    out = tmp_path / "out"
    assert main(train_cli(resnet18_dir, tmp_path / "not read yet", out, f"--registered-model-name={name}")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith('InvalidParameterError: Parameter "registered_model_name"'), last
    assert not out.exists()


def test_a_restart_registers_the_finished_output_once(tracking, tmp_path, make_image_folder, resnet18_dir, capsys):
    from train_pytorch_model.cli import main
    from train_pytorch_model.registry import RUN_IDENTITY_TAG

    data = make_image_folder("data", {"a": 4, "b": 4})
    out = tmp_path / "out"
    # The first attempt wrote the model and stopped before registering it (as a preemption, or the old bug, does).
    assert main(train_cli(resnet18_dir, data, out)) == 0
    assert MlflowClient().search_model_versions("name = 'restarted'") == []
    for _ in range(2):  # the restart registers it; a further restart finds it registered
        assert main(train_cli(resnet18_dir, data, out, "--registered-model-name", "restarted")) == 0
    versions = MlflowClient().search_model_versions("name = 'restarted'")
    assert len(versions) == 1, versions
    info = __import__("json").loads((out / "training_info.json").read_text())
    assert versions[0].tags[RUN_IDENTITY_TAG] == info["training"]["run_identity"]
