"""`convert`: folders and archives -> the ImageDirectory layout of "Convert to Image Directory" (spec 2.1)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_multilabel_mltable
from train_pytorch_model.cli import main
from train_pytorch_model.image_directory import default_schema, load_image_directory
from train_pytorch_model.legacy_format import dump_json

META = "type: ImageDirectory\nextension: {}\nimage_list: images.lst\nsamples: _samples.json\nschema: _schema.json\n"


def convert(source, out, *extra) -> int:
    return main(["convert", "--input", str(source), "--image-directory", str(out), *extra])


def png_bytes(color=(200, 10, 10), size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_legacy_fixture_is_reproduced_byte_for_byte(tmp_path, legacy_image_dir):
    # The fixture's images, arranged as the ImageFolder tree designer converted them from.
    rows = [json.loads(line) for line in (legacy_image_dir / "images.lst").read_text().splitlines()]
    tree = tmp_path / "tree"
    for row in rows:
        source = legacy_image_dir / row["image_info"]["file_name"]
        (tree / row["category"]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tree / row["category"] / f"{row['id']:02d}.jpg")
    out = tmp_path / "converted"
    assert convert(tree, out) == 0
    for name in ("_meta.yaml", "images.lst", "_schema.json", "_samples.json"):
        assert (out / name).read_bytes() == (legacy_image_dir / name).read_bytes(), name
    assert sorted(os.listdir(out / "image")) == sorted(os.listdir(legacy_image_dir / "image"))
    for name in os.listdir(out / "image"):
        assert (out / "image" / name).read_bytes() == (legacy_image_dir / "image" / name).read_bytes()


def test_image_folder_layout_rules_and_skip_report(tmp_path, capsys):
    tree = tmp_path / "tree"
    for path, data in {
        "zebra/b.PNG": png_bytes(), "zebra/a.png": png_bytes((0, 0, 255)), "ant/x.jpg": None,
        "ant/notes.txt": b"not an image", "ant/broken.png": b"\x89PNG garbage", "top.png": png_bytes(),
        "ant/deeper/y.png": png_bytes(), ".hidden/z.png": png_bytes(), "zebra/.DS_Store": b"mac",
        "__MACOSX/ant/._x.jpg": b"resource fork",
    }.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            Image.new("RGB", (9, 7), (1, 2, 3)).save(tree / path, format="JPEG")
        else:
            (tree / path).write_bytes(data)
    out = tmp_path / "out"
    assert convert(tree, out) == 0
    captured = capsys.readouterr()
    assert "Converted 3 images, 2 classes" in captured.out and "4 files skipped" in captured.out
    for name, reason in (("ant/notes.txt", "not an image file extension"), ("ant/broken.png", "not a readable image"),
                         ("top.png", "top-level image outside any <class>/ folder"),
                         ("ant/deeper/y.png", "nested deeper than <class>/<image>")):
        assert f"Skipped '{name}': {reason}" in captured.err
    assert ".DS_Store" not in captured.err and "hidden" not in captured.err and "MACOSX" not in captured.err

    # Sorted paths, sorted classes, `image/<class id>_<row><suffix>` with the suffix's case kept.
    assert (out / "images.lst").read_text() == (
        '{"image_info": {"file_name": "image/0_0.jpg"}, "category": "ant", "id": 0}\n'
        '{"image_info": {"file_name": "image/1_1.png"}, "category": "zebra", "id": 1}\n'
        '{"image_info": {"file_name": "image/1_2.PNG"}, "category": "zebra", "id": 2}\n'
    )
    assert (out / "image" / "1_2.PNG").read_bytes() == (tree / "zebra" / "b.PNG").read_bytes()
    assert (out / "_meta.yaml").read_text() == META
    assert (out / "_schema.json").read_text() == dump_json(default_schema(["ant", "zebra"]))
    samples = json.loads((out / "_samples.json").read_text())
    assert [list(s) for s in samples] == [["image", "id", "category"]] * 3
    assert base64.b64decode(samples[1]["image"]) == (tree / "zebra" / "a.png").read_bytes()
    assert not (out / "_samples.json").read_text().endswith("\n")

    directory = load_image_directory(out, "Training")
    assert directory.layout == "meta" and directory.categories == ["ant", "zebra"]
    assert list(directory.labels) == [0, 1, 1] and list(directory.ids) == [0, 1, 2]


def test_flat_folder_is_unlabeled(tmp_path):
    tree = tmp_path / "flat"
    (tree / "sub" / "deeper").mkdir(parents=True)  # an image exactly one level deep would make it an ImageFolder
    (tree / "b.png").write_bytes(png_bytes())
    (tree / "sub" / "deeper" / "a b.png").write_bytes(png_bytes((0, 255, 0)))
    (tree / "a.png").write_bytes(png_bytes((0, 0, 255)))
    out = tmp_path / "out"
    assert convert(tree, out) == 0
    # Every image below the root, sorted, keeping its relative path under image/.
    assert (out / "images.lst").read_text() == (
        '{"image_info": {"file_name": "image/a.png"}, "id": 0}\n'
        '{"image_info": {"file_name": "image/b.png"}, "id": 1}\n'
        '{"image_info": {"file_name": "image/sub/deeper/a b.png"}, "id": 2}\n'
    )
    assert (out / "_schema.json").read_text() == dump_json(default_schema(None))
    assert [list(s) for s in json.loads((out / "_samples.json").read_text())] == [["image", "id"]] * 3
    directory = load_image_directory(out)
    assert not directory.is_labeled and directory.files == ["image/a.png", "image/b.png", "image/sub/deeper/a b.png"]


def make_tree(root: Path) -> Path:
    for path, color in {"cat/1.png": (250, 0, 0), "cat/2.png": (240, 0, 0), "dog/1.png": (0, 250, 0)}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(png_bytes(color))
    return root


def test_archives_convert_like_the_folder(tmp_path):
    tree = make_tree(tmp_path / "tree")
    assert convert(tree, tmp_path / "from_folder") == 0
    expected = (tmp_path / "from_folder" / "images.lst").read_text()

    # .zip with a wrapping folder and macOS junk
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as zf:
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, f"dataset/{path.relative_to(tree).as_posix()}")
        zf.writestr("__MACOSX/dataset/cat/._1.png", b"junk")
    # .tar.gz made with `tar -C tree -czf images.tgz .` (members named ./cat/1.png)
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tf:
        tf.add(tree, arcname=".")
    # a folder holding only the archive: how Azure ML mounts an uploaded file's folder
    (tmp_path / "mounted").mkdir()
    shutil.copy(tmp_path / "images.zip", tmp_path / "mounted" / "upload.zip")

    for source in ("images.zip", "images.tar.gz", "mounted"):
        out = tmp_path / f"out_{source}"
        assert convert(tmp_path / source, out) == 0, source
        assert (out / "images.lst").read_text() == expected, source
        assert sorted(os.listdir(out)) == ["_meta.yaml", "_samples.json", "_schema.json", "image", "images.lst"]
        assert (out / "image" / "0_0.png").read_bytes() == (tree / "cat" / "1.png").read_bytes()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no staging folder is left behind"


def test_unsafe_archive_members_are_never_extracted(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    with tarfile.open(tmp_path / "evil.tar", "w") as tf:
        tf.add(tree, arcname="data")
        for name in ("../escaped.png", "/tmp/absolute_escape.png"):
            info = tarfile.TarInfo(name)
            data = png_bytes()
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("data/cat/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.write(tree / "cat" / "1.png", "cat/1.png")
        zf.write(tree / "dog" / "1.png", "dog/1.png")
        zf.writestr("../../zip_escaped.png", png_bytes())

    assert convert(tmp_path / "evil.tar", tmp_path / "out_tar") == 0
    err = capsys.readouterr().err
    assert "Skipped '../escaped.png': path leads outside the archive" in err
    assert "Skipped '/tmp/absolute_escape.png': absolute path in the archive" in err
    assert "Skipped 'data/cat/link.png': link" in err
    assert (tmp_path / "out_tar" / "images.lst").read_text().count("\n") == 3

    assert convert(tmp_path / "evil.zip", tmp_path / "out_zip") == 0
    assert "Skipped '../../zip_escaped.png': path leads outside the archive" in capsys.readouterr().err
    for escaped in (tmp_path / "escaped.png", tmp_path.parent / "zip_escaped.png", Path("/tmp/absolute_escape.png")):
        assert not escaped.exists()


def test_zip_bomb_stops_at_the_size_cap(tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/huge.bmp", b"\0" * (8 << 20))  # 8 MiB of zeros: a few KiB compressed
        zf.writestr("dog/1.png", png_bytes())
    assert (tmp_path / "bomb.zip").stat().st_size < 100_000
    assert convert(tmp_path / "bomb.zip", tmp_path / "out", "--max-extracted-gib", "0.001") == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("InvalidDatasetError:") and "--max-extracted-gib" in line
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "bomb.zip"]


@pytest.mark.parametrize("case, error", [
    ("image_directory", "InvalidDatasetError: "),
    ("no_images", "InvalidDatasetError: "),
    ("coco", "InvalidDatasetError: "),
    ("not_empty_output", "OutputDirectoryError: "),
    ("missing", "DirectoryNotFoundError: "),
    ("text_file", "InvalidDatasetError: "),
])
def test_errors(tmp_path, capsys, legacy_image_dir, case, error):
    source, out = tmp_path / "in", tmp_path / "out"
    if case == "image_directory":
        source = legacy_image_dir
    elif case == "no_images":
        source.mkdir()
        (source / "readme.txt").write_text("hello")
    elif case == "coco":
        make_tree(source)
        (source / "annotations.json").write_text('{"images": [], "annotations": []}')
    elif case == "not_empty_output":
        make_tree(source)
        out.mkdir()
        (out / "keep.txt").write_text("earlier result")
    elif case == "text_file":
        source = tmp_path / "labels.txt"
        source.write_text("cat")
    assert convert(source, out) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(error), line
    if case != "not_empty_output":
        assert not out.exists()
    else:
        assert os.listdir(out) == ["keep.txt"]


def test_symlinks_leading_outside_the_input_are_skipped(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    secret = tmp_path / "outside.png"
    secret.write_bytes(png_bytes((1, 1, 1)))
    (tree / "cat" / "escape.png").symlink_to(secret)
    (tree / "dog" / "alias.png").symlink_to(tree / "cat" / "1.png")  # inside the input: fine
    assert convert(tree, tmp_path / "out") == 0
    assert "Skipped 'cat/escape.png': symbolic link to a file outside the input folder" in capsys.readouterr().err
    rows = (tmp_path / "out" / "images.lst").read_text().splitlines()
    assert len(rows) == 4 and '"image/1_3.png"' in rows[3]  # dog/1.png, then dog/alias.png
    assert (tmp_path / "out" / "image" / "1_3.png").read_bytes() == (tree / "cat" / "1.png").read_bytes()
    assert not (tmp_path / "out" / "image" / "1_3.png").is_symlink()


def test_a_zip_member_with_a_300_character_name_is_skipped_by_name(tmp_path, capsys):
    archive = tmp_path / "data.zip"
    long_name = "cat/" + "x" * 300 + ".png"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat/1.png", png_bytes())
        zf.writestr(long_name, png_bytes())
        zf.writestr("dog/1.png", png_bytes((1, 2, 3)))
    assert convert(archive, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "longer than 255 bytes" in err and "x" * 50 in err
    assert max(len(line) for line in err.splitlines()) < 500  # the name is quoted, bounded
    assert len((tmp_path / "out" / "images.lst").read_text().splitlines()) == 2


@pytest.mark.slow
def test_a_fifo_among_the_images_is_skipped_not_read(tmp_path):
    tree = make_tree(tmp_path / "tree")
    os.mkfifo(tree / "cat" / "blocked.png")
    code = ("from train_pytorch_model.cli import main; import sys; "
            f"sys.exit(main(['convert', '--input', {str(tree)!r}, '--image-directory', {str(tmp_path / 'out')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert result.returncode == 0, result.stderr
    assert "Skipped 'cat/blocked.png': not a readable image (not a regular file" in result.stderr


def test_convert_to_mltable_from_the_cli(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    assert main(["convert", "--input", str(tree), "--output", str(tmp_path / "t"), "--to", "mltable"]) == 0
    assert "to MLTable" in capsys.readouterr().out
    directory = load_image_directory(tmp_path / "t", "Training")
    assert directory.layout == "mltable" and directory.categories == ["cat", "dog"]
    assert convert(tmp_path / "t", tmp_path / "t2", "--to", "mltable") == 1  # already an MLTable


def multilabel_input(root: Path) -> Path:
    """conftest's multi-label MLTable (sets of one and several classes, one empty set) plus an unlabeled row,
    which must stay apart from the empty set."""
    source = write_multilabel_mltable(root, count=8)
    with open(source / "images.jsonl", "a", encoding="utf-8") as rows:
        rows.write('{"image_url": "images/1.png"}\n')
    return source


def label_sets(directory) -> list[tuple[int, list[str]]]:
    return [(directory.labels[i], directory.label_names(i)) for i in range(len(directory))]


@pytest.mark.parametrize("to", ["mltable", "parquet"])
def test_multilabel_label_sets_survive_conversion_row_by_row(tmp_path, capsys, to):
    source = multilabel_input(tmp_path / "in")
    before = load_image_directory(source, "Input", keep_unlabeled=True)
    expected = label_sets(before)
    assert before.is_multilabel and any(len(names) > 1 for _, names in expected)
    assert (0, []) in expected and (-1, []) in expected
    # An MLTable folder --to mltable is refused as one already; its JSON Lines file is the same table.
    assert convert(source / "images.jsonl" if to == "mltable" else source, tmp_path / "out", "--to", to) == 0
    assert "(multi-label)" in capsys.readouterr().out
    after = load_image_directory(tmp_path / "out", "Input", keep_unlabeled=True)
    assert after.is_multilabel and label_sets(after) == expected
    assert sorted(after.categories) == sorted(before.categories)
    if to == "parquet":
        import datasets  # a dev dependency: the shards are datasets' Sequence(ClassLabel)

        loaded = datasets.Dataset.from_parquet([str(f) for f in sorted((tmp_path / "out" / "data").iterdir())])
        assert loaded.features["label"] == datasets.Sequence(datasets.ClassLabel(names=after.categories))
        # Shards in, shards out (re-sharded): the sets again.
        assert convert(tmp_path / "out", tmp_path / "again", "--to", "parquet", "--shard-rows", "4") == 0
        again = load_image_directory(tmp_path / "again", "Input", keep_unlabeled=True)
        assert len(again.shards.files) == 3 and label_sets(again) == expected


def test_multilabel_input_is_refused_for_an_image_directory(tmp_path, capsys):
    source = multilabel_input(tmp_path / "in")
    assert convert(source, tmp_path / "out") == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("InvalidDatasetError: ") and str(source) in line and "multi-label" in line
    assert "--to mltable or --to parquet" in line
    assert os.listdir(tmp_path) == ["in"]  # no output folder, no staging folder beside it
