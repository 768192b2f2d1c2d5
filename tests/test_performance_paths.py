"""The GPU speed features, exercised on CPU (issue 7): mixed precision, loss scaling, channels_last,
torch.compile, precision and worker-count rules, the loader settings, and the per-image decode path.

No timing is asserted here; speed is measured by benchmarks/benchmark_training.py.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from train_pytorch_model.cli import main
from train_pytorch_model.config import TrainConfig, add_arguments
from train_pytorch_model.data import Batch, build_dataset, collate, cpus_per_process, default_num_workers, make_loader
from train_pytorch_model.distributed import Context
from train_pytorch_model.errors import InvalidParameterError
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.models import Classifier
from train_pytorch_model.preprocessing import Preprocessing, decode_image
from train_pytorch_model.train import Trainer, autocast, can_compile, make_optimizer, make_scaler
from train_pytorch_model.train_command import build_model, resolve_precision, settle

CPU = torch.device("cpu")


def tiny_net(num_classes: int = 3, conv_bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def parse_train_args(*extra: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--untrained-model", "m", "--training-data", "t", "--validation-data", "v",
                              "--trained-model", "o", *extra])


def run_train(resnet18_dir, data, out, *extra: str) -> list[dict]:
    code = main(["train", "--untrained-model", str(resnet18_dir), "--training-data", str(data),
                 "--validation-data", str(data), "--trained-model", str(out), "--image-size", "32",
                 "--batch-size", "4", "--epochs", "1", "--num-workers", "0", *extra])
    assert code == 0
    with open(out / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


# --- precision -------------------------------------------------------------------------------------------------


def test_auto_precision_is_fp32_on_cpu_and_explicit_choices_pass_through():
    assert resolve_precision("auto", CPU) == "fp32"
    for choice in ("fp32", "bf16", "fp16"):
        assert resolve_precision(choice, CPU) == choice


def test_auto_precision_on_gpu_follows_bf16_support(monkeypatch):
    # No GPU here: the capability query is the one thing replaced.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"


def settled(untrained, *flags: str) -> TrainConfig:
    model, spec = build_model(untrained, 2)
    return settle(TrainConfig.from_args(parse_train_args(*flags)), Context(CPU), spec, model, 100)[0]


def test_settle_decides_the_speed_switches_for_cpu(resnet18_dir):
    resolved = lambda *flags: settled(resnet18_dir, *flags)
    config = resolved()
    assert (config.precision, config.channels_last, config.compile, config.device) == ("fp32", False, False, "cpu")
    config = resolved("--precision", "bf16", "--channels-last", "true", "--compile", "true")
    assert (config.precision, config.channels_last, config.compile) == ("bf16", True, True)
    with pytest.raises(InvalidParameterError, match="fp16 needs a GPU"):
        resolved("--precision", "fp16")


def test_bf16_autocast_training_step_on_cpu():
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    with autocast(CPU, "bf16"):
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
    assert logits.dtype == torch.bfloat16  # the matmuls ran in bf16 ...
    loss.backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ... the weights stay fp32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with autocast(CPU, "fp32"):
        assert model(images).dtype == torch.float32


@pytest.mark.slow
def test_train_command_runs_bf16_and_channels_last_on_cpu(tmp_path, make_image_folder, resnet18_dir):
    data = make_image_folder("data", {"a": 4, "b": 4})
    rows = run_train(resnet18_dir, data, tmp_path / "out", "--precision", "bf16", "--channels-last", "true",
                     "--device", "cpu")
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0
    info = json.loads((tmp_path / "out" / "training_info.json").read_text())["training"]
    assert info["precision"] == "bf16" and info["channels_last"] is True


# --- loss scaling -------------------------------------------------------------------------------------------------


def test_grad_scaler_is_enabled_for_fp16_only():
    assert make_scaler(CPU, "fp16").is_enabled()
    assert not make_scaler(CPU, "bf16").is_enabled()
    assert not make_scaler(CPU, "fp32").is_enabled()


def test_disabled_scaler_is_a_plain_step():
    model = tiny_net()
    scaler = make_scaler(CPU, "fp32")
    loss = F.cross_entropy(model(torch.rand(2, 3, 8, 8)), torch.tensor([0, 1]))
    assert scaler.scale(loss) is loss


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_enabled_scaler_skips_steps_with_overflowing_gradients_and_lowers_its_scale(name):
    # What fp16 on a GPU relies on, run with a CPU scaler and train's (fused) optimizers: an inf gradient must
    # not reach the weights.
    model = tiny_net()
    optimizer = make_optimizer(model, TrainConfig(optimizer=name), 0.1, CPU)
    scaler = make_scaler(CPU, "fp16")
    images, targets = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])

    loss = F.cross_entropy(model(images), targets)
    start_scale = scaler.get_scale()
    scaler.scale(loss).backward()
    assert model[0].weight.grad.abs().max() > 0
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < start_scale

    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(model(images), targets)).backward()
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("frozen", [0, 2])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers_are_fused_on_cpu_and_step_as_torchs_default_implementation(name, frozen):
    # Fused: one kernel over all parameters, a fifth of the default (foreach) time on a CPU (docs/performance.md).
    config = TrainConfig(optimizer=name, freeze_backbone_epochs=frozen)
    # No bias before the BatchNorm (as in every real network): its gradient is rounding noise around 0, which
    # Adam's g / sqrt(v) turns into full-size steps of either sign, so the two implementations part by ~lr.
    fused_model, default_model = tiny_net(conv_bias=False), tiny_net(conv_bias=False)
    fused = make_optimizer(Classifier(fused_model), config, 0.05, CPU)
    default = make_optimizer(Classifier(default_model), config, 0.05, torch.device("meta"))  # another device: default
    assert fused.defaults["fused"] is True and not default.defaults["fused"]
    assert len(fused.param_groups) == (2 if frozen else 1)
    images, targets = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    for _ in range(2):  # (more steps of Adam amplify rounding where a gradient is near 0)
        for model, optimizer in ((fused_model, fused), (default_model, default)):
            optimizer.zero_grad()
            F.cross_entropy(model(images), targets).backward()
            optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(tiny_net(conv_bias=False).parameters(),
                                                     fused_model.parameters()))
    for a, b in zip(fused_model.parameters(), default_model.parameters()):
        torch.testing.assert_close(a, b)


# --- channels_last ------------------------------------------------------------------------------------------------


def test_channels_last_forward_and_backward_match_contiguous():
    torch.manual_seed(0)
    reference = Classifier(torchvision.models.resnet18(num_classes=3))
    nhwc = Classifier(torchvision.models.resnet18(num_classes=3))
    nhwc.load_state_dict(reference.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)
    images, targets = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])

    logits = reference(images)
    F.cross_entropy(logits, targets).backward()
    nhwc_images = images.contiguous(memory_format=torch.channels_last)
    nhwc_logits = nhwc(nhwc_images)
    F.cross_entropy(nhwc_logits, targets).backward()

    assert nhwc.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc_logits, logits, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(reference.named_parameters(), nhwc.parameters()):
        # Another summation order: equal up to float32 rounding, relative to each gradient's scale.
        assert (b.grad - a.grad).abs().max() <= 1e-3 * a.grad.abs().max(), name


def test_trainer_hands_the_model_normalised_batches_in_its_memory_format():
    prep = Preprocessing(image_size=32)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    batch = Batch(images, torch.tensor([0, 1]), [])
    for channels_last, memory_format in ((True, torch.channels_last), (False, torch.contiguous_format)):
        trainer = Trainer(Context(CPU), TrainConfig(channels_last=channels_last), prep, 2, None, None, None, None)
        moved, targets = trainer.to_device(batch)
        assert moved.dtype == torch.float32 and moved.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(moved, prep.normalize(images))
        assert torch.equal(targets, batch.targets)


# --- torch.compile ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_keeps_state_dict_keys_and_trains():
    # Real Inductor on a tiny model: the first call builds C++ kernels (tens of seconds on a cold cache).
    eager = tiny_net()
    model = tiny_net()
    assert can_compile(CPU) is True
    model.compile()
    assert list(model.state_dict()) == list(eager.state_dict())  # checkpoints and model files unchanged
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss = F.cross_entropy(model(images), targets)
    torch.testing.assert_close(loss, F.cross_entropy(eager(images), targets), rtol=1e-4, atol=1e-5)
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.inference_mode():
        assert model(images).shape == (4, 3)


@pytest.mark.slow
def test_compile_builds_one_graph_for_a_whole_run(tmp_path, make_image_folder, resnet18_dir, monkeypatch):
    """Two epochs with BatchNorm re-estimation, validation with a short last batch and a filler batch (a batch
    left with one image by an unreadable file): dynamo captures the training step once, nothing else. (Dynamo's
    eager backend: what is counted is the capture, whichever backend compiles it.)"""
    from torch._dynamo.utils import counters

    from train_pytorch_model import train_command

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager"))
    data = make_image_folder("data", {"a": 3, "b": 2})
    (data / "a" / "unreadable.png").write_bytes(b"not an image")  # 6 files, batch 2: one batch keeps one image
    ctx = Context(CPU)
    config = TrainConfig(untrained_model=resnet18_dir, training_data=data, validation_data=data,
                         trained_model=tmp_path / "o", image_size=32, batch_size=2, num_workers=0, epochs=2,
                         compile=True, max_bad_image_fraction=0.5, bn_recalibration=True)
    model, spec = train_command.build_model(resnet18_dir, 2)
    config, _ = settle(config, ctx, spec, model, 6)
    assert config.compile
    trainer = train_command.make_trainer(config, ctx, train_command.read_data(config, ctx), Preprocessing(32))
    state = train_command.make_training_state(model, config, ctx, len(trainer.train_loader))
    torch._dynamo.reset()
    counters.clear()
    shapes = []
    normalize = trainer.normalize  # every batch the model sees passes here, outside the compiled module
    monkeypatch.setattr(trainer, "normalize", lambda images: shapes.append(tuple(images.shape)) or normalize(images))
    trainer.fit(state, lambda *a, **k: None)
    assert len(set(shapes)) >= 2, set(shapes)  # validation: batches of 4 less the unreadable file, a short last one
    assert len(trainer.train_bad.bad) == 1
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_compile_without_a_cpp_compiler_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, caplog,
                                                                          resnet18_dir):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, clang++ or c++
    monkeypatch.delenv("CXX", raising=False)
    with caplog.at_level(logging.WARNING):
        assert can_compile(CPU) is False
        assert settled(resnet18_dir, "--compile", "true").compile is False
    assert "no C++ compiler" in caplog.text


def test_train_command_compile_flag_reaches_the_model(tmp_path, make_image_folder, resnet18_dir, monkeypatch):
    # The CLI path of --compile true, without paying for a resnet18 compile: no compiler -> eager + recorded.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    data = make_image_folder("data", {"a": 4, "b": 4})
    run_train(resnet18_dir, data, tmp_path / "out", "--compile", "true", "--device", "cpu")
    assert json.loads((tmp_path / "out" / "training_info.json").read_text())["training"]["compile"] is False


# --- workers and loaders ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cpus, device, local_world_size, expected", [
    # CPU training: decoding in the training process below 4 CPUs, then a worker per 4 CPUs.
    (1, "cpu", 1, 0), (2, "cpu", 1, 0), (3, "cpu", 1, 0), (4, "cpu", 1, 1), (16, "cpu", 1, 4), (16, "cpu", 2, 2),
    (8, "cpu", 8, 0),
    # GPU training: every CPU but the feeding one (no cap), shared by the GPUs' processes.
    (16, "cuda", 1, 15), (24, "cuda", 1, 23), (16, "cuda", 8, 1), (4, "cuda", 1, 3), (1, "cuda", 1, 1),
])
def test_default_worker_count_follows_the_cpus_available(monkeypatch, cpus, device, local_world_size, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert default_num_workers(torch.device(device), local_world_size) == expected


@pytest.mark.slow
def test_cpu_training_gives_decoding_workers_their_own_cores_and_restores_the_thread_count(
        tmp_path, make_image_folder, resnet18_dir):
    data = make_image_folder("data", {"a": 4, "b": 4})
    before = torch.get_num_threads()
    run_train(resnet18_dir, data, tmp_path / "w1", "--num-workers", "1", "--device", "cpu")
    info = json.loads((tmp_path / "w1" / "training_info.json").read_text())["training"]
    assert info["num_workers"] == 1 and info["cpu_threads"] == max(1, min(before, cpus_per_process() - 1))
    assert torch.get_num_threads() == before
    run_train(resnet18_dir, data, tmp_path / "w0", "--num-workers", "0", "--device", "cpu")
    info = json.loads((tmp_path / "w0" / "training_info.json").read_text())["training"]
    assert info["num_workers"] == 0 and info["cpu_threads"] == before  # decoding in-process: all threads


def test_gpu_loaders_pin_memory_and_keep_prefetching_workers(legacy_image_dir):
    directory = load_image_directory(legacy_image_dir)
    dataset = build_dataset(directory, {c: i for i, c in enumerate(directory.categories)}, Preprocessing(32),
                            train=False, seed=1)
    gpu = make_loader(dataset, None, batch_size=4, drop_last=False, num_workers=2, device=torch.device("cuda"))
    assert gpu.pin_memory and gpu.persistent_workers and gpu.prefetch_factor == 4 and gpu.num_workers == 2
    cpu = make_loader(dataset, None, batch_size=4, drop_last=False, num_workers=0, device=CPU)
    assert not cpu.pin_memory and not cpu.persistent_workers


def test_evaluation_runs_in_inference_mode(legacy_image_dir):
    directory = load_image_directory(legacy_image_dir)
    dataset = build_dataset(directory, {c: i for i, c in enumerate(directory.categories)}, Preprocessing(32),
                            train=False, seed=1)
    from train_pytorch_model.data import BadImageTracker, evaluation_loader

    loader = evaluation_loader(dataset, batch_size=8, rank=0, world_size=1, num_workers=0, device=CPU)
    model = Classifier(torchvision.models.resnet18(num_classes=3))
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((torch.is_inference_mode_enabled(), o.requires_grad)))
    trainer = Trainer(Context(CPU), TrainConfig(precision="fp32"), Preprocessing(32), 3, None, loader, None,
                      BadImageTracker(directory, "Validation", 0.05))
    result = trainer.evaluate(model)
    assert seen == [(True, False)] * 3  # 18 images in batches of 8
    assert not model.training and result.loss > 0 and 0 <= result.top1 <= 1


# --- the per-image path -------------------------------------------------------------------------------------------


def test_augmentation_is_a_function_of_seed_epoch_and_row_and_leaves_the_global_rng_alone(legacy_image_dir):
    directory = load_image_directory(legacy_image_dir)
    dataset = build_dataset(directory, {c: i for i, c in enumerate(directory.categories)}, Preprocessing(32),
                            train=True, seed=5)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = dataset[(4, 2)][0]
    assert torch.equal(torch.rand(3), expected_next)  # fork_rng: the caller's stream is untouched
    assert torch.equal(dataset[(4, 2)][0], first)
    epochs = [dataset[(4, epoch)][0] for epoch in range(6)]
    assert any(not torch.equal(e, epochs[0]) for e in epochs[1:])


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def test_decode_applies_exif_rotation_and_always_returns_rgb():
    wide = Image.new("RGB", (60, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    rotated = decode_image(jpeg_bytes(wide, exif=exif))
    assert rotated.size == (20, 60) and rotated.mode == "RGB"
    assert decode_image(jpeg_bytes(wide)).size == (60, 20)
    for mode in ("L", "P", "RGBA", "CMYK"):
        buffer = io.BytesIO()
        Image.new(mode, (10, 10)).save(buffer, "TIFF" if mode == "CMYK" else "PNG")
        assert decode_image(buffer.getvalue()).mode == "RGB", mode


def test_jpeg_draft_decodes_big_photos_at_a_reduced_scale_but_never_below_the_resize():
    photo = jpeg_bytes(Image.new("RGB", (800, 600), (10, 120, 200)))
    prep = Preprocessing(image_size=32)
    small = decode_image(photo, prep.resize_size)
    assert min(small.size) >= prep.resize_size and small.size[0] < 800
    assert prep.train_transform()(small).shape == (3, 32, 32)
    assert decode_image(photo).size == (800, 600)


def test_collated_batches_stay_uint8_until_the_device(legacy_image_dir):
    directory = load_image_directory(legacy_image_dir)
    dataset = build_dataset(directory, {c: i for i, c in enumerate(directory.categories)}, Preprocessing(32),
                            train=True, seed=1)
    batch = collate([dataset[(i, 0)] for i in range(4)])
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, 32, 32)
