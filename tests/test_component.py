"""component.yaml, pipeline.yml and environment/: validated by the real azure-ai-ml SDK, offline,
plus the rules the SDK does not check (optional blocks, default ranges, reserved names)."""

from __future__ import annotations

import argparse
import copy
import keyword
import re
from pathlib import Path

import pytest
import tomllib
import yaml
from azure.ai.ml import Input, dsl, load_component, load_job
from azure.ai.ml.entities._job.distribution import PyTorchDistribution
from packaging.requirements import Requirement

import train_pytorch_model
from train_pytorch_model import config
from train_pytorch_model.component_runner import BINDING, EXPRESSION, OPTIONAL_BLOCK, bind_command

REPO = Path(__file__).resolve().parents[1]
COMPONENT = REPO / "component.yaml"
PIPELINE = REPO / "pipeline.yml"
SDK_EXAMPLE_MARKER = "<!-- executed by tests/test_component.py -->"

# name -> (type, default, optional, min): what issue 4 asks for.
EXPECTED_INPUTS = {
    "untrained_model": ("uri_folder", None, False, None),
    "training_data": ("uri_folder", None, False, None),
    "validation_data": ("uri_folder", None, True, None),  # optional: a stratified split when absent (issue 24)
    "image_column": ("string", None, True, None),
    "label_column": ("string", None, True, None),
    "task": ("string", None, True, None),
    "validation_fraction": ("number", None, True, 0.01),
    "epochs": ("integer", 5, False, 1),
    "batch_size": ("integer", 16, False, 1),
    "learning_rate": ("number", 0.001, False, 1e-9),  # "> 0": the schema only has an inclusive min
    "random_seed": ("integer", 1, False, 0),
    "patience": ("integer", 3, False, 0),  # 0 disables early stopping
    "image_size": ("integer", None, True, 32),
    "num_workers": ("integer", None, True, 0),
    "optimizer": ("string", None, True, None),
    "augmentation": ("string", None, True, None),
    "warmup_epochs": ("integer", None, True, 0),
    "label_smoothing": ("number", None, True, 0),
    "precision": ("string", None, True, None),
    "cache_validation": ("boolean", None, True, None),
    "registered_model_name": ("string", None, True, None),
}
# The train flags the component may use (the trainer has more; the component exposes these).
ALLOWED_FLAGS = {"--untrained-model", "--training-data", "--validation-data", "--trained-model", "--epochs",
                 "--batch-size", "--learning-rate", "--random-seed", "--patience", "--image-size",
                 "--registered-model-name", "--num-workers", "--checkpoint-dir", "--optimizer", "--augmentation",
                 "--warmup-epochs", "--label-smoothing", "--precision", "--cache-validation", "--image-column",
                 "--label-column", "--task", "--validation-fraction"}
# Names that mean something else in an input definition or a job YAML (`path: azureml:...`),
# Python keywords (the SDK turns inputs into keyword arguments) and `self`.
RESERVED_NAMES = set(keyword.kwlist) | {"self", "path", "type", "mode", "name", "version", "description",
                                        "default", "optional", "min", "max", "enum"}


def component_spec() -> dict:
    return yaml.safe_load(COMPONENT.read_text())


# --- the SDK's own validation -------------------------------------------------------------------


def test_sdk_validates_the_component():
    component = load_component(source=COMPONENT)
    result = component._validate()
    assert result.passed, result.error_messages
    assert component.type == "command"
    assert component.name == "train_pytorch_model"
    assert component.display_name == "Train PyTorch Model"
    assert component.version == train_pytorch_model.__version__
    assert component.tags["category"] == "Model Training"
    assert component.is_deterministic is True
    assert "untrained_model" in component.description and "validation_data" in component.description
    assert isinstance(component.distribution, PyTorchDistribution)
    assert (COMPONENT.parent / component.code).resolve() == REPO / "src"
    assert component.environment.image.startswith("mcr.microsoft.com/azureml/")
    assert component.environment.conda_file["dependencies"][0] == "python=3.11"


def test_inputs_and_output_are_what_the_issue_says():
    component = load_component(source=COMPONENT)
    assert list(component.inputs) == list(EXPECTED_INPUTS)
    for name, (kind, default, optional, minimum) in EXPECTED_INPUTS.items():
        port = component.inputs[name]
        assert (port.type, port.default, bool(port.optional), port.min) == (kind, default, optional, minimum), name
        assert port.description, f"{name} needs a description"
    assert component.inputs["learning_rate"].min > 0
    assert list(component.outputs) == ["trained_model", "checkpoints"]
    assert component.outputs["checkpoints"].type == "uri_folder" and component.outputs["checkpoints"].mode == "rw_mount"
    assert component.outputs["trained_model"].type == "mlflow_model"
    assert component.outputs["trained_model"].description


def sdk_example() -> str:
    """The SDK snippet of the docs (README.md once merged, docs/component.md until then)."""
    for doc in (REPO / "README.md", REPO / "docs" / "component.md"):
        if doc.is_file() and SDK_EXAMPLE_MARKER in doc.read_text():
            after = doc.read_text().split(SDK_EXAMPLE_MARKER, 1)[1]
            return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)
    raise AssertionError(f"no doc holds the marked SDK example ({SDK_EXAMPLE_MARKER})")


def test_the_documented_dsl_pipeline_validates(monkeypatch):
    monkeypatch.chdir(REPO)  # the snippet loads component.yaml from the repo root
    namespace: dict = {}
    exec(compile(sdk_example(), "docs SDK example", "exec"), namespace)
    pipeline_job = namespace["pipeline_job"]
    result = pipeline_job._validate()
    assert result.passed, result.error_messages
    node = pipeline_job.jobs["train"]
    assert node.component.name == "train_pytorch_model"
    assert pipeline_job.outputs["trained_model"].type == "mlflow_model"
    assert pipeline_job.outputs["trained_model"].name  # registered as a model asset
    assert node.distribution.process_count_per_instance >= 1 and node.resources.instance_count >= 1


def test_dsl_pipeline_multi_node_needs_only_resources_and_process_count():
    component = load_component(source=COMPONENT)

    @dsl.pipeline(default_compute="gpu-cluster")
    def two_nodes_four_gpus(images):
        train = component(untrained_model=images, training_data=images, validation_data=images)
        train.resources = {"instance_count": 2}
        train.distribution.process_count_per_instance = 4
        return {"trained_model": train.outputs.trained_model}

    job = two_nodes_four_gpus(Input(type="uri_folder", path="azureml:images@latest"))
    assert job._validate().passed
    node = job._to_dict()["jobs"]["train"]
    assert node["resources"] == {"instance_count": 2}
    assert node["distribution"] == {"type": "pytorch", "process_count_per_instance": 4}


def test_sdk_validates_the_pipeline_job():
    job = load_job(PIPELINE)
    result = job._validate()
    assert result.passed, result.error_messages
    output = job.outputs["trained_model"]
    assert output.type == "mlflow_model" and output.name and output.version
    inputs = job._to_dict()["inputs"]
    for name in ("untrained_model", "training_data", "validation_data"):
        assert inputs[name]["type"] == "uri_folder"
        assert inputs[name]["path"].startswith("azureml:"), "inputs are data assets"


def test_pipeline_binds_the_component_with_known_names():
    # The SDK accepts a misspelled node input (it is silently sent to the service); we do not.
    pipeline = yaml.safe_load(PIPELINE.read_text())
    node = pipeline["jobs"]["train"]
    assert (PIPELINE.parent / node["component"]).resolve() == COMPONENT
    spec = component_spec()
    assert set(node["inputs"]) <= set(spec["inputs"])
    required = {name for name, port in spec["inputs"].items()
                if not port.get("optional") and port.get("default") is None}
    assert required <= set(node["inputs"])
    assert set(node["outputs"]) == set(spec["outputs"])
    assert node["distribution"]["type"] == "pytorch"


# --- what the SDK does not check ----------------------------------------------------------------


def used_bindings(text: str) -> set[tuple[str, str]]:
    return {BINDING.match(expr).groups() for expr in EXPRESSION.findall(text) if BINDING.match(expr)}


def lint_component(spec: dict) -> list[str]:
    """Problems the SDK lets through: each one would fail or misbehave in a real job."""
    problems = []
    inputs, outputs = spec.get("inputs") or {}, spec.get("outputs") or {}
    command = spec["command"]
    inside = set().union(*(used_bindings(block) for block in OPTIONAL_BLOCK.findall(command)))
    outside = used_bindings(OPTIONAL_BLOCK.sub(" ", command))
    seen: dict[str, str] = {}
    for group, ports in (("inputs", inputs), ("outputs", outputs)):
        for name in ports:
            if name.lower() in RESERVED_NAMES:
                problems.append(f"{group}.{name}: reserved name")
            if name.lower() in seen:
                problems.append(f"{group}.{name}: same name as {seen[name.lower()]} ignoring case")
            seen[name.lower()] = f"{group}.{name}"
            if (group, name) not in inside | outside:
                problems.append(f"{group}.{name}: not used by the command")
    for name in outputs:
        if ("outputs", name) in inside:
            problems.append(f"outputs.{name}: inside $[[ ]] (outputs always exist)")
    for name, port in inputs.items():
        optional = bool(port.get("optional"))
        if optional and ("inputs", name) in outside:
            problems.append(f"inputs.{name}: optional but used outside $[[ ]]")
        if not optional and ("inputs", name) in inside:
            problems.append(f"inputs.{name}: required but inside $[[ ]]")
        default, low, high = port.get("default"), port.get("min"), port.get("max")
        kind = port.get("type")
        numeric = (int,) if kind == "integer" else (int, float)
        if kind in ("integer", "number"):
            for label, value in (("default", default), ("min", low), ("max", high)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, numeric)):
                    problems.append(f"inputs.{name}: {label} {value!r} is not an {kind}")
        if default is not None and low is not None and default < low:
            problems.append(f"inputs.{name}: default {default} is below min {low}")
        if default is not None and high is not None and default > high:
            problems.append(f"inputs.{name}: default {default} is above max {high}")
        if port.get("enum") and default is not None and default not in port["enum"]:
            problems.append(f"inputs.{name}: default {default!r} is not in enum")
    return problems


def test_component_passes_the_checks_the_sdk_skips():
    assert lint_component(component_spec()) == []


def broken(edit) -> dict:
    spec = copy.deepcopy(component_spec())
    edit(spec)
    return spec


@pytest.mark.parametrize("edit, problem", [
    (lambda s: s.update(command=s["command"].replace("--epochs ${{inputs.epochs}}",
                                                     "$[[--epochs ${{inputs.epochs}}]]")),
     "inputs.epochs: required but inside $[[ ]]"),
    (lambda s: s.update(command=s["command"].replace("$[[--image-size ${{inputs.image_size}}]]",
                                                     "--image-size ${{inputs.image_size}}")),
     "inputs.image_size: optional but used outside $[[ ]]"),
    (lambda s: s["inputs"]["epochs"].update(default=0), "inputs.epochs: default 0 is below min 1"),
    (lambda s: s["inputs"]["epochs"].update(max=4), "inputs.epochs: default 5 is above max 4"),
    (lambda s: s["inputs"]["epochs"].update(default=5.5), "inputs.epochs: default 5.5 is not an integer"),
    (lambda s: s["inputs"].update(path=s["inputs"].pop("training_data")), "inputs.path: reserved name"),
    (lambda s: s["inputs"].update(Epochs={"type": "integer"}), "same name as inputs.epochs ignoring case"),
    (lambda s: s["inputs"].update(unused={"type": "string"}), "inputs.unused: not used by the command"),
])
def test_the_checks_catch_what_they_claim(edit, problem):
    spec = broken(edit)
    assert problem in " | ".join(lint_component(spec))


def test_sdk_really_lets_those_through(tmp_path):
    # Why lint_component exists: the SDK validates each of these broken components.
    spec = component_spec()
    spec["inputs"]["epochs"]["default"] = 0
    spec["inputs"]["image_size"]["optional"] = False
    spec["inputs"]["path"] = spec["inputs"].pop("training_data")
    spec["command"] = spec["command"].replace("inputs.training_data", "inputs.path")
    spec["command"] = spec["command"].replace("--epochs ${{inputs.epochs}}", "$[[--epochs ${{inputs.epochs}}]]")
    spec["command"] = spec["command"].replace("$[[--num-workers ${{inputs.num_workers}}]]",
                                              "--num-workers ${{inputs.num_workers}}")
    assert len(lint_component(spec)) == 5
    spec["code"] = str(REPO / "src")
    spec["environment"]["conda_file"] = str(REPO / "environment" / "conda.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert load_component(source=path)._validate().passed


# --- the command against the real train CLI -------------------------------------------------------


def test_the_command_parses_with_the_train_cli(tmp_path):
    spec = component_spec()
    inputs = {name: str(tmp_path) if port["type"] == "uri_folder" else None for name, port in spec["inputs"].items()}
    inputs.update({name: str(port["default"]) for name, port in spec["inputs"].items() if "default" in port})
    inputs.update(image_size="64", num_workers="2", registered_model_name="my-model", optimizer="sgd",
                  augmentation="crop", warmup_epochs="1", label_smoothing="0.1", precision="auto",
                  cache_validation="True", image_column="path", label_column="y",  # booleans: True/False
                  task="multilabel", validation_fraction="0.25")
    argv = bind_command(spec["command"], inputs,
                        {"trained_model": str(tmp_path / "out"), "checkpoints": str(tmp_path / "ckpt")})
    assert argv[:4] == ["python", "-m", "train_pytorch_model", "train"]
    assert {word for word in argv if word.startswith("--")} == ALLOWED_FLAGS

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(argv[4:])
    assert (args.epochs, args.batch_size, args.learning_rate, args.random_seed, args.patience) == (5, 16, 0.001, 1, 3)
    assert (args.image_size, str(args.num_workers), args.registered_model_name) == (64, "2", "my-model")
    assert (args.optimizer, args.augmentation, args.warmup_epochs, args.label_smoothing, args.cache_validation) == \
        ("sgd", "crop", 1, 0.1, True)
    assert (args.task, args.validation_fraction) == ("multilabel", 0.25)
    assert Path(args.trained_model) == tmp_path / "out"
    assert Path(args.checkpoint_dir) == tmp_path / "ckpt"


# --- environment/ ----------------------------------------------------------------------------------


def conda_pip_requirements() -> dict[str, Requirement]:
    conda = yaml.safe_load((REPO / "environment" / "conda.yaml").read_text())
    assert "python=3.11" in conda["dependencies"]
    pip = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    return {Requirement(line).name.lower(): Requirement(line) for line in pip}


def test_conda_environment_matches_the_package():
    conda = conda_pip_requirements()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        wanted = Requirement(line)
        assert wanted.name.lower() in conda, f"{wanted.name} is missing from environment/conda.yaml"
        pinned = [spec.version for spec in conda[wanted.name.lower()].specifier if spec.operator == "=="]
        if pinned:
            assert wanted.specifier.contains(pinned[0]), f"conda pins {wanted.name}=={pinned[0]} outside {line}"
        else:
            assert conda[wanted.name.lower()].specifier == wanted.specifier, wanted.name
    assert str(conda["torch"].specifier) == "==2.14.1" and str(conda["torchvision"].specifier) == "==0.29.1"


def test_conda_environment_fits_azureml_mlflow():
    conda = conda_pip_requirements()
    assert "azureml-mlflow" in conda
    # azureml-mlflow 1.62 requires mlflow-skinny<=3.15.0, and mlflow X pins mlflow-skinny X.
    mlflow_version = next(iter(conda["mlflow"].specifier)).version
    assert Requirement("mlflow-skinny<=3.15.0").specifier.contains(mlflow_version)


def test_dockerfile_builds_on_the_component_image():
    dockerfile = (REPO / "environment" / "Dockerfile").read_text()
    assert f"FROM {component_spec()['environment']['image']}" in dockerfile
    assert "conda.yaml" in dockerfile
