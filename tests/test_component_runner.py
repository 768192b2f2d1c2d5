"""`run-component`: binding a component YAML like Azure ML, then running it for real."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from train_pytorch_model import component_runner
from train_pytorch_model.component_runner import bind_command
from train_pytorch_model.errors import ComponentSpecError

REPO = Path(__file__).resolve().parents[1]
COMPONENT = REPO / "component.yaml"
FIXTURES = REPO / "examples"
IMAGES = FIXTURES / "legacy_image_directory"
UNTRAINED = FIXTURES / "legacy_untrained_model" / "resnet18"


def run_component(component: Path, inputs: dict, outputs: dict, *extra: str) -> int:
    """Parse and run exactly like `python -m train_pytorch_model run-component ...`."""
    parser = argparse.ArgumentParser()
    component_runner.add_arguments(parser)
    argv = [str(component), *extra]
    argv += [f"--input={name}={value}" for name, value in inputs.items()]
    argv += [f"--output={name}={value}" for name, value in outputs.items()]
    return component_runner.run(parser.parse_args(argv))


def dry_run(capsys, inputs: dict, outputs: dict | None = None) -> list[str]:
    assert run_component(COMPONENT, inputs, outputs or {"trained_model": "out"}, "--dry-run") == 0
    return shlex.split(capsys.readouterr().out)


@pytest.fixture
def data_inputs(tmp_path):
    folders = {name: tmp_path / name for name in ("untrained_model", "training_data", "validation_data")}
    for folder in folders.values():
        folder.mkdir()
    return {name: str(folder) for name, folder in folders.items()}


# --- binding the real component.yaml -------------------------------------------------------


def test_binds_required_inputs_and_yaml_defaults_and_drops_unset_optional_blocks(capsys, data_inputs, tmp_path):
    argv = dry_run(capsys, data_inputs, {"trained_model": str(tmp_path / "out"), "checkpoints": str(tmp_path / "ckpt")})
    assert argv == [
        sys.executable, "-m", "train_pytorch_model", "train",
        "--untrained-model", data_inputs["untrained_model"],
        "--training-data", data_inputs["training_data"],
        "--validation-data", data_inputs["validation_data"],
        "--trained-model", str(tmp_path / "out"),
        "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--epochs", "5", "--batch-size", "16", "--learning-rate", "0.001",
        "--random-seed", "1", "--patience", "3",
    ]


def test_given_optional_inputs_keep_their_blocks(capsys, data_inputs):
    argv = dry_run(capsys, {**data_inputs, "image_size": "32", "num_workers": "0",
                            "registered_model_name": "my model", "epochs": "2"})
    assert argv[argv.index("--epochs") + 1] == "2"
    assert argv[-6:] == ["--image-size", "32", "--num-workers", "0", "--registered-model-name", "my model"]


def test_an_empty_value_leaves_an_optional_input_unset(capsys, data_inputs):
    assert "--image-size" not in dry_run(capsys, {**data_inputs, "image_size": ""})


def test_relative_paths_become_absolute_because_the_command_runs_elsewhere(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("m", "t", "v"):
        (tmp_path / name).mkdir()
    argv = dry_run(capsys, {"untrained_model": "m", "training_data": "t", "validation_data": "v"},
                   {"trained_model": "out"})
    assert argv[argv.index("--training-data") + 1] == str(tmp_path / "t")
    assert argv[argv.index("--trained-model") + 1] == str(tmp_path / "out")


@pytest.mark.parametrize("name, value, message", [
    ("epochs", "0", "minimum is 1"),
    ("epochs", "1.5", "must be an integer"),
    ("batch_size", "many", "must be an integer"),
    ("learning_rate", "-0.1", "minimum"),
    ("learning_rate", "nan", "finite"),
    ("patience", "-1", "minimum is 0"),
    ("image_size", "0", "minimum is 32"),
    ("epochs", "1_0", "must be an integer"),  # int() takes these; train's integer flags do not
    ("epochs", " 2 ", "must be an integer"),
    ("epochs", "\u0662", "must be an integer"),
])
def test_parameters_are_type_and_range_checked_from_the_yaml(data_inputs, name, value, message):
    with pytest.raises(ComponentSpecError, match=message) as error:
        run_component(COMPONENT, {**data_inputs, name: value}, {"trained_model": "out"}, "--dry-run")
    assert name in str(error.value)


def test_a_missing_required_input_is_named(data_inputs):
    del data_inputs["training_data"]
    with pytest.raises(ComponentSpecError, match="'training_data'.*required"):
        run_component(COMPONENT, data_inputs, {"trained_model": "out"}, "--dry-run")


def test_validation_data_is_optional(data_inputs, capsys):
    del data_inputs["validation_data"]
    argv = dry_run(capsys, data_inputs)
    assert "--validation-data" not in argv and "--training-data" in argv


def test_unknown_inputs_and_outputs_are_refused(data_inputs):
    with pytest.raises(ComponentSpecError, match="Unknown input.*epoch\\b"):
        run_component(COMPONENT, {**data_inputs, "epoch": "3"}, {"trained_model": "out"}, "--dry-run")
    with pytest.raises(ComponentSpecError, match="Unknown output.*model"):
        run_component(COMPONENT, data_inputs, {"trained_model": "out", "model": "x"}, "--dry-run")


def test_unbound_outputs_get_a_fresh_folder_each_run(capsys, data_inputs, tmp_path):
    # As in Azure ML, where every job gets new output folders: a stale checkpoint is never picked up.
    first = dry_run(capsys, data_inputs, {"trained_model": str(tmp_path / "out")})
    second = dry_run(capsys, data_inputs, {"trained_model": str(tmp_path / "out")})
    folder = first[first.index("--checkpoint-dir") + 1]
    assert "component-output-checkpoints-" in folder
    assert folder != second[second.index("--checkpoint-dir") + 1]
    assert not Path(folder).exists()  # a dry run creates nothing


def test_data_inputs_must_exist(data_inputs, tmp_path):
    with pytest.raises(ComponentSpecError, match="training_data.*existing folder"):
        run_component(COMPONENT, {**data_inputs, "training_data": str(tmp_path / "nope")},
                      {"trained_model": "out"}, "--dry-run")


@pytest.mark.parametrize("pairs, message", [(["epochs"], "NAME=VALUE"), (["epochs=1", "epochs=2"], "twice")])
def test_malformed_bindings(pairs, message):
    parser = argparse.ArgumentParser()
    component_runner.add_arguments(parser)
    args = parser.parse_args([str(COMPONENT), *[f"--input={pair}" for pair in pairs]])
    with pytest.raises(ComponentSpecError, match=message):
        component_runner.run(args)


# --- bind_command on its own ------------------------------------------------------------------


def test_values_stay_one_argument_whatever_they_hold():
    value = """a b 'c' "d" $HOME ; rm -rf x"""
    argv = bind_command("run --x ${{inputs.x}} --y=${{inputs.x}}", {"x": value}, {})
    assert argv == ["run", "--x", value, f"--y={value}"]


def test_quoting_in_the_yaml_keeps_its_meaning():
    argv = bind_command("""run "--name ${{inputs.x}}" '--lit ${{outputs.o}}'""", {"x": "a b"}, {"o": "/o"})
    assert argv == ["run", "--name a b", "--lit /o"]


def test_optional_block_is_kept_only_when_every_input_in_it_is_bound():
    command = "run $[[--a ${{inputs.a}}]] $[[--ab ${{inputs.a}} ${{inputs.b}}]] $[[--o ${{outputs.o}} ${{inputs.b}}]]"
    assert bind_command(command, {"a": "1", "b": None}, {"o": "/o"}) == ["run", "--a", "1"]
    assert bind_command(command, {"a": "1", "b": "2"}, {"o": "/o"}) == [
        "run", "--a", "1", "--ab", "1", "2", "--o", "/o", "2"]


def test_multiline_optional_block():
    assert bind_command("run $[[--a\n ${{inputs.a}}]]", {"a": "1"}, {}) == ["run", "--a", "1"]


@pytest.mark.parametrize("command, inputs, message", [
    ("run ${{inputs.b}}", {"b": None}, "not given but is used outside"),
    ("run ${{inputs.c}}", {}, "does not declare"),
    ("run ${{outputs.c}}", {}, "does not declare"),
    ("run ${{search_space.lr}}", {}, "Unsupported expression"),
    ("run $[[--a ${{inputs.a}}", {"a": "1"}, "without its closing"),
    ("run $[[--nothing]]", {}, "binds no input"),
    ("run 'unclosed", {}, "cannot be split"),
    ("$[[${{inputs.a}}]]", {"a": None}, "empty"),
])
def test_bad_commands_are_reported(command, inputs, message):
    with pytest.raises(ComponentSpecError, match=message):
        bind_command(command, inputs, {})


# --- running: cwd, interpreter, environment, exit code ---------------------------------------

PROBE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    keys = ("PYTHONPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    (out / "probe.json").write_text(json.dumps({
        "argv": sys.argv[1:], "cwd": os.getcwd(), "executable": sys.executable,
        "out_existed": out.is_dir(), "env": {k: os.environ.get(k) for k in keys},
    }))
    sys.exit(int(sys.argv[sys.argv.index("--exit") + 1]))
""")


@pytest.fixture
def probe_component(tmp_path):
    code = tmp_path / "my code"
    code.mkdir()
    (code / "probe.py").write_text(PROBE)
    spec = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/commandComponent.schema.json",
        "type": "command", "name": "probe", "version": "1", "code": "my code",
        "inputs": {
            "data": {"type": "uri_folder"},
            "exit_code": {"type": "integer", "default": 0},
            "label": {"type": "string", "optional": True},
        },
        "outputs": {"out": {"type": "uri_folder"}},
        "command": "python probe.py --data ${{inputs.data}} --out ${{outputs.out}} "
                   "--exit ${{inputs.exit_code}} $[[--label ${{inputs.label}}]]",
        "environment": {"image": "python:3.11"},
        "distribution": {"type": "pytorch"},
    }
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_runs_in_the_code_folder_with_this_interpreter_like_azure_ml(probe_component, tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    data = tmp_path / "data with space"
    data.mkdir()
    out = tmp_path / "new" / "out put"
    code = run_component(probe_component, {"data": str(data), "label": "it's \"x\""}, {"out": str(out)})
    assert code == 0
    probe = json.loads((out / "probe.json").read_text())
    assert probe["argv"] == ["--data", str(data), "--out", str(out), "--exit", "0", "--label", "it's \"x\""]
    assert probe["cwd"] == str(tmp_path / "my code")
    assert probe["executable"] == sys.executable
    assert probe["out_existed"]
    assert probe["env"] == {"PYTHONPATH": "/somewhere/else", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
                            "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_returns_the_commands_exit_code(probe_component, tmp_path):
    (tmp_path / "d").mkdir()
    bound = {"data": str(tmp_path / "d"), "exit_code": "3"}
    assert run_component(probe_component, bound, {"out": str(tmp_path / "o")}) == 3


def test_legacy_designer_types_are_refused(probe_component, tmp_path):
    spec = yaml.safe_load(probe_component.read_text())
    spec["inputs"]["data"]["type"] = "AnyDirectory"
    probe_component.write_text(yaml.safe_dump(spec))
    with pytest.raises(ComponentSpecError, match="'data' has type 'AnyDirectory'"):
        run_component(probe_component, {"data": str(tmp_path)}, {"out": str(tmp_path / "o")})


def test_code_must_be_a_local_folder(probe_component, tmp_path):
    spec = yaml.safe_load(probe_component.read_text())
    spec["code"] = "azureml:my-code:1"
    probe_component.write_text(yaml.safe_dump(spec))
    (tmp_path / "d").mkdir()
    with pytest.raises(ComponentSpecError, match="not a local folder"):
        run_component(probe_component, {"data": str(tmp_path / "d")}, {"out": str(tmp_path / "o")})


@pytest.mark.slow
def test_cli_reports_errors_on_the_last_stderr_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train_pytorch_model", "run-component", str(COMPONENT),
         "--input", f"untrained_model={tmp_path}", "--output", f"trained_model={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("ComponentSpecError: Input 'training_data'")


# --- the real component, end to end ------------------------------------------------------------


@pytest.mark.slow
def test_component_yaml_trains_and_registers_end_to_end(tmp_path):
    """component.yaml -> run-component -> train, on the bundled fixtures, with a local registry."""
    import mlflow
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # An experiment whose artifacts live in tmp_path: the command's cwd is the code folder (src/),
    # and a sqlite store would otherwise put new experiments' artifacts in ./mlruns there.
    MlflowClient(tracking_uri).create_experiment("component-e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_EXPERIMENT_NAME="component-e2e")
    out = tmp_path / "trained model"
    result = subprocess.run(
        [sys.executable, "-m", "train_pytorch_model", "run-component", str(COMPONENT),
         "--input", f"untrained_model={UNTRAINED}", "--input", f"training_data={IMAGES}",
         "--input", f"validation_data={IMAGES}", "--output", f"trained_model={out}",
         "--output", f"checkpoints={tmp_path / 'checkpoints'}", "--input", "epochs=1", "--input", "batch_size=4",
         "--input", "image_size=32",
         "--input", "num_workers=0", "--input", "registered_model_name=component-e2e"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The output is an MLflow model and a legacy ModelDirectory.
    assert (out / "MLmodel").is_file() and (out / "_meta.yaml").is_file()
    # registered_model_name registered it in the MLflow registry of the tracking URI.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        assert MlflowClient().get_model_version("component-e2e", "1").run_id
        assert mlflow.pyfunc.load_model("models:/component-e2e/1") is not None
    finally:
        mlflow.set_tracking_uri(previous)


GOOD_PORTS = "inputs:\n  n: {type: integer, default: 1}\n"


@pytest.mark.parametrize("text, expected", [
    ("type: command\ncommand: echo\ninputs: [a, b]\n", "`inputs` must be a mapping"),
    ("type: command\ncommand: echo\noutputs: 3\n", "`outputs` must be a mapping"),
    ("type: command\ncommand: [python, -m, x]\n", "`command` must be one string"),
    ("type: command\ncommand: echo\ninputs:\n  n: {type: integer, min: abc}\n", "`min` must be a finite number"),
    ("type: command\ncommand: echo\ninputs:\n  n: {type: integer, max: .nan}\n", "`max` must be a finite number"),
    # float() cannot hold it: an OverflowError (UnexpectedError) before
    ("type: command\ncommand: echo\ninputs:\n  n: {type: integer, min: " + "9" * 401 + "}\n", "`min` must be a finite"),
    ("type: command\ncommand: echo\ninputs:\n  n: integer\n", "must be a mapping"),
    ("type: command\ncommand: echo\ninputs:\n  n: {type: [integer]}\n", "not a v2 component input type"),
    ("type: command\ncommand: echo\ninputs:\n  n: {type: string, enum: abc}\n", "`enum` must be a list"),
    ("type: command\ncommand: echo\ninputs:\n  n: {type: string, default: [1, 2]}\n", "single value"),
    ("type: command\ncommand: echo\ncode: [a]\n", "`code` has the wrong shape"),
    ("type: command\ncommand: echo\ndistribution: pytorch\n", "`distribution` has the wrong shape"),
    ("type: command\ncommand: echo ${{inputs.n}\n" + GOOD_PORTS, None),  # unclosed: left as text, not a crash
    ("- a\n- b\n", "is not a command component"),
    ("type: command\ncommand: echo\ninputs:\n  n: {type: string, default: &a [*a]}\n", "anchor or alias"),
    ("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b]\n"
     "d: [*c, *c, *c, *c, *c, *c, *c, *c]\ntype: command\ncommand: echo\n", "anchor or alias"),
    ("type: command\ncommand: echo\n  bad: indent\n", "not valid YAML"),
])
def test_malformed_component_yaml_is_a_component_spec_error(tmp_path, text, expected):
    spec = tmp_path / "component.yaml"
    spec.write_text(text)
    args = argparse.Namespace(component=spec, input=[], output=[], dry_run=True)
    if expected is None:
        assert component_runner.run(args) == 0
        return
    with pytest.raises(ComponentSpecError, match=expected) as caught:
        component_runner.run(args)
    assert len(str(caught.value)) < 600


def test_the_mlflow_store_stays_where_the_caller_runs(probe_component, tmp_path, monkeypatch):
    """The command runs in the code folder (uploaded with the component to Azure ML): a default sqlite store
    there would land inside src/. It is the caller's working folder's, unless MLFLOW_TRACKING_URI says otherwise."""
    from train_pytorch_model.component_runner import job_environment

    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert job_environment({})["MLFLOW_TRACKING_URI"] == f"sqlite:///{caller / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert job_environment({})["MLFLOW_TRACKING_URI"] == "sqlite:////elsewhere/m.db"


def test_an_empty_output_path_is_refused_not_the_current_folder(data_inputs):
    with pytest.raises(ComponentSpecError, match="bound to an empty path"):
        run_component(COMPONENT, data_inputs, {"trained_model": "out", "checkpoints": ""}, "--dry-run")
