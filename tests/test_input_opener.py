"""One opener for every read of input bytes (issue 21 items 1, 3, 6, 11; issue 20 item 6): whatever reads a
file that came with an input — training's decode, the GPU path's header read, the output's `_samples.json`
and MLflow input example, tables and metadata — refuses links out of the input, FIFOs, devices and oversized
files the same way, and never quotes what lies outside."""

from __future__ import annotations

import base64
import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import deadline, write_image_folder
from train_pytorch_model import preprocessing
from train_pytorch_model.errors import InvalidDatasetError
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.model_directory import training_samples
from train_pytorch_model.preprocessing import ImageDecodeError, decode_image, probe_image
from train_pytorch_model.pyfunc import example_png

SECRET = "secret-token-7f3a: do not copy me"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    """An ImageFolder whose first rows are hostile: a FIFO (row 0), a link to an outside text file (row 1),
    then ordinary images."""
    root = write_image_folder(tmp_path / "train", {"a": 4, "b": 4}, size=(32, 32))
    (tmp_path / "outside.txt").write_text(SECRET)
    for name in ("0.png", "1.png"):
        (root / "a" / name).unlink()
    os.mkfifo(root / "a" / "0.png")
    (root / "a" / "1.png").symlink_to(tmp_path / "outside.txt")
    return root


def test_samples_never_copy_a_fifo_or_a_file_outside_the_input(hostile_folder):
    directory = load_image_directory(hostile_folder, "Training")
    assert directory.files[:2] == ["a/0.png", "a/1.png"]
    with deadline():
        samples = training_samples(directory, directory.schema)
    assert samples[0]["image"] is None and samples[1]["image"] is None  # FIFO, link out: never read
    assert base64.b64decode(samples[2]["image"]) == (hostile_folder / "a" / "2.png").read_bytes()
    assert SECRET not in str(samples)


@pytest.mark.parametrize("position", ["row 0 links to an outside PNG", "row 0 is a FIFO", "row 0 links to /dev/zero"])
def test_the_input_example_never_shows_what_training_refused(tmp_path, position):
    root = write_image_folder(tmp_path / "train", {"a": 2, "b": 2}, size=(32, 32))
    first = root / "a" / "0.png"
    first.unlink()
    if "outside PNG" in position:
        Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
        first.symlink_to(tmp_path / "red.png")
    elif "FIFO" in position:
        os.mkfifo(first)
    else:
        first.symlink_to("/dev/zero")
    directory = load_image_directory(root, "Training")
    with deadline():
        example = Image.open(io.BytesIO(example_png(directory)))
    assert example.convert("RGB").getpixel((0, 0)) == (128, 128, 128)  # the grey square, not the red thumbnail


def test_a_samples_row_larger_than_the_bound_is_left_out(tmp_path, monkeypatch):
    from train_pytorch_model import model_directory

    root = write_image_folder(tmp_path / "train", {"a": 2, "b": 2}, size=(32, 32))
    directory = load_image_directory(root, "Training")
    monkeypatch.setattr(model_directory, "MAX_SAMPLE_BYTES", 10)
    assert [row["image"] for row in training_samples(directory, directory.schema)] == [None, None, None]


# --- the same bad file, the same reason on the CPU and the GPU decode paths -----------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "data" / "a").mkdir(parents=True)
    folder = tmp_path / "data" / "a"
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")
    files = {"link out": folder / "link.jpg", "fifo": folder / "fifo.jpg", "garbage": folder / "garbage.jpg",
             "eps": folder / "eps.jpg", "bomb": folder / "bomb.png", "missing": folder / "missing.jpg"}
    files["link out"].symlink_to(tmp_path / "outside.jpg")
    os.mkfifo(files["fifo"])
    files["garbage"].write_bytes(b"not an image at all" * 10)
    files["eps"].write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    files["bomb"].write_bytes(png_header(13370, 13370))  # 179 Mpx: over the documented 89 Mpx
    return files


def png_header(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_the_cpu_and_gpu_paths_classify_each_bad_file_the_same(tmp_path):
    gpu_decode = pytest.importorskip("train_pytorch_model.gpu_decode")
    root = tmp_path / "data"
    for kind, path in _bad_files(tmp_path).items():
        with deadline():
            with pytest.raises(ImageDecodeError) as cpu:
                decode_image(path, 32, inside=root)
            with pytest.raises(ImageDecodeError) as gpu:
                gpu_decode._header(path, inside=root)
        assert str(cpu.value) == str(gpu.value), kind
        expected = {"link out": "outside the input folder", "fifo": "not a regular file", "garbage": "cannot identify",
                    "eps": "cannot identify", "bomb": "decompression-bomb", "missing": "file not found"}[kind]
        assert expected in str(cpu.value), (kind, str(cpu.value))


# --- pixels: the documented bound, from the header; conversions without full-size float copies ----------------


def test_a_179_megapixel_image_is_refused_from_its_header(tmp_path):
    """Pillow alone refuses only at twice its MAX_IMAGE_PIXELS: 13370^2 = 178.8 Mpx used to decode."""
    path = tmp_path / "big.png"
    path.write_bytes(png_header(13370, 13370))
    with pytest.raises(ImageDecodeError, match="more than 89478485 pixels"):
        decode_image(path)
    just_over = tmp_path / "over.png"
    just_over.write_bytes(png_header(9460, 9460))  # 89.49 Mpx, under Pillow's own refusal
    assert "decompression-bomb" in probe_image(just_over)


def _sixteen_bit_png(width: int, height: int) -> bytes:
    """A real 16-bit greyscale PNG, all rows identical (compresses to almost nothing)."""
    row = b"\x00" + np.linspace(0, 65535, width).astype(">u2").tobytes()
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_a_16_bit_image_converts_without_full_size_float_copies(tmp_path):
    side = 2000  # 4 Mpx: decoded 8 MB as 16-bit; the old float32 path took 3 more full copies (48 MB)
    path = tmp_path / "deep.png"
    path.write_bytes(_sixteen_bit_png(side, side))
    tracemalloc.start()
    image = decode_image(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert image.mode == "RGB" and image.size == (side, side)
    row = np.asarray(image)[0, :, 0]
    expected = (np.linspace(0, 65535, side).astype(np.uint16) // 257).astype(np.uint8)
    assert (row == expected).all()
    # numpy's allocations are traced: the 8-bit output and one strip, not 4-byte copies of every pixel
    assert peak < 3 * side * side, peak


def test_16_bit_conversion_matches_the_float_formula(tmp_path):
    values = np.arange(0, 65536, 7, dtype=np.uint16)[:4096].reshape(64, 64)
    image = Image.fromarray(values.astype(np.uint16))  # mode I;16
    path = tmp_path / "v.png"
    image.save(path)
    got = np.asarray(decode_image(path))[..., 0]
    expected = (values.astype(np.float32) / 257.0).clip(0, 255).astype(np.uint8)
    assert (got == expected).all()


# --- only raster formats: EPS never reaches Ghostscript ------------------------------------------------------


def test_eps_bytes_are_not_an_image_anywhere(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
    with pytest.raises(ImageDecodeError, match="cannot identify"):
        decode_image(eps)
    assert calls == []
    assert preprocessing.RASTER_FORMATS and "EPS" not in preprocessing.RASTER_FORMATS


# --- tables and metadata: never followed out of the input, never quoted ---------------------------------------


def _outside_csv(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return outside / "passwd"


@pytest.mark.parametrize("what", ["labels.csv", "_meta.yaml", "MLTable file:", "images.lst"])
def test_tables_and_metadata_linked_out_of_the_input_are_refused_by_name(tmp_path, what):
    secret = _outside_csv(tmp_path)
    root = write_image_folder(tmp_path / "data", {"a": 2, "b": 2}, size=(16, 16))
    if what == "labels.csv":
        (root / "labels.csv").symlink_to(secret)
    elif what == "_meta.yaml":
        (root / "_meta.yaml").symlink_to(secret)
    elif what == "MLTable file:":
        (root / "MLTable").write_text("paths:\n- file: ./rows.jsonl\ntransformations:\n- read_json_lines\n")
        (root / "rows.jsonl").symlink_to(secret)
    else:
        (root / "_meta.yaml").write_text("type: ImageDirectory\n")
        (root / "_schema.json").write_text('{"columnAttributes": []}')
        (root / "images.lst").symlink_to(secret)
    with pytest.raises(InvalidDatasetError) as error:
        load_image_directory(root, "Training")
    assert "root:x" not in str(error.value) and "/bin/bash" not in str(error.value)
    assert "outside" in str(error.value)


# --- CSV: every line bounded and decoded on its own ------------------------------------------------------------


@pytest.mark.parametrize("fault", ["a 30 MB line", "a bad byte on line 5"])
def test_a_csv_line_is_bounded_and_named(tmp_path, fault):
    root = write_image_folder(tmp_path / "data", {"a": 3, "b": 3}, size=(16, 16))
    rows = [b"image,label\n"] + [f"{c}/{n}.png,{c}\n".encode() for c in "ab" for n in range(3)]
    if fault == "a 30 MB line":
        rows[3] = b"a/2.png,a" + b",x" * (15 * 2**20) + b"\n"  # many small fields: csv's field limit never trips
        expected = "line 4 is longer than 1048576 bytes"
    else:
        rows[4] = b"b/0.png,caf\xe9\n"
        expected = "line 5 is not UTF-8"
    (root / "labels.csv").write_bytes(b"".join(rows))
    with pytest.raises(InvalidDatasetError, match=expected):
        load_image_directory(root / "labels.csv", "Training")


# --- other readers of inputs: evaluate's scored table, a legacy model's label map ------------------------------


@pytest.mark.parametrize("kind", ["fifo", "link out"])
def test_evaluate_reads_its_scored_table_through_the_opener(tmp_path, kind):
    from train_pytorch_model.evaluate import read_scored_table

    (tmp_path / "scored").mkdir()
    table = tmp_path / "scored" / "scored.csv"
    if kind == "fifo":
        os.mkfifo(table)
    else:
        (tmp_path / "outside.csv").write_text(f"file,{SECRET}\n")
        table.symlink_to(tmp_path / "outside.csv")
    with deadline():
        with pytest.raises(InvalidDatasetError) as error:
            read_scored_table(table)
    assert SECRET not in str(error.value)


def test_a_legacy_label_map_linked_out_of_the_model_is_refused(tmp_path):
    from train_pytorch_model.errors import InvalidModelDirectoryError
    from train_pytorch_model.model_directory import _read_label_map

    (tmp_path / "outside.csv").write_text(f",label\n0,{SECRET}\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "index_to_label.csv").symlink_to(tmp_path / "outside.csv")
    with pytest.raises(InvalidModelDirectoryError, match="outside the input folder") as error:
        _read_label_map(tmp_path / "model" / "index_to_label.csv", 2)
    assert SECRET not in str(error.value)


# --- the whole write: training with hostile first rows ---------------------------------------------------------


def test_a_trained_model_holds_nothing_of_the_files_training_refused(tmp_path):
    """The original defect end to end: exit 0 used to put the outside file into _samples.json and the outside
    PNG's thumbnail into the MLflow input example."""
    import json

    from conftest import SHARED_FIXTURES
    from train_pytorch_model.cli import main

    root = write_image_folder(tmp_path / "train", {"a": 6, "b": 6}, size=(32, 32))
    (tmp_path / "secret.txt").write_text(SECRET)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    (root / "a" / "0.png").unlink()
    (root / "a" / "0.png").symlink_to(tmp_path / "red.png")  # row 0: the input example's source
    (root / "a" / "1.png").unlink()
    (root / "a" / "1.png").symlink_to(tmp_path / "secret.txt")  # row 1: a _samples.json row
    out = tmp_path / "trained"
    with deadline(600):
        assert main(["train", "--untrained-model", str(SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"),
                     "--training-data", str(root), "--validation-data", str(root), "--trained-model", str(out),
                     "--epochs", "1", "--batch-size", "5", "--image-size", "32", "--num-workers", "0",
                     "--max-bad-image-fraction", "0.5"]) == 0
    samples = json.loads((out / "_samples.json").read_text())
    assert [row["image"] for row in samples[:2]] == [None, None] and SECRET not in json.dumps(samples)
    example = json.loads((out / "input_example.json").read_text())
    cell = example["data"][0][0] if "data" in example else example["image"][0]
    png = Image.open(io.BytesIO(base64.b64decode(cell)))
    assert png.convert("RGB").getpixel((0, 0)) == (128, 128, 128)  # the grey square, not the outside red PNG
