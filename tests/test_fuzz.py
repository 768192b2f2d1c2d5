"""Property-based tests: whatever a user's storage holds, the readers either succeed or raise
one of our named errors (errors.py), never an unhandled exception.

Mutations start from valid files (the legacy fixture, a real model_spec.yaml, real image
bytes) and replace, delete or corrupt a part of them; hypothesis then shrinks any failure to a
small reproducer. Reader-level functions only, so each example costs milliseconds.
"""

from __future__ import annotations

import io
import json
import tempfile
from array import array
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import SHARED_FIXTURES
from train_pytorch_model.data import ImageDataset
from train_pytorch_model.errors import TrainPyTorchModelError
from train_pytorch_model.image_directory import ImageDirectory, load_image_directory
from train_pytorch_model.legacy_format import safe_join
from train_pytorch_model.model_directory import read_model_spec, read_untrained_model_directory
from train_pytorch_model.models import Classifier, build_net
from train_pytorch_model.preprocessing import ImageDecodeError, Preprocessing, decode_image

# Pillow warns about the corrupt files these tests make on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FUZZ = settings(max_examples=75, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

LEGACY = SHARED_FIXTURES / "legacy_image_directory"
META_TEXT = (LEGACY / "_meta.yaml").read_text()
SCHEMA = json.loads((LEGACY / "_schema.json").read_text())
ROWS = [json.loads(line) for line in (LEGACY / "images.lst").read_text().splitlines() if line.strip()]
SPEC = yaml.safe_load((SHARED_FIXTURES / "legacy_untrained_model" / "resnet18" / "model_spec.yaml").read_text())
MODEL_META_TEXT = (SHARED_FIXTURES / "legacy_untrained_model" / "resnet18" / "_meta.yaml").read_text()

# Values a user's tools could put anywhere in a JSON/YAML document.
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["..", "../x.png", "/etc/passwd", "http://example.com/a.png", "image/0_0.jpg", "cat",
                              "COCO_classification", "ImageDirectory", "ModelDirectory", "resnet18", "densenet121",
                              "os", "subprocess", "system", "image/png", "bytes", "", "C:\\x.png", "a\x00b"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
# Lines that are not JSON objects (or not JSON at all).
junk_lines = st.text(max_size=40) | st.sampled_from(["[" * 5000, '{"a": ' + "1" * 5000 + "}", "\ufeff{}", "null", "{"])


def mutate(document, draw):
    """`document` with one place in it replaced or deleted (a deep copy; the input is untouched)."""
    document = json.loads(json.dumps(document))

    go_on = st.integers(0, 4).map(bool)  # mostly deeper: the interesting fields are nested
    actions = ["descend", "descend", "descend", "delete", "replace"]

    def visit(node):
        if isinstance(node, dict) and node and draw(go_on):
            key = draw(st.sampled_from(sorted(node)))
            action = draw(st.sampled_from(actions))
            if action == "descend":
                node[key] = visit(node[key])
            elif action == "delete":
                del node[key]
            else:
                node[key] = draw(json_values)
            return node
        if isinstance(node, list) and node and draw(go_on):
            index = draw(st.integers(0, len(node) - 1))
            action = draw(st.sampled_from(actions + ["duplicate"]))
            if action == "descend":
                node[index] = visit(node[index])
            elif action == "delete":
                del node[index]
            elif action == "duplicate":
                node.append(json.loads(json.dumps(node[index])))
            else:
                node[index] = draw(json_values)
            return node
        return draw(json_values)

    return visit(document)


def check_directory(root: Path):
    """load_image_directory succeeds with a consistent index, or raises one of our errors."""
    try:
        directory = load_image_directory(root, "Training")
    except TrainPyTorchModelError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    assert len(directory) > 0
    for relative in directory.files:
        assert safe_join(directory.root, relative) is not None  # never outside the folder
    if directory.categories is not None:
        assert all(0 <= label < len(directory.categories) for label in directory.labels)
        assert len(set(directory.categories)) == len(directory.categories)
    return directory


def write_meta_dir(root: Path, meta: str | bytes, schema: str | bytes, lines: list[str] | bytes) -> Path:
    root.mkdir()
    for name, content in (("_meta.yaml", meta), ("_schema.json", schema)):
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    body = lines if isinstance(lines, bytes) else "\n".join(lines).encode("utf-8", "surrogatepass")
    (root / "images.lst").write_bytes(body)
    return root


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_images_lst_rows(data):
    lines = [json.dumps(row) for row in ROWS]
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(lines) - 1))
        kind = data.draw(st.sampled_from(["mutate", "junk", "delete"]))
        if kind == "mutate":
            lines[index] = json.dumps(mutate(ROWS[index], data.draw), allow_nan=True)
        elif kind == "junk":
            lines[index] = data.draw(junk_lines)
        elif len(lines) > 1:
            del lines[index]
    with tempfile.TemporaryDirectory() as tmp:
        check_directory(write_meta_dir(Path(tmp, "d"), META_TEXT, json.dumps(SCHEMA), lines))


@FUZZ
@given(data=st.data())
def test_schema_json(data):
    if data.draw(st.booleans()):
        schema = json.dumps(mutate(SCHEMA, data.draw), allow_nan=True)
    else:
        text = json.dumps(SCHEMA, indent=2)
        cut = data.draw(st.integers(0, len(text)))
        schema = text[:cut] + data.draw(st.text(max_size=5)) + text[cut + data.draw(st.integers(0, 5)):]
    with tempfile.TemporaryDirectory() as tmp:
        check_directory(write_meta_dir(Path(tmp, "d"), META_TEXT, schema, [json.dumps(r) for r in ROWS]))


@FUZZ
@given(data=st.data())
def test_meta_yaml(data):
    kind = data.draw(st.sampled_from(["mutate", "text", "bytes"]))
    if kind == "mutate":
        meta = yaml.safe_dump(mutate(yaml.safe_load(META_TEXT), data.draw))
    elif kind == "text":
        meta = data.draw(st.text(max_size=60) | st.sampled_from([
            "type: !!python/object/apply:os.system ['echo pwned']", "type: [", "- a\n- b", "type: 2020-13-45",
            "type: ImageDirectory\nimage_list: ../../etc/passwd", "type: ImageDirectory\nschema: /etc/hosts",
            "a: &a [*a]", "type: " + "[" * 2000]))
    else:
        meta = data.draw(st.binary(max_size=40))
    with tempfile.TemporaryDirectory() as tmp:
        check_directory(write_meta_dir(Path(tmp, "d"), meta, json.dumps(SCHEMA), [json.dumps(r) for r in ROWS]))


@FUZZ
@given(data=st.data())
def test_model_spec_yaml(data):
    kind = data.draw(st.sampled_from(["mutate", "mutate", "text"]))
    if kind == "mutate":
        spec = yaml.safe_dump(mutate(SPEC, data.draw), allow_unicode=True)
    else:
        spec = data.draw(st.text(max_size=80) | st.sampled_from([
            "flavor: !!python/name:os.system", "flavor_extras: {module: os, class: system, init_params: {}}",
            "time_created: 2026-02-30T00:00:00", "{1: a, b: 2}"]))
    meta = MODEL_META_TEXT if data.draw(st.booleans()) else yaml.safe_dump(mutate(yaml.safe_load(MODEL_META_TEXT),
                                                                                   data.draw))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "_meta.yaml").write_text(meta)
        (root / "model_spec.yaml").write_text(spec, encoding="utf-8", errors="surrogatepass")
        try:
            parsed = read_model_spec(root)
        except TrainPyTorchModelError as exc:
            assert "\n" not in str(exc)
            return
        assert parsed.model_name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                                     "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2", "densenet121",
                                     "densenet161", "densenet169", "densenet201")
        assert isinstance(parsed.pretrained, bool)


def _image_bytes(kind: str) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    if kind == "gif":
        frames = [Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).convert("P") for _ in range(2)]
        frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    elif kind == "png16":
        Image.fromarray(rng.integers(0, 65535, (12, 10), dtype=np.uint16)).save(buffer, "PNG")
    elif kind == "jpeg-exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buffer, "JPEG", exif=exif)
    else:
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buffer, kind.upper())
    return buffer.getvalue()


IMAGE_BYTES = {kind: _image_bytes(kind) for kind in ("png", "jpeg", "gif", "png16", "jpeg-exif", "bmp", "webp", "tiff")}


@st.composite
def corrupted_images(draw) -> bytes:
    raw = bytearray(IMAGE_BYTES[draw(st.sampled_from(sorted(IMAGE_BYTES)))])
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        if not raw:
            break
        at = draw(st.integers(0, len(raw) - 1))
        if action == "flip":
            raw[at] ^= draw(st.integers(1, 255))
        elif action == "truncate":
            del raw[at:]
        elif action == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            raw[at:at + 4] = b"\xff\xff\xff\x7f"  # a huge length/size field
    return bytes(raw)


@FUZZ
@given(raw=corrupted_images())
def test_image_bytes_decode_or_named_error(raw):
    try:
        image = decode_image(raw, size_hint=32)
    except ImageDecodeError as exc:
        assert str(exc)
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
    assert np.asarray(image).shape == (image.height, image.width, 3)  # the pixels really are decoded


@FUZZ
@given(raw=corrupted_images())
def test_dataset_item_never_raises(raw):
    """What a DataLoader worker does with one file: an image tensor, or a reason to skip the row."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "a").mkdir()
        (root / "a" / "x.img").write_bytes(raw)
        directory = ImageDirectory(root, "image_folder", ["a/x.img"], array("q", [0]), array("l", [0]), ["a"])
        preprocessing = Preprocessing(image_size=32)
        for transform in (preprocessing.eval_transform(), preprocessing.train_transform()):
            dataset = ImageDataset(directory, array("l", [0]), transform, preprocessing.resize_size, seed=1)
            image, target, index, error = dataset[(0, 0)]
            assert (image is None) != (error is None)
            if image is not None:
                assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 32, 32)


STATE_BYTES = None


def _state_bytes() -> bytes:
    global STATE_BYTES
    if STATE_BYTES is None:
        torch.manual_seed(0)
        buffer = io.BytesIO()
        torch.save(Classifier(build_net("resnet18", 3)).state_dict(), buffer)
        STATE_BYTES = buffer.getvalue()
    return STATE_BYTES


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_model_weights_file(data):
    raw = bytearray(_state_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "junk"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0xFF
    elif kind == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "_meta.yaml").write_text(MODEL_META_TEXT)
        (root / "model_spec.yaml").write_text(yaml.safe_dump(SPEC))
        (root / "model").write_bytes(bytes(raw))
        try:
            spec, model = read_untrained_model_directory(root)
        except TrainPyTorchModelError as exc:
            assert "\n" not in str(exc)
            return
        assert model is not None and spec.model_name == "resnet18"


@pytest.mark.parametrize("row", [
    {"image_info": {"file_name": "../outside.png"}, "category": "cat"},
    {"image_info": {"file_name": "/etc/passwd"}, "category": "cat"},
    {"image_info": {"file_name": "image/../../outside.png"}, "category": "cat"},
    {"image_info": {"file_name": "http://example.com/x.png"}, "category": "cat"},
    {"image_info": {"file_name": "C:\\Windows\\x.png"}, "category": "cat"},
])
def test_escaping_rows_are_refused_not_indexed(tmp_path, row):
    lines = [json.dumps(r) for r in ROWS] + [json.dumps(row)]
    with pytest.raises(TrainPyTorchModelError, match="line 19"):
        load_image_directory(write_meta_dir(tmp_path / "d", META_TEXT, json.dumps(SCHEMA), lines), "Training")


# --- what the fuzzers found, kept as fixed examples ------------------------------------------------------------


def _schema_with(path: list, value) -> str:
    schema = json.loads(json.dumps(SCHEMA))
    node = schema
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(schema)


FOUND = {
    "elementType-not-an-object": ("meta", _schema_with(["columnAttributes", 0, "elementType"], "bytes"), None),
    "image_ref-a-list": ("meta", _schema_with(["columnAttributes", 0, "properties", "image_ref"], ["x"]), None),
    "annotation-name-a-list": ("meta", _schema_with(["columnAttributes", 2, "name"], []), None),
    "id-beyond-64-bits": ("meta", json.dumps(SCHEMA), '{"image_info": {"file_name": "a.png"}, "category": "cat", '
                                                      '"id": 99999999999999999999}'),
    "5000-digit-number": ("meta", json.dumps(SCHEMA), '{"id": ' + "1" * 5000 + "}"),
    "deep-nesting": ("meta", json.dumps(SCHEMA), "[" * 100_000),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_by_fuzzing_images(tmp_path, name):
    _, schema, line = FOUND[name]
    lines = [json.dumps(r) for r in ROWS] + ([line] if line else [])
    check_directory(write_meta_dir(tmp_path / "d", META_TEXT, schema, lines))


@pytest.mark.parametrize("meta_text, spec_text", [
    ("type: ImageDirectory\ncreated: 2020-13-45\n", None),  # PyYAML raises ValueError on impossible dates
    (None, "flavor: {name: pytorch}\nflavor_extras: {module: '', class: ResNet, init_params: {1: x, b: 2}}\n"),
])
def test_found_by_fuzzing_yaml(tmp_path, meta_text, spec_text):
    if meta_text:
        check_directory(write_meta_dir(tmp_path / "d", meta_text, json.dumps(SCHEMA), [json.dumps(r) for r in ROWS]))
    else:
        (tmp_path / "_meta.yaml").write_text(MODEL_META_TEXT)
        (tmp_path / "model_spec.yaml").write_text(spec_text)
        with pytest.raises(TrainPyTorchModelError, match=r"unknown keys \['1', 'b'\]"):
            read_model_spec(tmp_path)


def test_found_by_fuzzing_empty_weights_file(tmp_path):
    (tmp_path / "_meta.yaml").write_text(MODEL_META_TEXT)
    (tmp_path / "model_spec.yaml").write_text(yaml.safe_dump(SPEC))
    (tmp_path / "model").write_bytes(b"")
    with pytest.raises(TrainPyTorchModelError, match="cannot be loaded as PyTorch weights"):
        read_untrained_model_directory(tmp_path)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """A trained model directory (no training: fresh resnet18 weights), written once."""
    from train_pytorch_model.model_directory import ModelSpec, write_legacy_trained_files
    out = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    write_legacy_trained_files(out, model=Classifier(build_net("resnet18", 2)), spec=ModelSpec("resnet18"),
                               classes=["a", "b"], preprocessing=Preprocessing(image_size=32), is_cuda=False,
                               training_schema={}, training_samples=[], extra_info={})
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_trained_model_directory(trained_dir, data):
    """What `score` and the MLflow model read back: training_info.json, or (legacy) model_spec.yaml's
    pre-processor and index_to_label.csv."""
    from train_pytorch_model.model_directory import read_trained_model_directory
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("_meta.yaml", "model_spec.yaml", "index_to_label.csv", "training_info.json"):
            (root / name).write_bytes((trained_dir / name).read_bytes())
        (root / "model").symlink_to(trained_dir / "model")
        if data.draw(st.booleans()):
            info = json.loads((root / "training_info.json").read_text())
            (root / "training_info.json").write_text(json.dumps(mutate(info, data.draw), allow_nan=True))
        else:  # a directory written by the original: no training_info.json
            (root / "training_info.json").unlink()
            spec = yaml.safe_load((root / "model_spec.yaml").read_text())
            (root / "model_spec.yaml").write_text(yaml.safe_dump(mutate(spec, data.draw), allow_unicode=True))
            (root / "index_to_label.csv").write_text(data.draw(st.sampled_from(
                [",label\n0,a\n1,b\n", "", ",label\n5,x\n", "garbage\n\x00,,\n", ",label\n-1,a\n1\n"])))
        try:
            trained = read_trained_model_directory(root)
        except TrainPyTorchModelError as exc:
            assert "\n" not in str(exc)
            return
        assert len(trained.classes) == 2
        assert len(trained.preprocessing.mean) == len(trained.preprocessing.std) == 3
