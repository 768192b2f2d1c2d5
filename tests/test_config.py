"""config.py: one TrainConfig, and the defaults that the CLI, component.yaml and the README state agree."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from train_pytorch_model.config import TrainConfig, add_arguments, defaults
from train_pytorch_model.errors import InvalidParameterError

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


def test_the_choices_are_the_trainers():
    from train_pytorch_model import preprocessing, train
    from train_pytorch_model.config import AUGMENTATIONS, OPTIMIZERS

    assert AUGMENTATIONS == preprocessing.AUGMENTATIONS  # config.py stays torch-free, so it names them again
    assert set(OPTIMIZERS) == set(train.DEFAULT_WEIGHT_DECAY)
