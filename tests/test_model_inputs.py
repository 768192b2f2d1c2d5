"""Hostile weights and class lists (issue 21 items 2, 10, 13, 18, 20, 24, 25): shapes, element counts, dtypes and
class names are checked against the architecture and categories.py's rules before any value is touched, by the
loader train, score, serving and export share."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch
from torch import nn

from conftest import write_image_folder
from train_pytorch_model.categories import MAX_CLASSES
from train_pytorch_model.errors import InvalidDatasetError, InvalidModelDirectoryError
from train_pytorch_model.image_directory import default_schema, load_image_directory
from train_pytorch_model.model_directory import ModelSpec, read_trained_model_directory, write_legacy_trained_files
from train_pytorch_model.models import Classifier, build_net, load_legacy_state, load_weights_file
from train_pytorch_model.preprocessing import Preprocessing


def resnet18_state(classes: int = 1000) -> dict:
    return Classifier(build_net("resnet18", classes)).state_dict()


def trained_dir(tmp_path, classes=("a", "b"), model: Classifier | None = None):
    out = tmp_path / "trained"
    out.mkdir()
    model = model or Classifier(build_net("resnet18", len(classes)))
    write_legacy_trained_files(out, model=model, spec=ModelSpec("resnet18"), classes=list(classes),
                               preprocessing=Preprocessing(image_size=32), is_cuda=False, training_schema={},
                               training_samples=[], extra_info={})
    return out


# --- item 2: stride tricks and huge heads, refused before any value is touched ------------------------------


@pytest.mark.parametrize("trick", ["expand 200000x200000", "expand to the right shape", "overlapping strides",
                                   "a 100001-class head"])
def test_a_weight_that_claims_more_than_it_holds_is_refused_before_its_values_are_touched(tmp_path, trick):
    state = resnet18_state()
    if trick == "expand 200000x200000":  # 1.6 KB on disk, 160 GB claimed: isfinite over it used to allocate N x N
        state["model.fc.weight"] = torch.zeros(1).expand(200_000, 200_000)
        expected = "view of only 4 bytes"
    elif trick == "expand to the right shape":
        state["model.fc.weight"] = torch.zeros(1).expand(1000, 512)
        expected = "view of only 4 bytes"
    elif trick == "overlapping strides":
        state["model.layer1.0.conv1.weight"] = torch.zeros(64 * 9).as_strided((64, 64, 3, 3), (1, 1, 3, 1))
        expected = "stride 0 or overlapping"
    else:
        state["model.fc.weight"], state["model.fc.bias"] = torch.zeros(MAX_CLASSES + 1, 1), torch.zeros(1)
        expected = f"head of {MAX_CLASSES + 1} classes"
    torch.save(state, tmp_path / "model")
    assert (tmp_path / "model").stat().st_size < 60 * 2**20
    with pytest.raises(InvalidModelDirectoryError, match=expected):
        load_legacy_state("resnet18", False, load_weights_file(tmp_path / "model", "resnet18"), "model")


def test_a_trained_model_with_a_stride_zero_head_is_refused_by_score_and_serving(tmp_path):
    out = trained_dir(tmp_path)
    state = torch.load(out / "model", weights_only=True)
    state["model.fc.weight"] = torch.zeros(1).expand(10_000_000, 512)  # a 10M-class head, 20 GB claimed
    state["model.fc.bias"] = torch.zeros(1).expand(10_000_000)
    torch.save(state, out / "model")
    with pytest.raises(InvalidModelDirectoryError, match="view of only 4 bytes"):
        read_trained_model_directory(out)  # what score, evaluate, export and the MLflow loader call


# --- item 25: weights that are not floating point ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused_by_name(tmp_path, dtype):
    state = resnet18_state()
    state["model.conv1.weight"] = state["model.conv1.weight"].to(dtype)
    with pytest.raises(InvalidModelDirectoryError, match=r"not floating point: \['model.conv1.weight \("):
        load_legacy_state("resnet18", False, state, "model")
    # BatchNorm's counters are int64 in every real state dict: still accepted
    assert resnet18_state()["model.bn1.num_batches_tracked"].dtype == torch.int64
    load_legacy_state("resnet18", False, resnet18_state(), "model")


# --- item 18: a tampered stacked head ------------------------------------------------------------------------


def test_a_tampered_out_linear_model_is_a_named_error(tmp_path):
    legacy = Classifier(build_net("resnet18", 1000), nn.Linear(1000, 3)).state_dict()
    legacy["out_linear_model.weight"] = torch.zeros(3, 500)  # its input no longer matches the 1000 logits
    with pytest.raises(InvalidModelDirectoryError, match=r"out_linear_model.weight \(3, 500\) instead of \(3, 1000\)"):
        load_legacy_state("resnet18", False, legacy, "model")
    out = trained_dir(tmp_path, classes=("a", "b", "c"), model=Classifier(build_net("resnet18", 1000),
                                                                            nn.Linear(1000, 3)))
    torch.save(legacy, out / "model")
    with pytest.raises(InvalidModelDirectoryError, match="out_linear_model"):
        read_trained_model_directory(out)


# --- item 10: the class list of a trained model --------------------------------------------------------------


@pytest.mark.parametrize("classes, expected", [
    (["a", "a"], "appear more than once"),
    ([{"name": "a"}, "b"], "is not a class name"),
    ([None, "b"], "is not a class name"),
    (["", "b"], "empty class name"),
    (["x" * 2000, "b"], "longer than 1024"),
])
def test_a_tampered_class_list_is_refused(tmp_path, classes, expected):
    out = trained_dir(tmp_path)
    info = json.loads((out / "training_info.json").read_text())
    info["classes"] = classes
    (out / "training_info.json").write_text(json.dumps(info))
    with pytest.raises(InvalidModelDirectoryError, match=expected):
        read_trained_model_directory(out)


# --- items 13, 20, 24: every source of classes obeys the same rules ------------------------------------------


def _meta_directory(root, categories: list[str]):
    write_image_folder(root, {"a": 1}, size=(8, 8))
    schema = default_schema(["a"])
    schema["columnAttributes"][2]["properties"]["categories"] = [{"id": i, "name": n} for i, n in enumerate(categories)]
    (root / "_schema.json").write_text(json.dumps(schema))
    (root / "images.lst").write_text(json.dumps({"image_info": {"file_name": "a/0.png"}, "category": "a"}) + "\n")
    (root / "_meta.yaml").write_text("type: ImageDirectory\n")


def test_a_schema_with_more_categories_than_the_class_limit_is_refused(tmp_path):
    _meta_directory(tmp_path / "data", ["a"] + [f"unused{i}" for i in range(MAX_CLASSES)])
    with pytest.raises(InvalidDatasetError, match=f"{MAX_CLASSES + 1} categories, more than the {MAX_CLASSES}"):
        load_image_directory(tmp_path / "data", "Training")


def test_a_table_with_more_labels_than_the_class_limit_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "data", {"a": 1}, size=(8, 8))
    rows = "".join(f"a/0.png,c{i}\n" for i in range(MAX_CLASSES + 1))
    (root / "labels.csv").write_text("image,label\n" + rows)
    with pytest.raises(InvalidDatasetError, match=f"at most {MAX_CLASSES} classes"):
        load_image_directory(root / "labels.csv", "Training")


def test_a_900_kib_category_name_in_an_image_directory_is_refused(tmp_path):
    _meta_directory(tmp_path / "data", ["a", "n" * (900 * 1024)])
    with pytest.raises(InvalidDatasetError, match="longer than 1024 characters") as error:
        load_image_directory(tmp_path / "data", "Training")
    assert len(str(error.value)) < 1000


def test_class_folders_that_differ_only_in_unicode_normalisation_are_refused_naming_both(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    root = write_image_folder(tmp_path / "data", {nfc: 2, nfd: 2}, size=(8, 8))
    with pytest.raises(InvalidDatasetError, match="differ only in their Unicode normalisation") as error:
        load_image_directory(root, "Training")
    assert ascii(nfc) in str(error.value) and ascii(nfd) in str(error.value)


# --- item 23: the scoring batch follows the model's image size -------------------------------------------------


def test_the_default_scoring_batch_is_sized_from_the_image_size():
    import argparse

    from train_pytorch_model import score

    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    args = parser.parse_args(["--trained-model", "m", "--image-directory", "d", "--scored-data", "s"])
    assert args.batch_size is None
    sizes = {size: score.default_batch_size(Preprocessing(image_size=size)) for size in (32, 224, 512, 1024, 4096)}
    assert sizes == {32: 64, 224: 64, 512: 64, 1024: 16, 4096: 1}  # 4096 px: ~2.3 GB per image on resnet18
    assert score.default_batch_size(Preprocessing(image_size=None)) == 64
    assert all(size * size * batch <= score.MAX_BATCH_PIXELS for size, batch in sizes.items())
