"""Decoding and resizing cannot be made to hang or to take unbounded memory by an input (issue 14)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from train_pytorch_model.errors import InvalidModelDirectoryError, InvalidPreprocessingError
from train_pytorch_model.preprocessing import (
    MAX_RESIZE_ASPECT,
    ImageDecodeError,
    Preprocessing,
    _BoundedResize,
    decode_image,
    probe_image,
)

REPO = Path(__file__).resolve().parents[1]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(65535, 1), (1, 65535), (1_000_000, 1)])
@pytest.mark.parametrize("image_size", [32, 96, 224])
def test_extreme_aspect_ratios_resize_to_bounded_sizes(tmp_path, size, image_size):
    path = tmp_path / "line.png"
    Image.new("L", size).save(path)  # a few hundred bytes on disk
    prep = Preprocessing(image_size)
    image = decode_image(path, image_size)
    resized = _BoundedResize(prep.resize_size, MAX_RESIZE_ASPECT * prep.resize_size)(image)
    assert max(resized.size) <= MAX_RESIZE_ASPECT * prep.resize_size and min(resized.size) >= 1
    assert tuple(prep.eval_transform()(image).shape) == (3, image_size, image_size)
    assert tuple(prep.train_transform()(image).shape) == (3, image_size, image_size)


def test_ordinary_images_resize_as_torchvision_does(tmp_path):
    image = Image.new("RGB", (320, 240))
    assert _BoundedResize(256, 1024)(image).size == (341, 256)


def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(100_000, 100_000))
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode_image(path)
    assert "decompression-bomb" in probe_image(path)


@pytest.mark.slow
def test_a_fifo_image_is_skipped_by_name_not_read(tmp_path):
    fifo = tmp_path / "blocked.png"
    os.mkfifo(fifo)
    code = ("from train_pytorch_model.preprocessing import decode_image, ImageDecodeError\n"
            f"try:\n    decode_image({str(fifo)!r})\nexcept ImageDecodeError as e:\n    print('skip:', e)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr
    assert "skip: not a regular file" in result.stdout


@pytest.mark.parametrize("field, value", [
    ("crop_fraction", 0.01), ("crop_fraction", float("nan")), ("image_size", 10**6), ("image_size", 0),
    ("image_size", True), ("mean", (0.5, 0.5)), ("std", (0.2, 0.0, 0.2)), ("std", (1, float("inf"), 1)),
    ("augmentation", "rotate"),
])
def test_preprocessing_validates_its_fields(field, value):
    with pytest.raises(InvalidPreprocessingError, match=field) as caught:
        Preprocessing.from_dict({field: value})
    assert isinstance(caught.value, InvalidModelDirectoryError) and isinstance(caught.value, ValueError)


def test_preprocessing_round_trips_and_accepts_lists():
    prep = Preprocessing(64, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], crop_fraction=1.0, augmentation="none")
    assert Preprocessing.from_dict(prep.to_dict()) == prep and prep.mean == (0.5, 0.5, 0.5)
