"""The training augmentation in one pass (preprocessing.RandomCropFlip): torchvision's RandomResizedCrop + flip
recipe, drawn before decoding so JPEGs decode at the DCT scale the crop needs; batches arrive channels_last."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from train_pytorch_model import preprocessing
from train_pytorch_model.data import build_dataset, collate
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.preprocessing import Preprocessing, decode_image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with a sharp-edged rectangle: a misplaced crop, flip or rotation shows."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.array(field)
    pixels[height // 5: height // 2, width // 6: width // 2] = (250, 20, 40)
    return Image.fromarray(pixels)


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.fixture
def files(tmp_path):
    rotated = Image.Exif()
    rotated[0x0112] = 6
    photo(120, 90, 1).save(tmp_path / "plain.jpg", quality=92)
    photo(150, 100, 2).save(tmp_path / "rotated.jpg", quality=92, exif=rotated)
    photo(60, 80, 3).convert("L").save(tmp_path / "grey.jpg", quality=92)
    photo(70, 50, 4).save(tmp_path / "lossless.png")
    return tmp_path


@pytest.mark.parametrize("name", ["plain.jpg", "rotated.jpg", "grey.jpg", "lossless.png"])
def test_same_crop_and_flip_as_torchvisions_recipe_for_the_same_seed(files, name):
    """At full decoding scale our one-pass crop is torchvision's RandomResizedCrop(scale 0.5-1) + flip + PILToTensor
    on the decoded image (the same draws; only the resize kernel differs: torch's vs Pillow's, < 1 level)."""
    transform = Preprocessing(image_size=32).train_transform()
    reference = v2.Compose([v2.RandomResizedCrop(32, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                            v2.PILToTensor()])
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        ours = transform.load(files / name, None)
        torch.manual_seed(seed)
        expected = reference(decode_image(files / name))
        torch.manual_seed(seed)
        flips.add(transform.params(*decode_image(files / name).size[::-1])[1])
        assert ours.dtype == torch.uint8 and ours.shape == expected.shape == (3, 32, 32)
        assert mean_difference(ours, expected) < 1.0, (name, seed)
        torch.manual_seed(seed)
        assert mean_difference(ours, transform(decode_image(files / name))) < 1.0  # from a decoded image too
    assert flips == {True, False}
    torch.manual_seed(0)
    first = transform.load(files / name, None)
    assert any(mean_difference(first, transform.load(files / name, None)) > 3 for _ in range(3))  # the check bites


def test_a_big_jpeg_decodes_at_the_smallest_scale_that_still_covers_the_crop(tmp_path, monkeypatch):
    path = tmp_path / "photo.jpg"
    photo(1600, 1200).save(path, quality=92)
    decoded_sizes = []
    real, real_full_scale = preprocessing._decoded_rgb, preprocessing._full_scale_jpeg

    def spy(image, draft):
        decoded = real(image, draft)
        decoded_sizes.append(decoded.size)
        return decoded

    def spy_full_scale(image):
        pixels = real_full_scale(image)
        decoded_sizes.append((pixels.shape[-1], pixels.shape[-2]))
        return pixels

    monkeypatch.setattr(preprocessing, "_decoded_rgb", spy)
    monkeypatch.setattr(preprocessing, "_full_scale_jpeg", spy_full_scale)
    transform = Preprocessing(image_size=128).train_transform()
    for seed in range(8):
        torch.manual_seed(seed)
        box, _ = transform.params(1200, 1600)
        torch.manual_seed(seed)
        drafted = transform.load(path, 146)
        scale = 1600 / decoded_sizes[-1][0]
        assert scale in (1, 2, 4, 8)
        assert min(box[2], box[3]) / scale >= 128  # the crop keeps at least the output's resolution ...
        assert scale == 8 or min(box[2], box[3]) / (2 * scale) < 128  # ... at the smallest scale that does
        torch.manual_seed(seed)
        assert mean_difference(drafted, transform.load(path, None)) < 2.0  # close to decoding it whole
    assert decoded_sizes[-1] == (1600, 1200)
    assert {1600 // w for w, _ in decoded_sizes[::2]} <= {4, 8}  # 1600x1200 crops (>= 850 px) for 128 px


@pytest.mark.parametrize("name", ["plain.jpg", "grey.jpg", "progressive.jpg"])
def test_a_full_scale_jpeg_decodes_through_torchvision_to_pillows_very_pixels(files, name, monkeypatch):
    """At full scale torchvision's libjpeg-turbo decodes (faster, no copy out of Pillow): the same pixels as
    Pillow's decode, so the same training crops, bit for bit."""
    photo(90, 70, 5).save(files / "progressive.jpg", quality=90, progressive=True)
    with preprocessing.opened_image(files / name) as image:
        pixels = preprocessing._full_scale_jpeg(image)
        expected = torch.from_numpy(np.array(preprocessing._decoded_rgb(image, None)))  # the same open file
    assert pixels is not None and pixels.dtype == torch.uint8 and pixels.shape == (1, 3, *expected.shape[:2])
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pixels[0].permute(1, 2, 0), expected)

    transform = Preprocessing(image_size=32).train_transform()

    def crops():
        out = []
        for seed in range(4):
            torch.manual_seed(seed)
            out.append(transform.load(files / name, None))
        return out

    calls = []
    monkeypatch.setattr(preprocessing, "_full_scale_jpeg", lambda image: calls.append(image.size) or pixels)
    through_torchvision = crops()
    assert len(calls) == 4  # the path was taken
    monkeypatch.setattr(preprocessing, "_full_scale_jpeg", lambda image: None)  # torchvision refuses: Pillow
    assert all(torch.equal(a, b) for a, b in zip(through_torchvision, crops()))


def test_what_torchvision_does_not_decode_as_pillow_goes_to_pillow(files, monkeypatch):
    """A truncated JPEG (torchvision refuses it; Pillow decodes the missing part grey, as the original did), an
    EXIF-rotated one and a CMYK one (Pillow orients and converts them) decode through Pillow."""
    data = (files / "plain.jpg").read_bytes()
    (files / "truncated.jpg").write_bytes(data[: len(data) // 2])
    photo(80, 60, 6).convert("CMYK").save(files / "cmyk.jpg", quality=92)
    with preprocessing.opened_image(files / "truncated.jpg") as image:
        assert preprocessing._full_scale_jpeg(image) is None
    with monkeypatch.context() as patch:  # a file over the bound is not read whole: Pillow streams it
        patch.setattr(preprocessing, "FULL_SCALE_JPEG_MAX_BYTES", len(data) - 1)
        with preprocessing.opened_image(files / "plain.jpg") as image:
            assert preprocessing._full_scale_jpeg(image) is None
        patch.setattr(preprocessing, "FULL_SCALE_JPEG_MAX_BYTES", len(data))
        with preprocessing.opened_image(files / "plain.jpg") as image:
            assert preprocessing._full_scale_jpeg(image) is not None
    taken = []
    real = preprocessing._full_scale_jpeg
    monkeypatch.setattr(preprocessing, "_full_scale_jpeg", lambda image: taken.append(image.size) or real(image))
    transform = Preprocessing(image_size=32).train_transform()
    for name in ("truncated.jpg", "rotated.jpg", "cmyk.jpg"):
        torch.manual_seed(0)
        ours = transform.load(files / name, None)
        torch.manual_seed(0)
        assert torch.equal(ours, transform(decode_image(files / name))), name
    assert taken == [(120, 90)]  # only the truncated file was offered to torchvision (and refused)


def test_batches_are_channels_last_straight_from_the_images(legacy_image_dir):
    """Both transforms give views of HWC memory (PILToTensor does too); collate stacks them as NHWC once."""
    directory = load_image_directory(legacy_image_dir)
    classes = {c: i for i, c in enumerate(directory.categories)}
    for train in (True, False):
        dataset = build_dataset(directory, classes, Preprocessing(32), train=train, seed=1)
        images = collate([dataset[(i, 0)] for i in range(4)]).images
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
        assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        assert torch.equal(images, torch.stack([dataset[(i, 0)][0] for i in range(4)]))
