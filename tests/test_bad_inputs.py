"""The bad-input matrix: every bad input a user can give `train` ends in a named error.

Each case checks the CLI contract: exit status != 0, the last stderr line is
`<ErrorClass>: <message>`, the message names the file / row / value at fault and says how to
fix it, and no output (not even a half-written one) is left behind.

Most cases run `cli.main()` in-process (the same code path as the command, minus the
interpreter start-up); a few run the real command in a subprocess to keep the wiring honest.
Cases that fail while reading inputs cost milliseconds; only the bad-image cases train.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import SHARED_FIXTURES, copy_writable, run_cli, write_image_folder
from train_pytorch_model.cli import main
from train_pytorch_model.errors import InvalidModelDirectoryError
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.model_directory import ModelSpec, read_trained_model_directory, write_legacy_trained_files
from train_pytorch_model.models import Classifier, build_net
from train_pytorch_model.preprocessing import ImageDecodeError, Preprocessing, decode_image

LEGACY = SHARED_FIXTURES / "legacy_image_directory"
RESNET18 = SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"
DENSENET121 = SHARED_FIXTURES / "legacy_untrained_model" / "densenet121"



class World:
    """Valid inputs for one `train` run; a case breaks one thing."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.args = {
            "--untrained-model": copy_writable(RESNET18, tmp / "model"),
            "--training-data": write_image_folder(tmp / "train", {"a": 4, "b": 4}),
            "--validation-data": write_image_folder(tmp / "valid", {"a": 2, "b": 2}, seed=1),
            "--trained-model": tmp / "out",
            "--epochs": "1", "--image-size": "32", "--batch-size": "4", "--num-workers": "0",
        }

    train = property(lambda self: Path(self.args["--training-data"]))
    valid = property(lambda self: Path(self.args["--validation-data"]))
    model = property(lambda self: Path(self.args["--untrained-model"]))
    out = property(lambda self: Path(self.args["--trained-model"]))

    def use_meta_route(self) -> Path:
        """Switch both datasets to copies of the legacy ImageDirectory (cat/dog/fox); returns the training one."""
        self.args["--training-data"] = copy_writable(LEGACY, self.tmp / "meta_train")
        self.args["--validation-data"] = copy_writable(LEGACY, self.tmp / "meta_valid")
        return self.train

    def argv(self) -> list[str]:
        return ["train", *[str(x) for pair in self.args.items() for x in pair]]

    # Small editors for the files the cases break.
    def lines(self) -> list[str]:
        return (self.train / "images.lst").read_text().splitlines()

    def set_line(self, number: int, row) -> None:
        lines = self.lines()
        lines[number - 1] = row if isinstance(row, str) else json.dumps(row)
        (self.train / "images.lst").write_text("\n".join(lines) + "\n")

    def schema(self) -> dict:
        return json.loads((self.train / "_schema.json").read_text())

    def set_categories(self, categories) -> None:
        schema = self.schema()
        schema["columnAttributes"][2]["properties"]["categories"] = categories
        (self.train / "_schema.json").write_text(json.dumps(schema, indent=2))

    def spec(self) -> dict:
        return yaml.safe_load((self.model / "model_spec.yaml").read_text())

    def set_spec(self, spec: dict) -> None:
        (self.model / "model_spec.yaml").write_text(yaml.safe_dump(spec))


@dataclass
class Case:
    id: str
    arrange: Callable[[World], object]  # breaks one thing; may return extra CLI overrides
    error: str  # the class named on the last stderr line
    names: Callable[[World], list[str]]  # what the message must name: file, row, value
    fix: str  # a fragment of the how-to-fix advice
    exit_code: int = 1
    subprocess: bool = False
    trains: bool = False  # the fault is only met once training reads the images
    marks: list = field(default_factory=list)


def params(**overrides):
    def arrange(world: World):
        world.args.update(overrides)
    return arrange


def case(id, arrange, error, names, fix, **kw):
    c = Case(id, arrange, error, names, fix, **kw)
    return pytest.param(c, id=id, marks=[*c.marks, *([pytest.mark.slow] if c.subprocess else [])])


def write(path_of: Callable[[World], Path], content: str | bytes):
    def arrange(world: World):
        path = path_of(world)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return arrange


def both(*steps):
    def arrange(world: World):
        for step in steps:
            step(world)
    return arrange


def meta(step=None):
    """Run `step` on the meta-route copy of the legacy fixture."""
    def arrange(world: World):
        world.use_meta_route()
        if step:
            step(world)
    return arrange


# --- paths ---------------------------------------------------------------------------------------------------

def _make_empty(world, key):
    shutil.rmtree(world.args[key])
    Path(world.args[key]).mkdir()


def _make_file(world, key):
    path = world.tmp / f"{key.strip('-')}.txt"
    path.write_text("not a folder")
    world.args[key] = path


PATH_CASES = [
    case("training-missing", lambda w: w.args.update({"--training-data": w.tmp / "nope"}), "DirectoryNotFoundError",
         lambda w: [str(w.tmp / "nope"), "does not exist"], "Training data folder", subprocess=True),
    case("validation-missing", lambda w: w.args.update({"--validation-data": w.tmp / "nope"}), "DirectoryNotFoundError",
         lambda w: [str(w.tmp / "nope")], "Validation data folder"),
    case("training-empty", lambda w: _make_empty(w, "--training-data"), "DirectoryEmptyError",
         lambda w: [str(w.train)], "is empty"),
    case("training-is-a-file", lambda w: _make_file(w, "--training-data"), "DirectoryNotFoundError",
         lambda w: ["training-data.txt"], "give the folder that holds the images"),
    case("model-missing", lambda w: w.args.update({"--untrained-model": w.tmp / "nomodel"}), "DirectoryNotFoundError",
         lambda w: [str(w.tmp / "nomodel")], "does not exist"),
    case("model-empty", lambda w: _make_empty(w, "--untrained-model"), "DirectoryEmptyError",
         lambda w: [str(w.model)], "is empty"),
    case("model-is-a-file", lambda w: _make_file(w, "--untrained-model"), "DirectoryNotFoundError",
         lambda w: ["untrained-model.txt"], "give the model directory"),
    case("output-not-empty", both(lambda w: w.out.mkdir(), write(lambda w: w.out / "earlier.txt", "x")),
         "OutputDirectoryError", lambda w: [str(w.out), "not empty"], "give a new or empty folder", subprocess=True),
    case("output-is-a-file", write(lambda w: w.out, "x"), "OutputDirectoryError",
         lambda w: [str(w.out), "is a file"], "give a folder"),
    case("output-below-a-file", both(write(lambda w: w.tmp / "f", "x"),
                                     lambda w: w.args.update({"--trained-model": w.tmp / "f" / "out"})),
         "OutputDirectoryError", lambda w: [str(w.tmp / "f"), "is a file"], "cannot be created"),
    case("output-is-the-training-folder", lambda w: w.args.update({"--trained-model": w.train}),
         "OutputDirectoryError", lambda w: [str(w.train), "is the input"], "outside every input"),
]

# --- _meta.yaml / _schema.json / images.lst --------------------------------------------------------------------

_train = lambda name: (lambda w: w.train / name)


META_CASES = [
    case("meta-invalid-yaml",
         meta(write(_train("_meta.yaml"), "type: ImageDirectory\nimage_list: [images.lst\nschema: x\n")),
         "InvalidDatasetError", lambda w: ["_meta.yaml", "line 3"], "Fix or regenerate the file"),
    case("meta-python-tag", meta(write(_train("_meta.yaml"), "type: !!python/object/apply:os.system ['echo hi']\n")),
         "InvalidDatasetError", lambda w: ["_meta.yaml", "line 1", "python/object/apply"], "Fix or regenerate"),
    case("meta-wrong-type", meta(write(_train("_meta.yaml"), "type: ModelDirectory\n")), "InvalidDatasetError",
         lambda w: [str(w.train), "'ModelDirectory'"], "Connect an image dataset"),
    case("meta-without-type", meta(write(_train("_meta.yaml"), "image_list: images.lst\n")), "InvalidDatasetError",
         lambda w: ["_meta.yaml", "'type'"], "Add the line `type: ImageDirectory`"),
    case("meta-not-a-mapping", meta(write(_train("_meta.yaml"), "- a\n- b\n")), "InvalidDatasetError",
         lambda w: ["_meta.yaml", "got list"], "must be a YAML mapping with a 'type' key"),
    case("meta-list-outside", meta(write(_train("_meta.yaml"), "type: ImageDirectory\nimage_list: ../x.lst\n")),
         "InvalidDatasetError", lambda w: ["image_list", "'../x.lst'"], "relative file name inside the folder"),
    case("images-lst-missing", meta(lambda w: (w.train / "images.lst").unlink()), "InvalidDatasetError",
         lambda w: [str(w.train / "images.lst"), "missing"], "restore it"),
    case("schema-invalid-json",
         meta(write(_train("_schema.json"), '{\n  "columnAttributes": [\n    {"name": }\n  ]\n}')),
         "InvalidDatasetError", lambda w: ["_schema.json", "line 3"], "Fix or regenerate"),
    case("schema-not-utf8", meta(write(_train("_schema.json"), b'{"columnAttributes": "\xff\xfe"}')),
         "InvalidDatasetError", lambda w: ["_schema.json", "UTF-8"], "save it as UTF-8"),
    case("schema-missing-columns", meta(write(_train("_schema.json"), '{"columns": []}')), "InvalidDatasetError",
         lambda w: ["_schema.json", "columnAttributes"], "needs a 'columnAttributes' list"),
    case("schema-no-image-column", meta(lambda w: w.train.joinpath("_schema.json").write_text(
         json.dumps({"columnAttributes": w.schema()["columnAttributes"][1:]}))), "InvalidDatasetError",
         lambda w: ["_schema.json", "image column"], "mime_type 'image/png'"),
    case("unknown-annotation-type", meta(lambda w: w.train.joinpath("_schema.json").write_text(
         json.dumps(w.schema()).replace("COCO_classification", "COCO_object_detection"))), "InvalidDatasetError",
         lambda w: ["'COCO_object_detection'"], "only COCO_classification can train"),
    case("categories-empty", meta(lambda w: w.set_categories([])), "InvalidDatasetError",
         lambda w: [str(w.train), "categories"], "add [{\"id\": 0"),
    case("categories-duplicate-names", meta(lambda w: w.set_categories(
         [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}])), "InvalidDatasetError",
         lambda w: ["['cat']"], "must be unique"),
    case("categories-duplicate-ids", meta(lambda w: w.set_categories(
         [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 1, "name": "fox"}])), "InvalidDatasetError",
         lambda w: ["id 1", "'dog'", "'fox'"], "used twice"),
    case("category-id-not-integer", meta(lambda w: w.set_categories(
         [{"id": "0", "name": "cat"}, {"id": 1, "name": "dog"}])), "InvalidDatasetError",
         lambda w: ["'cat'", "'0'"], "non-negative integer 'id'"),
    case("category-without-name", meta(lambda w: w.set_categories([{"id": 0}, {"id": 1, "name": "dog"}])),
         "InvalidDatasetError", lambda w: ["{'id': 0}"], "non-empty string 'name'"),
    case("images-lst-invalid-json", meta(lambda w: w.set_line(5, '{"image_info": {"file_name": "image/0_4.jpg"}, ')),
         "InvalidDatasetError", lambda w: ["images.lst", "line 5"], "one JSON object"),
    case("images-lst-row-not-object", meta(lambda w: w.set_line(2, "[1, 2]")), "InvalidDatasetError",
         lambda w: ["images.lst", "line 2", "not a JSON object"], "Each line must be one JSON object"),
    case("integer-label", meta(lambda w: w.set_line(3, {"image_info": {"file_name": "image/0_2.jpg"}, "category": 1})),
         "InvalidDatasetError", lambda w: ["images.lst line 3", "label 1"],
         "labels must be one of ['cat', 'dog', 'fox']"),
    case("label-not-a-category", meta(lambda w: w.set_line(4, {"image_info": {"file_name": "image/0_3.jpg"},
                                                               "category": "wolf"})),
         "InvalidDatasetError", lambda w: ["images.lst line 4", "'wolf'"], "not among the schema's categories"),
    case("row-without-image-info", meta(lambda w: w.set_line(6, {"category": "cat"})), "InvalidDatasetError",
         lambda w: ["images.lst line 6", "image_info"], "naming its image file"),
    case("row-coco-url-only", meta(lambda w: w.set_line(7, {"image_info": {"coco_url": "http://x/1.jpg"},
                                                            "category": "dog"})),
         "InvalidDatasetError", lambda w: ["images.lst line 7", "coco_url"], "images must be files inside the folder"),
    case("row-dotdot-path", meta(lambda w: w.set_line(8, {"image_info": {"file_name": "../meta_valid/image/0_0.jpg"},
                                                          "category": "dog"})),
         "InvalidDatasetError", lambda w: ["images.lst line 8", "'../meta_valid/image/0_0.jpg'"], "must be relative"),
    case("row-absolute-path",
         meta(lambda w: w.set_line(9, {"image_info": {"file_name": "/etc/passwd"}, "category": "dog"})),
         "InvalidDatasetError", lambda w: ["images.lst line 9", "'/etc/passwd'"], "stay inside it"),
    case("row-url-path", meta(lambda w: w.set_line(10, {"image_info": {"file_name": "https://example.com/a.jpg"},
                                                        "category": "dog"})),
         "InvalidDatasetError", lambda w: ["images.lst line 10", "https://example.com/a.jpg"], "must be relative"),
    case("coco-folder", both(lambda w: shutil.rmtree(w.train), lambda w: w.train.mkdir(),
                             write(_train("instances.json"), '{"images": [], "annotations": []}')),
         "InvalidDatasetError", lambda w: ["'instances.json'"], "arrange images as <class>/<image> folders"),
]

# --- data ------------------------------------------------------------------------------------------------------

def _single_class(world):
    shutil.rmtree(world.train)
    write_image_folder(world.train, {"a": 4})


def _validation_only_class(world):
    shutil.rmtree(world.valid)
    write_image_folder(world.valid, {"a": 2, "b": 2, "zebra": 2})


def _flat(world, key):
    shutil.rmtree(world.args[key])
    folder = Path(world.args[key])
    folder.mkdir()
    for n in range(3):
        Image.new("RGB", (40, 36)).save(folder / f"{n}.png")


def _only_text_files(world):
    shutil.rmtree(world.train)
    (world.train / "a").mkdir(parents=True)
    (world.train / "a" / "notes.txt").write_text("x")


def _all_unlabeled(world):
    rows = [json.loads(line) for line in world.lines()]
    (world.train / "images.lst").write_text("".join(json.dumps({**r, "category": None}) + "\n" for r in rows))


DATA_CASES = [
    case("single-class", _single_class, "InvalidDatasetError", lambda w: [str(w.train), "1 class(es)"],
         "at least 2 classes"),
    case("validation-only-class", _validation_only_class, "InvalidDatasetError", lambda w: [str(w.valid), "['zebra']"],
         "same category names"),
    case("training-flat-folder", lambda w: _flat(w, "--training-data"), "NotLabeledDatasetError",
         lambda w: [str(w.train), "flat"], "Prepare a labeled image dataset"),
    case("validation-flat-folder", lambda w: _flat(w, "--validation-data"), "NotLabeledDatasetError",
         lambda w: [str(w.valid)], "<class>/<image> folders"),
    case("no-image-files", _only_text_files, "InvalidDatasetError", lambda w: [str(w.train), "no image rows"],
         "extensions"),
    case("empty-after-filtering", meta(_all_unlabeled), "InvalidDatasetError",
         lambda w: [str(w.train), "no image rows"], "convert"),
]

# --- parameters ------------------------------------------------------------------------------------------------

PARAMETER_CASES = [
    case("epochs-zero", params(**{"--epochs": "0"}), "InvalidParameterError",
         lambda w: ['"Epochs"', "value 0"], ">= 1"),
    case("epochs-negative", params(**{"--epochs": "-3"}), "InvalidParameterError",
         lambda w: ['"Epochs"', "-3"], ">= 1"),
    case("epochs-nan", params(**{"--epochs": "nan"}), "UsageError", lambda w: ["--epochs", "'nan'"], "--help",
         exit_code=2, subprocess=True),
    case("epochs-inf", params(**{"--epochs": "inf"}), "UsageError", lambda w: ["--epochs", "'inf'"], "--help",
         exit_code=2),
    case("batch-size-zero", params(**{"--batch-size": "0"}), "InvalidParameterError",
         lambda w: ['"Batch size"', "0"], ">= 1"),
    case("batch-size-negative", params(**{"--batch-size": "-4"}), "InvalidParameterError", lambda w: ["-4"], ">= 1"),
    case("batch-size-fraction", params(**{"--batch-size": "2.5"}), "UsageError", lambda w: ["--batch-size", "'2.5'"],
         "--help", exit_code=2),
    case("learning-rate-zero", params(**{"--learning-rate": "0"}), "InvalidParameterError",
         lambda w: ['"Learning rate"', "0.0"], "finite number > 0"),
    case("learning-rate-negative", params(**{"--learning-rate": "-0.1"}), "InvalidParameterError", lambda w: ["-0.1"],
         "finite number > 0"),
    case("learning-rate-nan", params(**{"--learning-rate": "nan"}), "InvalidParameterError", lambda w: ["nan"],
         "finite number > 0"),
    case("learning-rate-inf", params(**{"--learning-rate": "inf"}), "InvalidParameterError", lambda w: ["inf"],
         "finite number > 0"),
    case("learning-rate-text", params(**{"--learning-rate": "fast"}), "UsageError", lambda w: ["'fast'"], "--help",
         exit_code=2),
    case("patience-negative", params(**{"--patience": "-1"}), "InvalidParameterError", lambda w: ['"Patience"', "-1"],
         "0 disables early stopping"),
    case("patience-inf", params(**{"--patience": "inf"}), "UsageError", lambda w: ["--patience", "'inf'"], "--help",
         exit_code=2),
    case("image-size-zero", params(**{"--image-size": "0"}), "InvalidParameterError", lambda w: ['"Image size"', "0"],
         "between 32 and 4096"),
    case("image-size-negative", params(**{"--image-size": "-64"}), "InvalidParameterError", lambda w: ["-64"],
         "between 32"),  # an integer, so the range check names the bounds
    case("image-size-tiny", params(**{"--image-size": "16"}), "InvalidParameterError", lambda w: ["16"], "between 32"),
    case("image-size-huge", params(**{"--image-size": "5000"}), "InvalidParameterError", lambda w: ["5000"], "4096"),
    case("image-size-nan", params(**{"--image-size": "nan"}), "UsageError", lambda w: ["--image-size"], "--help",
         exit_code=2),
    case("bad-fraction-above-one", params(**{"--max-bad-image-fraction": "1.5"}), "InvalidParameterError",
         lambda w: ["1.5"], "between 0 and 1"),
    case("bad-fraction-nan", params(**{"--max-bad-image-fraction": "nan"}), "InvalidParameterError",
         lambda w: ["nan"], "between 0 and 1"),
    case("num-workers-text", params(**{"--num-workers": "many"}), "UsageError", lambda w: ["'many'"],
         "'auto' or an integer", exit_code=2),
    case("warmup-not-below-epochs", params(**{"--warmup-epochs": "2", "--epochs": "2"}), "InvalidParameterError",
         lambda w: ['"Warmup epochs"', "2"], "smaller than epochs"),
    case("unknown-flag", params(**{"--num-epochs": "3"}), "UsageError", lambda w: ["--num-epochs"], "--help",
         exit_code=2),
]

# --- model -----------------------------------------------------------------------------------------------------


def _set_init(world, **init_params):
    spec = world.spec()
    spec["flavor_extras"]["init_params"].update(init_params)
    world.set_spec(spec)


def _set_extras(world, **extras):
    spec = world.spec()
    spec["flavor_extras"].update(extras)
    world.set_spec(spec)


def _weights_of(model_name: str, num_classes: int = 1000) -> Callable[[World], None]:
    def arrange(world):
        torch.manual_seed(0)
        torch.save(build_net(model_name, num_classes).state_dict(), world.model / "model")
    return arrange


def _reshaped_weights(world):
    state = Classifier(build_net("resnet18", 1000)).state_dict()
    state["model.layer2.0.downsample.0.weight"] = state["model.layer2.0.downsample.0.weight"][:127]
    torch.save(state, world.model / "model")


def _no_cached_weights(world):
    _set_init(world, pretrained=True)
    os.environ["TORCH_HOME"] = str(world.tmp / "empty-torch-home")  # restored by the test's monkeypatch


MODEL_CASES = [
    case("model-unknown-name", lambda w: _set_init(w, model_name="resnet19"), "InvalidModelDirectoryError",
         lambda w: [str(w.model), "'resnet19'"], "supported: resnet18"),
    case("model-class-os-system", lambda w: _set_extras(w, module="os", **{"class": "system"}),
         "InvalidModelDirectoryError", lambda w: ["'os.system'", "nothing named by a file is imported"], "Supported:"),
    case("model-meta-missing", lambda w: (w.model / "_meta.yaml").unlink(), "InvalidModelDirectoryError",
         lambda w: [str(w.model), "_meta.yaml is missing"], "init-model"),
    case("model-meta-wrong-type", write(lambda w: w.model / "_meta.yaml", "type: ImageDirectory\n"),
         "InvalidModelDirectoryError", lambda w: [str(w.model), "'ImageDirectory'"], "init-model"),
    case("model-spec-missing", lambda w: (w.model / "model_spec.yaml").unlink(), "InvalidModelDirectoryError",
         lambda w: [str(w.model), "model_spec.yaml is missing"], "init-model"),
    case("model-spec-invalid-yaml", write(lambda w: w.model / "model_spec.yaml", "flavor:\n  name: pytorch\n bad: [\n"),
         "InvalidModelDirectoryError", lambda w: ["model_spec.yaml", "line 3"], "Fix or regenerate"),
    case("model-spec-wrong-flavor", lambda w: w.set_spec({**w.spec(), "flavor": {"name": "tensorflow"}}),
         "InvalidModelDirectoryError", lambda w: ["'tensorflow'"], "init-model"),
    case("model-spec-pretrained-not-bool", lambda w: _set_init(w, pretrained="yes"), "InvalidModelDirectoryError",
         lambda w: ["init_params.pretrained", "'yes'"], "true or false"),
    case("model-spec-unknown-param", lambda w: _set_init(w, dropout=0.5), "InvalidModelDirectoryError",
         lambda w: ["['dropout']"], "init-model"),
    case("model-spec-legacy-pickle", lambda w: w.set_spec({**w.spec(), "file_name": "model.pkl"}),
         "InvalidModelDirectoryError", lambda w: [str(w.model), "pickled"], "Re-create it"),
    case("weights-of-another-architecture", _weights_of("densenet121"), "InvalidModelDirectoryError",
         lambda w: [str(w.model / "model"), "resnet18"], "Was it saved from another model?"),
    case("weights-with-a-reshaped-layer", _reshaped_weights, "InvalidModelDirectoryError",
         lambda w: [str(w.model / "model"),
                    "model.layer2.0.downsample.0.weight (127, 64, 1, 1) instead of (128, 64, 1, 1)"],
         "Re-create the untrained model directory with init-model"),
    case("weights-not-a-state-dict", lambda w: torch.save([torch.zeros(3)], w.model / "model"),
         "InvalidModelDirectoryError", lambda w: [str(w.model / "model"), "not a PyTorch state dict"],
         "torch.save(model.state_dict()"),
    case("weights-garbage", write(lambda w: w.model / "model", b"\x00garbage" * 10), "InvalidModelDirectoryError",
         lambda w: [str(w.model / "model"), "Unsupported operand"], "re-create the directory with init-model"),
    case("pretrained-without-weights", _no_cached_weights, "PretrainedWeightsNotFoundError",
         lambda w: [str(w.model), "empty-torch-home", "resnet18"], "--weights FILE"),
]

# --- images: these need a (short) training run to reach the decoder --------------------------------------------


def _break_image(content: bytes | Callable[[Path], None]):
    def arrange(world):
        path = world.train / "a" / "1.png"
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
    return arrange


def _bomb(path: Path):
    Image.new("1", (20000, 10000)).save(path)  # 200 MP, 24 KB on disk


def _all_corrupt(world):
    for path in world.train.rglob("*.png"):
        path.write_bytes(path.read_bytes()[:40])  # the header survives, the pixels do not


def _missing_row_file(world):
    world.use_meta_route()
    (world.train / "image" / "1_8.jpg").unlink()


IMAGE_CASES = [
    case("image-missing-file", _missing_row_file, "InvalidDatasetError",
         lambda w: ["'image/1_8.jpg' (file not found)", "1 of 18"], "Remove or replace these files", trains=True),
    case("image-zero-bytes", _break_image(b""), "InvalidDatasetError", lambda w: ["'a/1.png'", "1 of 8"],
         "--max-bad-image-fraction", trains=True),
    case("image-not-an-image", _break_image(b"<html>not found</html>"), "InvalidDatasetError",
         lambda w: ["'a/1.png'", "UnidentifiedImageError"], "Remove or replace", trains=True),
    case("image-decompression-bomb", _break_image(_bomb), "InvalidDatasetError",
         lambda w: ["'a/1.png'", "DecompressionBomb"],
         "Remove or replace", trains=True),
    case("every-image-corrupt", _all_corrupt, "InvalidDatasetError", lambda w: [str(w.train), "png' (OSError"],
         "Remove or replace", trains=True),
]

ALL_CASES = PATH_CASES + META_CASES + DATA_CASES + PARAMETER_CASES + MODEL_CASES + IMAGE_CASES


def snapshot(path: Path) -> set[str] | None:
    """What is at `path` (relative names below it), or None when nothing is."""
    if not path.exists():
        return None
    if path.is_file():
        return {"<file>"}
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


def assert_nothing_written(world: World, before: set[str] | None) -> None:
    """The output is as it was (absent, empty, or the user's untouched files), with no staging left over."""
    after = snapshot(world.out)
    assert after == before or (before is None and after == set()), f"output changed: {before} -> {after}"
    assert not list(world.out.parent.glob(f".{world.out.name}.partial-*")), "staging folder left behind"


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


def test_matrix_is_big_enough():
    assert len(ALL_CASES) >= 30
    assert len({c.values[0].id for c in ALL_CASES}) == len(ALL_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("c", ALL_CASES)
def test_bad_input(c: Case, tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # never the user's cache
    world = World(tmp_path)
    c.arrange(world)
    before = snapshot(world.out)
    if c.subprocess:
        result = run_cli(*world.argv(), env={"TORCH_HOME": os.environ["TORCH_HOME"]})
        code, err = result.returncode, result.stderr
    else:
        code, err = run_in_process(world.argv(), capsys)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == c.exit_code != 0, err[-2000:]
    assert last.startswith(f"{c.error}: "), err[-2000:]
    for name in c.names(world):
        assert name in last, f"{name!r} not named in: {last}"
    assert c.fix in last, f"no fix advice {c.fix!r} in: {last}"
    assert "Traceback" not in err  # a known bad input is not a crash
    if not c.trains:  # found before any training started: fail fast, not after hours on a GPU
        assert "Training on " not in err + caplog.text
    assert_nothing_written(world, before)


# --- file-system permissions: root bypasses them, so drop that power for the duration -------------------------

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextmanager
def permissions_enforced():
    """Make file permissions bind this thread even when it runs as root (CI containers often do).

    Clears CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the thread's effective set (they stay
    permitted, so they are restored afterwards). Training with --num-workers 0 reads every file
    on this thread, so the product meets a real EACCES from the kernel.
    """
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("cannot read this thread's capabilities")
    saved = data[0].effective
    data[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
    if libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data) != 0:
        pytest.skip("running as root without the right to drop capabilities: permissions cannot be enforced")
    try:
        yield
    finally:
        data[0].effective = saved
        assert libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data) == 0


@pytest.mark.parametrize("target, mode, error, named", [
    ("training folder", 0o000, "DirectoryNotFoundError", "not readable (permission denied)"),
    ("images.lst", 0o000, "InvalidDatasetError", "cannot be read: Permission denied"),
    ("model_spec.yaml", 0o000, "InvalidModelDirectoryError", "cannot be read: Permission denied"),
    ("output parent", 0o555, "OutputDirectoryError", "is not writable (Permission denied)"),
])
def test_permission_denied(tmp_path, capsys, target, mode, error, named):
    world = World(tmp_path)
    if target == "images.lst":
        path = world.use_meta_route() / "images.lst"
    elif target == "training folder":
        path = world.train
    elif target == "model_spec.yaml":
        path = world.model / "model_spec.yaml"
    else:
        path = tmp_path / "locked"
        path.mkdir()
        world.args["--trained-model"] = path / "out"
    before = snapshot(world.out)
    os.chmod(path, mode)
    try:
        with permissions_enforced():
            code, err = run_in_process(world.argv(), capsys)
    finally:
        os.chmod(path, 0o755)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith(f"{error}: "), err[-2000:]
    assert str(path) in last and named in last, last
    assert_nothing_written(world, before)


# --- decisions on awkward images: accepted, and decoded as documented -------------------------------------------


def _png16() -> Image.Image:
    ramp = np.tile(np.linspace(0, 65535, 40, dtype=np.uint16), (36, 1))
    return Image.fromarray(ramp)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    _png16().save(tmp_path / "x.png")
    image = np.asarray(decode_image(tmp_path / "x.png"))
    assert image.shape == (36, 40, 3)
    assert image[0, 0, 0] == 0 and image[0, -1, 0] == 255 and 100 < image[0, 20, 0] < 160  # a ramp, not white


def test_cmyk_palette_alpha_and_animation_become_rgb(tmp_path):
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = np.asarray(decode_image(tmp_path / "cmyk.jpg"))
    assert red.shape == (10, 20, 3) and red[5, 5, 0] > 200 and red[5, 5, 1] < 60
    Image.new("RGBA", (20, 10), (0, 0, 255, 0)).save(tmp_path / "rgba.png")
    assert np.asarray(decode_image(tmp_path / "rgba.png"))[0, 0].tolist() == [0, 0, 255]  # alpha dropped
    frames = [Image.new("P", (20, 10), 0), Image.new("P", (20, 10), 1)]
    frames[0].putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    frames[1].putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(tmp_path / "anim.gif"))[0, 0].tolist() == [0, 255, 0]  # first frame


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "r.jpg", exif=exif)
    assert decode_image(tmp_path / "r.jpg").size == (20, 40)


def test_truncated_image_decodes_grey_like_the_original(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=90)
    raw = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    assert decode_image(tmp_path / "cut.jpg").size == (64, 64)
    (tmp_path / "header.jpg").write_bytes(raw[:20])  # nothing left to decode
    with pytest.raises(ImageDecodeError):
        decode_image(tmp_path / "header.jpg")


def test_category_id_gaps_are_closed_up(tmp_path):
    world = World(tmp_path)
    world.use_meta_route()
    world.set_categories([{"id": 7, "name": "fox"}, {"id": 0, "name": "cat"}, {"id": 3, "name": "dog"}])
    assert load_image_directory(world.train).categories == ["cat", "dog", "fox"]


def test_awkward_images_and_a_large_batch_train(tmp_path, capsys, caplog, monkeypatch):
    """16-bit, CMYK, palette+alpha, animated, EXIF-rotated, truncated and greyscale files all train;
    a batch size larger than the training set is clamped with a warning."""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    world = World(tmp_path)
    a, b = world.train / "a", world.train / "b"
    _png16().save(a / "sixteen.png")
    Image.new("CMYK", (40, 36), (0, 200, 200, 0)).save(a / "cmyk.jpg")
    Image.new("RGBA", (40, 36), (0, 0, 255, 40)).convert("P").save(b / "palette.png", transparency=0)
    Image.new("RGB", (40, 36), (9, 9, 9)).save(b / "anim.gif", save_all=True,
                                              append_images=[Image.new("RGB", (40, 36), (250, 9, 9))])
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (36, 40), (30, 200, 30)).save(b / "rotated.jpg", exif=exif)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (a / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    Image.new("L", (40, 36), 128).save(b / "grey.png")
    world.args.update({"--batch-size": "64", "--max-bad-image-fraction": "0"})
    code, err = run_in_process(world.argv(), capsys)
    assert code == 0, err[-3000:]
    assert "Batch size 64 is larger than the 15 training images per process; using 15." in caplog.text
    assert "Skipping unreadable" not in caplog.text
    assert (world.out / "MLmodel").is_file() and (world.out / "_meta.yaml").is_file()


# --- trained model directories (what `score` and serving read) ---------------------------------------------------


def _trained_dir(tmp_path: Path, classes: list[str]) -> Path:
    out = tmp_path / "trained"
    out.mkdir()
    torch.manual_seed(0)
    model = Classifier(build_net("resnet18", 2))
    write_legacy_trained_files(out, model=model, spec=ModelSpec("resnet18"), classes=classes,
                               preprocessing=Preprocessing(image_size=32), is_cuda=False, training_schema={},
                               training_samples=[], extra_info={})
    return out


def test_trained_model_with_another_class_count_is_refused(tmp_path):
    out = _trained_dir(tmp_path, ["a", "b", "c"])  # 3 names, 2 outputs
    with pytest.raises(InvalidModelDirectoryError,
                       match=r"lists 3 classes but its weights have 2 outputs.*train again"):
        read_trained_model_directory(out)


@pytest.mark.parametrize("info", ['{"classes": ["a", "b"]}', '["a", "b"]',
                                  '{"classes": ["a", "b"], "preprocessing": {"image_size": 32, "mean": 5}}'])
def test_damaged_training_info_is_refused(tmp_path, info):
    out = _trained_dir(tmp_path, ["a", "b"])
    (out / "training_info.json").write_text(info)
    with pytest.raises(InvalidModelDirectoryError, match="training_info.json"):
        read_trained_model_directory(out)
