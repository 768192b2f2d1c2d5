"""config.py: one TrainConfig, and the defaults that the CLI, component.yaml and the README state agree."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from train_pytorch_model.config import TrainConfig, add_arguments, defaults
from train_pytorch_model.errors import InvalidParameterError
from train_pytorch_model.limits import DEFAULT_WEIGHT_DECAY, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["--untrained-model", "m", "--training-data", "t", "--validation-data", "v", "--trained-model", "o"]


def parse(*flags: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return TrainConfig.from_args(parser.parse_args([*REQUIRED, *flags]))


def test_the_cli_defaults_are_the_config_defaults():
    config = parse()
    for name, value in vars(TrainConfig()).items():
        if name not in ("untrained_model", "training_data", "validation_data", "trained_model"):
            assert getattr(config, name) == value, name
    assert (config.epochs, config.batch_size, config.learning_rate, config.random_seed, config.patience) == \
        (5, 16, 0.001, 1, 3)  # the designer module's, fixed


def test_component_yaml_defaults_and_flags_match_the_config():
    component = yaml.safe_load((REPO / "component.yaml").read_text())
    command = component["command"]
    shown = defaults()
    for name, port in component["inputs"].items():
        if port["type"] in ("uri_folder", "mltable", "uri_file"):
            continue
        assert name in shown, f"component input {name} is not a train flag"
        assert f"--{name.replace('_', '-')} ${{{{inputs.{name}}}}}" in command
        if "default" in port:
            assert port["default"] == shown[name], name
        else:
            assert port.get("optional") is True, f"{name}: no default, so it must be optional"


def test_the_readme_parameter_table_states_the_config_defaults():
    rows = re.findall(r"^\| `(--[a-z-]+)`[^|]*\| ([^|]+) \|", (REPO / "README.md").read_text(), re.MULTILINE)
    shown = defaults()
    assert len(rows) >= 10
    for flag, default in rows:
        name = flag[2:].replace("-", "_")
        assert name in shown, f"README documents {flag}, which train does not have"
        expected = "–" if shown[name] is None else str(shown[name])
        assert default.strip().strip("`") == expected, flag


def test_identity_leaves_out_what_does_not_change_the_weights():
    identity = parse().identity()
    assert {"epochs", "batch_size", "learning_rate", "random_seed", "patience", "image_size",
            "optimizer"} <= set(identity)
    assert not {"trained_model", "num_workers", "print_freq", "mlflow_tracking_uri", "checkpoint_dir"} & set(identity)
    assert parse("--num-workers", "3").identity() == identity


def test_config_is_frozen_and_records_as_json_ready_dict():
    config = parse("--num-workers", "2", "--channels-last", "true")
    with pytest.raises(AttributeError):
        config.epochs = 9
    recorded = config.as_dict()
    assert recorded["trained_model"] == "o" and recorded["num_workers"] == 2 and recorded["channels_last"] is True


@pytest.mark.parametrize("flags, name", [
    (("--epochs", "0"), "Epochs"), (("--batch-size", "0"), "Batch size"), (("--learning-rate", "nan"), "Learning rate"),
    (("--learning-rate", "-1"), "Learning rate"), (("--patience", "-1"), "Patience"),
    (("--image-size", "16"), "Image size"),
    (("--warmup-epochs", "5"), "Warmup epochs"), (("--random-seed", str(10**23)), "Random seed"),
    (("--device", "foo;rm"), "Device"), (("--max-bad-image-fraction", "2"), "Max bad image fraction"),
])
def test_invalid_values_are_named_parameter_errors(flags, name):
    with pytest.raises(InvalidParameterError, match=f'"{name}"'):
        parse(*flags)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_weight_decay_auto_is_the_optimizers_value_in_the_config_itself():
    """What MLflow and training_info.json record is the decay the optimizer gets (it was recorded as null)."""
    assert parse().weight_decay == DEFAULT_WEIGHT_DECAY["adamw"] == 0.05
    assert parse("--optimizer", "sgd").as_dict()["weight_decay"] == DEFAULT_WEIGHT_DECAY["sgd"] == 1e-4
    assert parse("--optimizer", "sgd", "--weight-decay", "0.2").weight_decay == 0.2
    assert parse("--weight-decay", "auto").weight_decay == 0.05
    assert parse("--weight-decay", "0").weight_decay == 0.0
    # Auto and the explicit value are the same run: the checkpoint identity agrees.
    assert parse().identity() == parse("--weight-decay", "0.05").identity()


def test_bn_recalibration_is_a_plain_boolean_defaulting_to_on():
    assert parse().bn_recalibration is True and parse("--bn-recalibration", "False").bn_recalibration is False
    with pytest.raises(SystemExit):
        parse("--bn-recalibration", "auto")


def test_help_states_each_default_through_argparse_not_a_restated_literal():
    for f in dataclasses.fields(TrainConfig):
        text = f.metadata["help"]
        if f.metadata.get("required") or defaults()[f.name] is None:
            continue
        assert "%(default)s" in text, f"{f.name}: its help should say the default with %(default)s"
        assert not re.search(rf"default:? {re.escape(str(defaults()[f.name]))}\b", text), f.name
    shown = " ".join(parser().format_help().split())
    for expected in ("maximum number of epochs (default 5)", "(default auto)", "before each validation (default true)",
                     "0.0001 for sgd, 0.05 for adamw", "(default crop: a flip"):
        assert expected in shown, expected


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size", "--random-seed", "--patience", "--image-size",
                                  "--num-workers", "--warmup-epochs", "--print-freq"])
@pytest.mark.parametrize("text", ["1_0", " 2 ", "\u0662", "+3", "0x10", "2.0", "", "1" * 31])
def test_integer_flags_take_ascii_digits_only(flag, text, capsys):
    """int() would take `1_0` as 10, spaces, other scripts' digits: one strict parser for every integer flag."""
    with pytest.raises(SystemExit):
        parse(flag, text)
    assert "an integer (digits 0-9)" in capsys.readouterr().err


def test_integer_flags_take_plain_integers():
    config = parse("--epochs", "10", "--image-size", "064", "--num-workers", "0", "--random-seed", str(2**63 - 1))
    assert (config.epochs, config.image_size, config.num_workers, config.random_seed) == (10, 64, 0, 2**63 - 1)
    with pytest.raises(InvalidParameterError, match='"Num workers"'):
        parse("--num-workers", "-1")


def test_component_yaml_bounds_and_choices_are_the_configs():
    """component.yaml's min/max/enum: Azure ML refuses what TrainConfig would refuse, at the same bounds."""
    component = yaml.safe_load((REPO / "component.yaml").read_text())
    choices = {action.dest: action.choices for action in parser()._actions if action.choices}
    checked = 0
    for name, port in component["inputs"].items():
        if "enum" in port:
            assert sorted(port["enum"]) == sorted(choices[name]), name
            checked += 1
        step = 1 if port["type"] == "integer" else None
        for key, outside in (("min", -1), ("max", 1)):
            if key not in port:
                continue
            bound = port[key]
            TrainConfig(**{name: bound})  # the bound itself is valid
            beyond = bound + outside * (step or max(abs(bound), 1e-9))
            with pytest.raises(InvalidParameterError):
                TrainConfig(**{name: beyond})
            checked += 1
    assert checked >= 10
    assert (component["inputs"]["image_size"]["min"], component["inputs"]["image_size"]["max"]) == \
        (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def test_the_readme_parameter_table_lists_every_train_flag():
    table = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `--")]
    listed = {flag for line in table for flag in re.findall(r"`(--[a-z-]+)`", line.split("|")[1])}
    flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig) if not f.metadata.get("required")}
    assert flags - listed == set(), "add a README parameter table row for each"


@pytest.mark.parametrize("flag", ["--learning-rate", "--label-smoothing", "--weight-decay", "--mixup"])
@pytest.mark.parametrize("text", ["1_0", " 0.1 ", "\u0660.1", "0x1p-3", "", "1" * 61])
def test_number_flags_take_plain_decimals_only(flag, text, capsys):
    with pytest.raises(SystemExit):
        parse(flag, text)
    assert "a number (digits 0-9" in capsys.readouterr().err


def test_number_flags_take_the_usual_spellings():
    config = parse("--learning-rate", "1e-4", "--label-smoothing", ".1", "--mixup", "2", "--weight-decay", "5E-2")
    assert (config.learning_rate, config.label_smoothing, config.mixup, config.weight_decay) == (1e-4, 0.1, 2.0, 0.05)
