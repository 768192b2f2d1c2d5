"""deploy/ and sweep.yml, validated offline by the azure-ai-ml SDK (no workspace, no network)."""

from __future__ import annotations

import json

import pytest
from azure.ai.ml import (
    load_batch_deployment,
    load_batch_endpoint,
    load_component,
    load_job,
    load_online_deployment,
    load_online_endpoint,
)
from azure.ai.ml.entities import ManagedOnlineDeployment

from conftest import REPO

DEPLOY = REPO / "deploy"


def test_online_endpoint_and_deployment_serve_the_registered_mlflow_model():
    endpoint = load_online_endpoint(DEPLOY / "online-endpoint.yml")
    deployment = load_online_deployment(DEPLOY / "online-deployment.yml")
    assert isinstance(deployment, ManagedOnlineDeployment)
    assert deployment.endpoint_name == endpoint.name and endpoint.auth_mode == "key"
    assert str(deployment.model).startswith("azureml:") or deployment.model == "train-pytorch-model:1"
    # An MLflow model deploys without a scoring script or environment: Azure ML builds both from MLmodel.
    assert deployment.code_configuration is None and deployment.environment is None


def test_batch_endpoint_and_deployment_score_folders_of_images():
    endpoint = load_batch_endpoint(DEPLOY / "batch-endpoint.yml")
    with pytest.warns(UserWarning):  # the SDK's loader builds its deprecated base class; the YAML is the CLI's
        deployment = load_batch_deployment(DEPLOY / "batch-deployment.yml")
    assert deployment.endpoint_name == endpoint.name
    script = DEPLOY / "batch" / deployment.code_configuration.scoring_script
    assert script.is_file() and deployment.mini_batch_size >= 1 and deployment.output_action == "append_row"
    assert deployment.environment.conda_file["name"] == "train-pytorch-model"


def test_sample_requests_are_azure_ml_and_mlflow_bodies():
    azure = json.loads((DEPLOY / "requests" / "online-input-data.json").read_text())
    assert azure["input_data"]["columns"] == ["image"] and len(azure["input_data"]["data"]) == 1
    split = json.loads((DEPLOY / "requests" / "mlflow-dataframe-split.json").read_text())
    inputs = json.loads((DEPLOY / "requests" / "mlflow-inputs.json").read_text())
    image = azure["input_data"]["data"][0][0]
    assert split["dataframe_split"]["data"] == [[image]] and inputs["inputs"]["image"] == [image]


def test_sweep_job_validates_and_searches_inputs_of_the_component():
    job = load_job(REPO / "sweep.yml")
    result = job._validate()
    assert result.passed, result.error_messages
    [sweep] = job.jobs.values()
    assert sweep.objective.goal == "maximize" and sweep.objective.primary_metric == "valid_top1"
    assert type(sweep.early_termination).__name__ == "BanditPolicy"
    assert set(sweep.search_space) == {"learning_rate", "batch_size", "optimizer"}
    assert sweep.search_space["optimizer"].values == ["adamw", "sgd"]
    # The SDK does not check that the searched names are inputs of the trial: check it here.
    component = load_component(REPO / "component.yaml")
    assert set(sweep.search_space) <= set(component.inputs), set(sweep.search_space) - set(component.inputs)



def test_the_scripted_online_deployment_runs_the_azure_ml_scoring_script():
    deployment = load_online_deployment(DEPLOY / "online-deployment-scripted.yml")
    endpoint = load_online_endpoint(DEPLOY / "online-endpoint.yml")
    assert deployment.endpoint_name == endpoint.name
    assert deployment.model == load_online_deployment(DEPLOY / "online-deployment.yml").model
    code = DEPLOY / deployment.code_configuration.code
    assert (code / deployment.code_configuration.scoring_script).is_file()
    pip = deployment.environment.conda_file["dependencies"][-1]["pip"]
    assert "azureml-inference-server-http==1.5.1" in pip  # the version tests/test_azureml_serving.py runs
    pinned = {line for line in (REPO / "pyproject.toml").read_text().split('"') if line.startswith("torch")}
    assert pinned <= set(pip), pinned - set(pip)


def test_request_files_hold_both_azure_ml_shapes():
    automl = json.loads((DEPLOY / "requests" / "automl-input-data.json").read_text())["input_data"]
    catalog = json.loads((DEPLOY / "requests" / "catalog-input-data.json").read_text())["input_data"]
    assert automl["columns"] == ["image"] and isinstance(automl["data"][0], str)
    assert isinstance(catalog, list) and catalog == automl["data"]
