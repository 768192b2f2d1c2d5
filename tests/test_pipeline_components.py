"""components/: the YAMLs of init-model, convert, score and evaluate, and the whole-pipeline job.

Validated by the real azure-ai-ml SDK (offline), linted for what the SDK lets through, parsed
against the real CLI, and run end to end locally with `run-component`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from azure.ai.ml import load_component, load_job

import train_pytorch_model
from test_component import lint_component
from train_pytorch_model import convert, evaluate, init_model, score
from train_pytorch_model.cli import main
from train_pytorch_model.component_runner import bind_command
from train_pytorch_model.models import MODEL_NAMES

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "components"
# file -> (component name, CLI module, subcommand, outputs)
STEPS = {
    "init_model.yaml": ("init_image_model", init_model, "init-model", ["untrained_model"]),
    "convert.yaml": ("convert_to_image_directory", convert, "convert", ["image_directory"]),
    "score.yaml": ("score_image_model", score, "score", ["scored_data"]),
    "evaluate.yaml": ("evaluate_image_model", evaluate, "evaluate", ["evaluation"]),
}


def spec_of(name: str) -> dict:
    return yaml.safe_load((COMPONENTS / name).read_text())


@pytest.mark.parametrize("file", STEPS)
def test_sdk_validates_the_component(file):
    name, _, _, outputs = STEPS[file]
    component = load_component(source=COMPONENTS / file)
    result = component._validate()
    assert result.passed, result.error_messages
    assert (component.type, component.name, component.version) == ("command", name, train_pytorch_model.__version__)
    assert component.display_name and component.description and component.is_deterministic is True
    assert list(component.outputs) == outputs
    assert all(port.description for port in [*component.inputs.values(), *component.outputs.values()])
    assert (COMPONENTS / component.code).resolve() == REPO / "src"
    # The environment is the training component's: one image and one conda file for the whole pipeline.
    main_spec = yaml.safe_load((REPO / "component.yaml").read_text())["environment"]
    ours = spec_of(file)["environment"]
    assert ours["image"] == main_spec["image"]
    assert (COMPONENTS / ours["conda_file"]).resolve() == (REPO / main_spec["conda_file"]).resolve()


@pytest.mark.parametrize("file", STEPS)
def test_component_passes_the_checks_the_sdk_skips(file):
    assert lint_component(spec_of(file)) == []


def sample_value(port: dict, tmp_path: Path) -> str:
    if port["type"] in ("uri_folder", "uri_file", "mlflow_model"):
        return str(tmp_path / "some_input")
    if "default" in port:
        return str(port["default"])
    return {"integer": "2", "number": "0.5", "boolean": "True"}.get(port["type"], "text")


@pytest.mark.parametrize("file", STEPS)
def test_command_parses_with_the_cli(file, tmp_path):
    _, module, subcommand, outputs = STEPS[file]
    spec = spec_of(file)
    inputs = {name: sample_value(port, tmp_path) for name, port in spec["inputs"].items()}
    argv = bind_command(spec["command"], inputs, {name: str(tmp_path / name) for name in outputs})
    assert argv[:4] == ["python", "-m", "train_pytorch_model", subcommand]
    parser = argparse.ArgumentParser(exit_on_error=False)
    module.add_arguments(parser)
    args = parser.parse_args(argv[4:])
    for name in outputs:  # each output port is the flag of the same name
        assert str(getattr(args, name)) == str(tmp_path / name)
    flags = {word for word in argv[4:] if word.startswith("--")}
    assert len(flags) == len(spec["inputs"]) + len(outputs)  # every port reaches the command


def test_init_model_offers_every_torchvision_architecture():
    port = spec_of("init_model.yaml")["inputs"]["model_name"]
    assert tuple(port["enum"]) == MODEL_NAMES and len(MODEL_NAMES) > 13


def test_sdk_validates_the_whole_pipeline():
    job = load_job(COMPONENTS / "pipeline.yml")
    result = job._validate()
    assert result.passed, result.error_messages
    assert list(job.jobs) == ["convert_train", "convert_valid", "convert_test", "init_model", "train", "score",
                              "evaluate"]
    # The SDK sends misspelled node inputs to the service silently; check every binding here.
    pipeline = yaml.safe_load((COMPONENTS / "pipeline.yml").read_text())
    for node_name, node in pipeline["jobs"].items():
        component = yaml.safe_load((COMPONENTS / node["component"]).read_text())
        assert set(node.get("inputs", {})) <= set(component["inputs"]), node_name
        required = {n for n, p in component["inputs"].items() if not p.get("optional") and "default" not in p}
        assert required <= set(node.get("inputs", {})), node_name
        assert set(node.get("outputs", {})) <= set(component["outputs"]), node_name
        for value in node.get("inputs", {}).values():
            if isinstance(value, str) and value.startswith("${{parent.jobs."):
                source, _, output = value[len("${{parent.jobs."):-2].split(".")
                source_spec = yaml.safe_load((COMPONENTS / pipeline["jobs"][source]["component"]).read_text())
                assert output in source_spec["outputs"], value


def run_component(file: str, inputs: dict, outputs: dict) -> None:
    args = ["run-component", str(file)]
    args += [f"--input={k}={v}" for k, v in inputs.items()]
    args += [f"--output={k}={v}" for k, v in outputs.items()]
    assert main(args) == 0, file


@pytest.mark.slow
def test_the_pipeline_runs_locally_through_its_components(tmp_path, make_image_folder):
    train_tree = make_image_folder("raw_train", {"circle": 6, "square": 6}, size=(40, 36))
    test_tree = make_image_folder("raw_test", {"circle": 3, "square": 3}, size=(40, 36), seed=1)
    d = {name: tmp_path / name for name in ("train", "test", "untrained", "trained", "scored", "evaluation")}
    run_component(COMPONENTS / "convert.yaml", {"input_data": train_tree}, {"image_directory": d["train"]})
    run_component(COMPONENTS / "convert.yaml", {"input_data": test_tree}, {"image_directory": d["test"]})
    # pretrained defaults to true (as designer's); this test stays offline.
    run_component(COMPONENTS / "init_model.yaml", {"model_name": "resnet18", "pretrained": False},
                  {"untrained_model": d["untrained"]})
    run_component(REPO / "component.yaml",
                  {"untrained_model": d["untrained"], "training_data": d["train"], "validation_data": d["test"],
                   "epochs": 1, "batch_size": 4, "image_size": 32, "num_workers": 0},
                  {"trained_model": d["trained"], "checkpoints": d["trained"].parent / "checkpoints"})
    run_component(COMPONENTS / "score.yaml", {"trained_model": d["trained"], "image_directory": d["test"],
                                              "num_workers": 0}, {"scored_data": d["scored"]})
    run_component(COMPONENTS / "evaluate.yaml", {"scored_data": d["scored"], "trained_model": d["trained"],
                                                 "image_directory": d["test"]}, {"evaluation": d["evaluation"]})

    assert (d["train"] / "_meta.yaml").read_text().startswith("type: ImageDirectory")
    assert (d["untrained"] / "model").is_file()
    table = pd.read_parquet(d["scored"] / "scored.parquet")
    assert len(table) == 6 and set(table["category"]) == {"circle", "square"}
    metrics = json.loads((d["evaluation"] / "metrics.json").read_text())
    assert metrics["evaluated_rows"] == 6 and set(metrics["top_k_accuracy"]) == {"1"}  # k=3, 5 > 2 classes
    report = (d["evaluation"] / "report.html").read_text()
    wrong = int((table["category"] != table["Scored Labels"]).sum())
    # Each wrong image of the gallery: the image and its heat map, embedded.
    assert report.count('alt="heat map of the prediction"') == wrong
