"""Reading ImageDirectory layouts (spec section 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_pytorch_model.errors import InvalidDatasetError, NotLabeledDatasetError
from train_pytorch_model.image_directory import default_schema, load_image_directory, require_labeled
from train_pytorch_model.legacy_format import dump_json, dump_json_line, dump_yaml


def write_meta_directory(root, rows, categories, *, with_meta=True):
    """A meta-route ImageDirectory with the given (file, label) rows; images are generated."""
    (root / "image").mkdir(parents=True)
    for name, _ in rows:
        Image.new("RGB", (20, 16), (10, 200, 30)).save(root / name)
    with open(root / "images.lst", "w") as f:
        for i, (name, label) in enumerate(rows):
            f.write(dump_json_line({"image_info": {"file_name": name}, "category": label, "id": i}))
    schema = default_schema(None)
    schema["columnAttributes"].append({
        "name": "category", "type": "String", "isFeature": False,
        "elementType": {"typeName": "str", "isNullable": False},
        "properties": {"annotation_type": "COCO_classification", "categories": categories},
    })
    (root / "_schema.json").write_text(dump_json(schema))
    if with_meta:
        (root / "_meta.yaml").write_text(dump_yaml({"type": "ImageDirectory", "extension": {},
                                                    "image_list": "images.lst",
                                                    "schema": "_schema.json"}))
    return root


def test_reads_the_legacy_fixture(legacy_image_dir):
    directory = load_image_directory(legacy_image_dir, "Training")
    assert directory.layout == "meta"
    assert directory.categories == ["cat", "dog", "fox"]
    assert len(directory) == 18
    assert directory.files[0] == "image/0_0.jpg"
    assert [directory.categories[i] for i in directory.labels[:7]] == ["cat"] * 6 + ["dog"]
    assert list(directory.ids) == list(range(18))
    assert directory.path(17).is_file()


def test_image_folder_tree_with_unicode_and_hidden_entries(tmp_path):
    root = tmp_path / "tree"
    for cls in ("chat noir", "été", "Zebra"):
        (root / cls).mkdir(parents=True)
        for n in range(2):
            Image.new("RGB", (8, 8)).save(root / cls / f"{n}.png")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "chat noir" / ".DS_Store").write_bytes(b"\0")
    Image.new("RGB", (8, 8)).save(root / "root_level.png")  # ignored: not <class>/<file>
    (root / "Zebra" / "notes.txt").write_text("not an image")

    directory = load_image_directory(root)
    assert directory.layout == "image_folder"
    assert directory.categories == sorted(["chat noir", "été", "Zebra"])
    assert len(directory) == 6
    assert all(not f.startswith(".") and "/." not in f for f in directory.files)
    schema_categories = directory.schema["columnAttributes"][2]["properties"]["categories"]
    assert [c["name"] for c in schema_categories] == directory.categories


def test_flat_folder_is_not_labeled(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for n in range(3):
        Image.new("RGB", (8, 8)).save(root / f"{n}.jpg")
    directory = load_image_directory(root)
    assert directory.layout == "flat" and not directory.is_labeled and len(directory) == 3
    with pytest.raises(NotLabeledDatasetError, match="no label column"):
        require_labeled(directory, "Training")


def test_images_lst_and_schema_without_meta_use_the_meta_route(tmp_path):
    # The original fell back to ImageFolder here and saw one class named "image".
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "x"), ("image/b.png", "y")],
                                [{"id": 0, "name": "x"}, {"id": 1, "name": "y"}], with_meta=False)
    directory = load_image_directory(root)
    assert directory.layout == "meta" and directory.categories == ["x", "y"]


def test_category_id_gaps_are_closed_up_and_rows_without_label_skipped(tmp_path):
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "b"), ("image/b.png", ""), ("image/c.png", "a")],
                                [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}])
    directory = load_image_directory(root)
    assert directory.categories == ["a", "b"]
    assert len(directory) == 2 and [directory.categories[i] for i in directory.labels] == ["b", "a"]


@pytest.mark.parametrize("label, message", [(3, "not a category name"), ("wolf", "not among the schema")])
def test_bad_labels_name_the_row(tmp_path, label, message):
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "x"), ("image/b.png", label)],
                                [{"id": 0, "name": "x"}])
    with pytest.raises(InvalidDatasetError, match=rf"images.lst line 2.*{message}"):
        load_image_directory(root)


def test_non_classification_annotation_is_refused(tmp_path):
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "x")], [{"id": 0, "name": "x"}])
    schema = json.loads((root / "_schema.json").read_text())
    schema["columnAttributes"][2]["properties"]["annotation_type"] = "COCO_object_detection"
    (root / "_schema.json").write_text(json.dumps(schema))
    with pytest.raises(InvalidDatasetError, match="COCO_object_detection"):
        load_image_directory(root)


def test_coco_folder_is_refused_up_front(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "1.jpg")
    (root / "annotations.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}],
                                                        "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(InvalidDatasetError, match="COCO folder"):
        load_image_directory(root)


@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd", "http://example.com/a.png", "image/../../x.png"])
def test_rows_never_point_outside_the_folder(tmp_path, path):
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "x")], [{"id": 0, "name": "x"}])
    with open(root / "images.lst", "a") as f:
        f.write(dump_json_line({"image_info": {"file_name": path}, "category": "x", "id": 9}))
    with pytest.raises(InvalidDatasetError, match="outside the folder"):
        load_image_directory(root)


def test_index_is_compact(tmp_path):
    # 20k rows: the index stores paths and small integer arrays, not per-row objects.
    root = tmp_path / "big"
    root.mkdir()
    with open(root / "images.lst", "w") as f:
        for i in range(20_000):
            f.write(dump_json_line({"image_info": {"file_name": f"image/{i}.png"}, "category": "ab"[i % 2], "id": i}))
    schema = default_schema(["a", "b"])
    (root / "_schema.json").write_text(dump_json(schema))
    (root / "_meta.yaml").write_text(dump_yaml({"type": "ImageDirectory", "extension": {}, "image_list": "images.lst",
                                                "schema": "_schema.json"}))
    directory = load_image_directory(root)
    assert len(directory) == 20_000
    assert directory.labels.itemsize <= 8 and directory.labels.typecode == "l"


def test_copied_fixture_with_meta_keys_renamed(tmp_path, legacy_image_dir):
    root = tmp_path / "copy"
    shutil.copytree(legacy_image_dir, root)
    (root / "images.lst").rename(root / "rows.jsonl")
    (root / "_meta.yaml").write_text(dump_yaml({"type": "ImageDirectory", "extension": {}, "image_list": "rows.jsonl",
                                                "schema": "_schema.json"}))
    assert len(load_image_directory(root)) == 18


def test_all_image_kinds_decode_to_rgb(tmp_path):
    from train_pytorch_model.preprocessing import decode_image

    rgb = np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    images = {
        "rgb.jpg": Image.fromarray(rgb), "grey.png": Image.fromarray(rgb[..., 0]),
        "palette.gif": Image.fromarray(rgb).convert("P"), "alpha.png": Image.fromarray(rgb).convert("RGBA"),
        "pic.bmp": Image.fromarray(rgb), "pic.webp": Image.fromarray(rgb), "pic.tiff": Image.fromarray(rgb),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
        decoded = decode_image(tmp_path / name)
        assert decoded.mode == "RGB" and decoded.size == (10, 12), name
    # 16-bit values are scaled, not clipped to white.
    deep = np.asarray(decode_image(tmp_path / "deep.png"))[..., 0]
    assert np.abs(deep.astype(int) - rgb[..., 0]).max() <= 1


# --- hostile inputs (issue 14) -----------------------------------------------------------------------------

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_a_yaml_alias_bomb_in_meta_is_refused_before_it_expands(tmp_path):
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "x")], [{"id": 0, "name": "x"}])
    (root / "_meta.yaml").write_text("type: ImageDirectory\n" + ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 1000
    with pytest.raises(InvalidDatasetError, match="anchor or alias") as caught:
        load_image_directory(root, "Training")
    assert len(str(caught.value)) < 500


def test_oversized_metadata_is_refused(tmp_path):
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "x")], [{"id": 0, "name": "x"}])
    with open(root / "_schema.json", "ab") as handle:
        handle.truncate(65 * 2**20)  # sparse: no disk used
    with pytest.raises(InvalidDatasetError, match="at most"):
        load_image_directory(root, "Training")


def test_schema_with_100k_categories_loads(tmp_path):
    categories = [{"id": i, "name": f"class {i}"} for i in range(100_000)]
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "class 7")], categories)
    assert len(load_image_directory(root, "Training").categories) == 100_000
    categories[-1]["name"] = "class 0"
    write_meta_directory(tmp_path / "e", [("image/a.png", "class 7")], categories)
    with pytest.raises(InvalidDatasetError, match="appear more than once"):
        load_image_directory(tmp_path / "e", "Training")


def test_a_huge_label_is_quoted_bounded(tmp_path):
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "x" * 900_000)], [{"id": 0, "name": "x"}])
    with pytest.raises(InvalidDatasetError, match="is not among") as caught:
        load_image_directory(root, "Training")
    assert len(str(caught.value)) < 1000


def test_an_invalid_utf8_byte_is_reported_on_its_line(tmp_path):
    rows = [(f"image/{i}.png", "x") for i in range(3)]
    root = write_meta_directory(tmp_path / "d", rows, [{"id": 0, "name": "x"}])
    lines = (root / "images.lst").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"x"', b'"\xff"')
    (root / "images.lst").write_bytes(b"".join(lines))
    with pytest.raises(InvalidDatasetError, match="line 3 is not UTF-8"):
        load_image_directory(root, "Training")


def test_a_non_utf8_class_folder_fails_at_load_naming_the_folder(tmp_path):
    root = tmp_path / "d"
    bad = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: a surrogate escape in Python
    for name in ("good", bad):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "0.png")
    with pytest.raises(InvalidDatasetError, match=r"class folder name b'caf\\xe9' is not valid UTF-8"):
        load_image_directory(root, "Training")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["images.lst", "_schema.json", "_meta.yaml"])
def test_a_fifo_metadata_file_is_refused_promptly(tmp_path, name):
    root = write_meta_directory(tmp_path / "d", [("image/a.png", "x")], [{"id": 0, "name": "x"}])
    (root / name).unlink()
    os.mkfifo(root / name)
    code = f"from train_pytorch_model.image_directory import load_image_directory as l; l({str(root)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert result.returncode != 0 and "InvalidDatasetError" in result.stderr
    assert "not a regular file" in result.stderr


def test_strict_json_is_written():
    with pytest.raises(ValueError):
        dump_json({"loss": float("nan")})
    with pytest.raises(ValueError):
        dump_json_line({"loss": float("inf")})
