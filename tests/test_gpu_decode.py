"""`--decode gpu` (gpu_decode.py), run on the CPU device: the same functions, torchvision's CPU JPEG decoder.

Its output is compared with the CPU path (data.ImageDataset: PIL decode at JPEG draft scale + PIL resize) on
real generated files. Against the CPU path decoding at full scale the pixels are the same (mean absolute
difference < 0.01 uint8 levels). The CPU path decodes big JPEGs at 1/2-1/8 scale (PIL draft mode), the device
path whole: measured mean absolute differences at 32 px are 0.001 (64x48 JPEG), 0.1-0.6 (1600x1200,
EXIF-rotated, greyscale), 1.3 (500x375) and 3.7 (200x150, decoded at 1/4 scale and hardly resized); 0 for PNG
and CMYK (the CPU path itself). Another epoch's crop of the same image differs by > 3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from train_pytorch_model import gpu_decode, preprocessing
from train_pytorch_model.data import EpochTaggedSampler, ImageDataset, build_dataset
from train_pytorch_model.gpu_decode import Plan, build_gpu_dataset, decode_batch, orient
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.models import Classifier, build_net
from train_pytorch_model.preprocessing import Preprocessing, decode_image

CPU = torch.device("cpu")


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour field with a sharp-edged rectangle: any misplaced crop or rotation shows."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.array(field)
    pixels[height // 5: height // 2, width // 6: width // 2] = (250, 20, 40)
    return Image.fromarray(pixels)


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder tree with the kinds of files the two paths handle differently."""
    a, b = tmp_path / "data" / "a", tmp_path / "data" / "b"
    a.mkdir(parents=True)
    b.mkdir()
    photo(64, 48, 1).save(a / "small.jpg", quality=90)
    photo(500, 375, 2).save(a / "imagenet.jpg", quality=90)
    photo(1600, 1200, 3).save(b / "photo.jpg", quality=90)  # CPU path decodes it at 1/8 scale (draft)
    photo(300, 200, 4).save(b / "rotated.jpg", quality=90, exif=exif_orientation(6))
    photo(120, 90, 5).convert("L").save(a / "grey.jpg", quality=90)
    photo(80, 60, 6).convert("CMYK").save(b / "cmyk.jpg", quality=90)  # CPU path in the worker
    photo(90, 70, 7).save(a / "lossless.png")  # CPU path in the worker
    (b / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 4)
    return load_image_directory(tmp_path / "data", "Training")


def both_paths(directory, prep: Preprocessing, train: bool, epoch: int = 0):
    classes = {name: i for i, name in enumerate(directory.categories)}
    cpu = build_dataset(directory, classes, prep, train=train, seed=7)
    gpu = build_gpu_dataset(directory, classes, prep, train=train, seed=7)
    return cpu, gpu


def rows_by_name(directory) -> dict[str, int]:
    return {name.rsplit("/", 1)[-1]: i for i, name in enumerate(directory.files)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil_exif_transpose(orientation):
    image = photo(7, 5, orientation)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    from PIL import ImageOps

    expected = np.array(ImageOps.exif_transpose(_with_orientation(image, orientation)))
    assert torch.equal(orient(pixels, orientation), torch.from_numpy(expected).permute(2, 0, 1))


def _with_orientation(image: Image.Image, orientation: int) -> Image.Image:
    image = image.copy()
    image.getexif()[0x0112] = orientation
    return image


@pytest.mark.parametrize("train", [True, False])
def test_device_path_matches_cpu_path(folder, train):
    prep = Preprocessing(image_size=32)
    cpu, gpu = both_paths(folder, prep, train)
    rows = rows_by_name(folder)
    items = [gpu[(i, 3)] for i in range(len(gpu))]
    batch = gpu_decode.collate(items)
    assert [reason for row, reason in batch.failures if row == rows["corrupt.jpg"]], batch.failures
    kinds = {folder.files[item[3]].rsplit("/", 1)[-1]: item[1] is not None for item in items if item[0] is not None}
    assert kinds == {"small.jpg": True, "imagenet.jpg": True, "photo.jpg": True, "rotated.jpg": True,
                     "grey.jpg": True, "cmyk.jpg": False, "lossless.png": False}
    images = decode_batch(batch, CPU)
    assert images.dtype == torch.uint8 and images.shape == (7, 3, 32, 32)
    for image, row in zip(images, batch.rows):
        name = folder.files[row].rsplit("/", 1)[-1]
        expected = cpu[(row, 3)][0]
        # the CPU path decodes JPEG drafts (1/2, 1/4 scale)
        limit = 0.0 if name in ("cmyk.jpg", "lossless.png") else 5.0
        diff = (image.float() - expected.float()).abs().mean().item()
        if not train:  # the CPU path decoding at full scale (no draft): the same pixels
            whole = ImageDataset(cpu.directory, cpu.targets, cpu.transform, None, cpu.seed)[row][0]
            assert (image.float() - whole.float()).abs().mean() <= 0.05, name
        if train and name not in ("cmyk.jpg", "lossless.png"):  # another epoch's crop is far off: the check bites
            other = (image.float() - cpu[(row, 4)][0].float()).abs().mean().item()
            assert other > 3, (name, other)
        assert diff <= limit, (name, diff)


def test_a_file_for_the_cpu_path_is_read_once(folder, monkeypatch):
    """PNG and CMYK go the CPU path in the worker on the bytes the header check read: no second open."""
    cpu, gpu = both_paths(folder, Preprocessing(image_size=32), train=True)
    rows = rows_by_name(folder)
    opened = []
    open_input = preprocessing.open_input
    monkeypatch.setattr(preprocessing, "open_input", lambda path, **kw: opened.append(path) or open_input(path, **kw))
    for name in ("lossless.png", "cmyk.jpg"):
        image, plan, _, _, failure = gpu[(rows[name], 3)]
        assert plan is None and failure is None and image.shape == (3, 32, 32)
    assert opened == []
    monkeypatch.undo()
    for name in ("lossless.png", "cmyk.jpg"):
        assert torch.equal(gpu[(rows[name], 3)][0], cpu[(rows[name], 3)][0])  # the CPU path's pixels


def test_crops_follow_the_epoch_and_rotation_keeps_its_shape(folder):
    prep = Preprocessing(image_size=32)
    _, gpu = both_paths(folder, prep, train=True)
    row = rows_by_name(folder)["rotated.jpg"]
    plans = {gpu[(row, epoch)][1] for epoch in range(6)}
    assert len({plan.box for plan in plans}) > 1 and len({plan.flip for plan in plans}) == 2
    plan = next(iter(plans))
    assert (plan.height, plan.width, plan.orientation) == (300, 200, 6)  # oriented: portrait
    assert all(p.box[0] + p.box[2] <= 300 and p.box[1] + p.box[3] <= 200 for p in plans)


def test_big_photos_are_decoded_in_chunks_with_the_same_result(folder, monkeypatch):
    prep = Preprocessing(image_size=32)
    _, gpu = both_paths(folder, prep, train=False)
    whole = decode_batch(gpu_decode.collate([gpu[i] for i in range(len(gpu))]), CPU)
    calls = []
    real = gpu_decode.decode_jpeg
    monkeypatch.setattr(gpu_decode, "DECODE_PIXELS_PER_CHUNK", 200_000)
    monkeypatch.setattr(gpu_decode, "decode_jpeg", lambda data, **kw: calls.append(len(data)) or real(data, **kw))
    chunked = decode_batch(gpu_decode.collate([gpu[i] for i in range(len(gpu))]), CPU)
    assert torch.equal(whole, chunked)
    assert len(calls) >= 3 and sum(calls) == 5, calls  # the 1600x1200 photo alone, the others grouped


def test_a_jpeg_the_decoder_refuses_goes_to_pil_then_fails_by_name(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    good = tmp_path / "a" / "good.jpg"
    photo(200, 150, 1).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "a" / "truncated.jpg").write_bytes(data[: len(data) // 2])  # PIL decodes it, grey bottom
    (tmp_path / "a" / "garbage.jpg").write_bytes(data[:400] + bytes(range(256)) * 40)  # header fine, data not
    directory = load_image_directory(tmp_path, "Training")
    prep = Preprocessing(image_size=32)
    cpu, gpu = both_paths(directory, prep, train=False)
    batch = gpu_decode.collate([gpu[i] for i in range(len(gpu))])
    assert not batch.failures and len(batch) == 3
    on_host = []
    real = gpu_decode._decode_on_host
    monkeypatch.setattr(gpu_decode, "_decode_on_host", lambda data, plan: on_host.append(plan) or real(data, plan))
    images = decode_batch(batch, CPU)
    assert on_host, "the decoder accepted every file: the fallback went untested"
    names = [directory.files[row].rsplit("/", 1)[-1] for row in batch.rows]
    assert len(images) == len(batch.targets) == len(names)
    for image, row in zip(images, batch.rows):
        assert (image.float() - cpu[row][0].float()).abs().mean() <= 4.0  # draft scale 1/4 on the CPU path
    failed = {directory.files[row].rsplit("/", 1)[-1]: reason for row, reason in batch.failures}
    assert sorted(names) == ["good.jpg", "truncated.jpg"] and list(failed) == ["garbage.jpg"]
    assert "cannot" in failed["garbage.jpg"]


def test_bounds_refuse_before_decoding(folder, monkeypatch, tmp_path):
    prep = Preprocessing(image_size=32)
    _, gpu = both_paths(folder, prep, train=True)
    row = rows_by_name(folder)["imagenet.jpg"]
    monkeypatch.setattr(preprocessing, "MAX_IMAGE_PIXELS", 100_000)  # the CPU path's own bounds, shared
    assert "more than 100000 pixels (decompression-bomb guard)" in gpu[row][4]
    monkeypatch.setattr(preprocessing, "MAX_IMAGE_FILE_BYTES", 1000)
    assert "more than the 1000 allowed" in gpu[row][4]
    with pytest.raises(gpu_decode.ImageDecodeError, match="not a regular file"):
        gpu_decode._header(tmp_path)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    photo(40, 30, 1).save(tmp_path / "outside.jpg")
    photo(40, 30, 2).save(tmp_path / "data" / "a" / "inside.jpg")
    (tmp_path / "data" / "a" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    directory = load_image_directory(tmp_path / "data", "Training")
    _, gpu = both_paths(directory, Preprocessing(image_size=32), train=True)
    failures = [gpu[i][4] for i in range(len(gpu)) if directory.files[i].endswith("link.jpg")]
    assert failures and "outside the input folder" in failures[0]


def test_eval_plan_is_the_cpu_recipe():
    prep = Preprocessing(image_size=32)
    image = torch.from_numpy(np.array(photo(120, 80, 3))).permute(2, 0, 1)
    plan = Plan(1, 80, 120, None, False, 32, prep.resize_size)
    expected = prep.eval_transform()(decode_image(_png_bytes(photo(120, 80, 3))))
    assert (gpu_decode._crop_resize(image, plan).float() - expected.float()).abs().mean() < 1.0


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_training_steps_through_the_device_path(folder):
    """Worker process -> GpuBatch -> decode_batch -> normalise -> a real model step, twice."""
    prep = Preprocessing(image_size=32)
    _, gpu = both_paths(folder, prep, train=True)
    sampler = EpochTaggedSampler(torch.utils.data.RandomSampler(range(len(gpu)), generator=torch.Generator()))
    loader = DataLoader(gpu, batch_size=4, sampler=sampler, collate_fn=gpu_decode.collate, num_workers=1)
    torch.manual_seed(0)
    model = Classifier(build_net("resnet18", 2))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen, failures = 0, []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            images = decode_batch(batch, CPU)
            failures += batch.failures
            if len(batch) < 2:
                continue
            loss = F.cross_entropy(model(prep.normalize(images)), batch.targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)
            seen += len(batch)
    assert seen == 14 and {reason for _, reason in failures} and len(failures) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- what travels from the workers, and a decoder that refuses (issue 22, items 2-4) -------------------------------


def test_a_batch_crosses_from_workers_as_three_tensors_whatever_its_size(folder):
    """One shared-memory handle per tensor: the JPEGs' bytes packed end to end, the decoded rows, the targets."""
    prep = Preprocessing(image_size=32)
    _, gpu = both_paths(folder, prep, train=True)
    for batch_size in (2, 8):
        sampler = EpochTaggedSampler(torch.utils.data.SequentialSampler(range(len(gpu))))
        loader = DataLoader(gpu, batch_size=batch_size, sampler=sampler, collate_fn=gpu_decode.collate, num_workers=1)
        batches = list(loader)
        for batch in batches:
            tensors = [value for value in vars(batch).values() if isinstance(value, torch.Tensor)]
            assert len(tensors) == 3 and all(t.is_shared() or not t.numel() for t in tensors)
            assert not any(isinstance(v, torch.Tensor) for plan in batch.plans for v in vars(plan).values())
            for i, row in enumerate(batch.rows[:len(batch.plans)]):  # the round trip: each file's bytes, intact
                assert bytes(batch.jpeg(i).numpy()) == (folder.root / folder.files[row]).read_bytes()
        assert sum(len(b.plans) for b in batches) == 5 and sum(len(b.decoded) for b in batches) == 2
    images = gpu_decode.decode_batch(batches[0], CPU)
    assert images.shape == (len(batches[0].rows), 3, 32, 32)
    assert sorted(batches[0].rows) == sorted(set(range(len(gpu))) - {row for row, _ in batches[0].failures})


def refusing_decoder(monkeypatch, refuse=lambda data: True):
    """torchvision's decode_jpeg, refusing any call that includes a JPEG `refuse` picks; returns the calls' sizes."""
    calls, real = [], gpu_decode.decode_jpeg

    def decode(datas, **kwargs):
        calls.append(len(datas))
        if any(refuse(d) for d in datas):
            raise RuntimeError("nvjpegDecodeBatched failed: 6 (simulated)")
        return real(datas, **kwargs)
    monkeypatch.setattr(gpu_decode, "decode_jpeg", decode)
    return calls


def jpeg_folder(tmp_path, count: int):
    (tmp_path / "j" / "a").mkdir(parents=True)
    for n in range(count):
        photo(60 + n, 45, n).save(tmp_path / "j" / "a" / f"{n}.jpg", quality=90)
    return load_image_directory(tmp_path / "j", "Training")


def test_a_refusing_device_decoder_is_counted_warned_once_and_never_retried_image_by_image(tmp_path, monkeypatch,
                                                                                           caplog):
    directory = jpeg_folder(tmp_path, 8)
    _, gpu = both_paths(directory, Preprocessing(image_size=32), train=False)
    expected = decode_batch(gpu_decode.collate([gpu[i] for i in range(8)]), CPU)
    calls = refusing_decoder(monkeypatch)
    decoder = gpu_decode.DeviceDecoder(CPU)
    with caplog.at_level("WARNING", logger="train_pytorch_model.gpu_decode"):
        for _ in range(2):
            batch = gpu_decode.collate([gpu[i] for i in range(8)])
            images, targets = decoder.decode(batch)
            # PIL decodes them all: the same images (the CPU path's full-scale decode), nothing dropped
            assert len(targets) == 8 and not batch.failures
            assert (images.float() - expected.float()).abs().mean() < 0.5
    assert decoder.fallbacks == 16
    assert calls == [8, 4, 2, 1, 1] * 2, calls  # per batch log2(8) + 2 refused calls, then PIL: not 8 + 7 calls
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "decode_fallbacks" in warnings[0].getMessage() and "simulated" in \
        warnings[0].getMessage()


def test_one_refused_jpeg_is_found_by_halves_and_the_others_stay_on_the_device(tmp_path, monkeypatch):
    directory = jpeg_folder(tmp_path, 8)
    _, gpu = both_paths(directory, Preprocessing(image_size=32), train=False)
    batch = gpu_decode.collate([gpu[i] for i in range(8)])
    refused = bytes(batch.jpeg(5).numpy())
    calls = refusing_decoder(monkeypatch, lambda data: bytes(data.numpy()) == refused)
    decoder = gpu_decode.DeviceDecoder(CPU)
    images, targets = decoder.decode(batch)
    assert len(images) == 8 and decoder.fallbacks == 1
    assert calls == [8, 4, 4, 2, 1, 1, 2], calls  # refused: 8, 4, 2, 1 (the halves holding it)


def test_prefetch_is_sized_by_the_bytes_that_travel(tmp_path, monkeypatch):
    """Decoded 32 px images for the CPU path; the (much bigger) JPEG files for --decode gpu."""
    from train_pytorch_model import data

    (tmp_path / "p" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in range(4):  # noise compresses badly: ~1 MB files, as photos are
        Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(tmp_path / "p" / "a" / f"{n}.jpg",
                                                                                  quality=95)
    directory = load_image_directory(tmp_path / "p", "Training")
    cpu, gpu = both_paths(directory, Preprocessing(image_size=32), train=True)
    mean_file = sum((directory.root / name).stat().st_size for name in directory.files) / 4
    assert gpu.item_bytes == round(mean_file) and mean_file > 500_000
    assert cpu.item_bytes == 3 * cpu.size_hint ** 2 < 20_000
    sized = []
    monkeypatch.setattr(data, "prefetch_factor", lambda workers, batch_bytes, *a: sized.append(batch_bytes) or 2)
    for dataset in (cpu, gpu):
        data.make_loader(dataset, EpochTaggedSampler(torch.utils.data.SequentialSampler(range(4))), batch_size=4,
                         drop_last=False, num_workers=1, device=CPU)
    assert sized == [4 * cpu.item_bytes, 4 * gpu.item_bytes]
    # 16 workers, batch 256 of such files, a 32 GiB /dev/shm: fewer batches ahead than decoded pixels would allow
    assert data.prefetch_factor(16, 256 * gpu.item_bytes) <= data.prefetch_factor(16, 256 * cpu.item_bytes)


def hazard_script():
    """benchmarks/nvjpeg_hazard.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "nvjpeg_hazard.py"
    spec = importlib.util.spec_from_file_location("nvjpeg_hazard", path)
    hazard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hazard)
    return hazard


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_device_decode_never_writes_into_memory_the_training_stream_still_reads():
    """benchmarks/nvjpeg_hazard.py's pattern: with our decoder, no queued reduction sees a changed tensor."""
    hazard = hazard_script()
    result = hazard.run(iterations=50, mode="side-stream")
    assert result["corrupted"] == 0, result


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run is the test above")
def test_the_hazard_script_says_plainly_that_there_is_nothing_to_check_without_cuda(capsys):
    hazard = hazard_script()
    assert hazard.main(["--iterations", "1"]) == 0
    assert "no CUDA device here, nothing to check" in capsys.readouterr().out


def test_multilabel_targets_travel_with_their_rows_through_the_device_path(folder):
    """`--decode gpu` packs JPEGs and CPU-decoded rows apart: each row's multi-hot target must stay with it."""
    from train_pytorch_model.tables import write_mltable

    rows = [(name, [["x"], ["y"], ["x", "y"], []][i % 4]) for i, name in enumerate(folder.files)]
    write_mltable(folder.root, iter(rows))
    directory = load_image_directory(folder.root / "MLTable", "Training")
    assert directory.is_multilabel
    gpu = build_gpu_dataset(directory, {"x": 0, "y": 1}, Preprocessing(image_size=32), train=False, seed=7)
    batch = gpu_decode.collate([gpu[i] for i in range(len(gpu))])
    decode_batch(batch, CPU)  # rows the decoder cannot read leave `rows` and `targets` together
    assert batch.targets.dtype == torch.float32 and batch.targets.shape == (len(batch.rows), 2)
    for target, row in zip(batch.targets.tolist(), batch.rows):
        assert target == [float("x" in rows[row][1]), float("y" in rows[row][1])], folder.files[row]
