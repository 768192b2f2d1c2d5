"""Training speed, measured against the compute ceiling (issue 7). One run, one generated dataset, one model.

    python benchmarks/benchmark_training.py                    # defaults: < 10 minutes on 2 CPU cores
    python benchmarks/benchmark_training.py --quick            # smoke run, about a minute
    python benchmarks/benchmark_training.py --model resnet50 --image-sizes 224 --batch-size 128   # on a GPU

What it measures, each in a fresh subprocess (so thread settings, caches and peak memory do not leak
between measurements), interleaved over `--repeats` rounds so background load hits all of them alike:

- ceiling:  forward + backward + optimizer step on one uint8 batch already in memory (the same model,
            optimizer, precision and normalisation as training): what the hardware can do at best.
- train:    the real thing: `python -m train_pytorch_model train` (cli.main, in-process) on image files on
            disk; images/s of every epoch after the first, read from the run's metrics.csv (process start,
            index building, worker start-up and model writing excluded).
- baseline: a loop shaped like the original module: PIL decode + resize + ToTensor + Normalize in the main
            process, no workers, no overlap, fp32.
- eval:     validation throughput through Trainer.evaluate vs an in-memory inference ceiling.
- workers:  `train` with --num-workers 0, 1, 2, ... (the data behind default_num_workers).
- index:    load_image_directory on generated images.lst files of 100k and 1M rows: seconds and memory.
- memory:   peak memory of `train` at 2k vs 20k rows (the 20k-row images.lst repeats the generated files).
- fixture:  `train` on the legacy fixture ImageDirectory (a compatibility check; too small to time).

Results: <out>/benchmark.json and <out>/benchmark.md (a markdown table). Timing is never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "examples"
CLASSES = [f"class{k}" for k in range(10)]


# --- dataset -------------------------------------------------------------------------------------------------


def synthetic_photo(rng, width: int, height: int, label: int):
    """A photo-like image: smooth colour field, a class-coloured shape with edges, mild sensor noise.

    (Pure noise would make JPEG decoding unrealistically slow; flat colour unrealistically fast.)
    """
    import numpy as np
    from PIL import Image, ImageDraw

    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    x1, y1 = x0 + rng.integers(width // 4, width // 2 + 1), y0 + rng.integers(height // 4, height // 2 + 1)
    hue = int(255 * label / len(CLASSES))
    colour = Image.new("HSV", (1, 1), (hue, 220, 230)).convert("RGB").getpixel((0, 0))
    (draw.ellipse if label % 2 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_dataset(root: Path, count: int, seed: int, min_side: int, max_side: int, png_fraction: float) -> dict:
    """An ImageFolder tree `<class>/<n>.jpg|png` of `count` images: long side log-uniform in [min_side, max_side],
    aspect 3:4 to 4:3, JPEG quality 85-95 or PNG. Reused when a manifest with the same recipe exists."""
    import numpy as np

    recipe = {"count": count, "seed": seed, "min_side": min_side, "max_side": max_side, "png_fraction": png_fraction,
              "version": 1}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("recipe") == recipe:
        return json.loads(manifest.read_text())
    if root.exists():  # another recipe's images would stay in the ImageFolder tree
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    files, total_bytes, pixels = [], 0, 0
    for n in range(count):
        label = n % len(CLASSES)
        long_side = int(round(math.exp(rng.uniform(math.log(min_side), math.log(max_side)))))
        aspect = rng.uniform(0.75, 1.0)
        short_side = max(8, int(long_side * aspect))
        width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        image = synthetic_photo(rng, width, height, label)
        png = rng.random() < png_fraction
        path = root / CLASSES[label] / f"{n:06d}.{'png' if png else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if png:
            image.save(path, "PNG")
        else:
            image.save(path, "JPEG", quality=int(rng.integers(85, 96)))
        files.append(path.relative_to(root).as_posix())
        total_bytes += path.stat().st_size
        pixels += width * height
    summary = {"recipe": recipe, "images": count, "megabytes": round(total_bytes / 1e6, 1),
               "mean_megapixels": round(pixels / count / 1e6, 3), "png_fraction": png_fraction,
               "sides": f"{min_side}-{max_side} px", "files": files}
    manifest.write_text(json.dumps(summary))
    return summary


def write_image_list(root: Path, rows: int, files: list[str] | None, image_root: Path | None = None) -> Path:
    """A meta-route ImageDirectory (`_meta.yaml`, `_schema.json`, `images.lst`) with `rows` rows.

    With `files`, rows cycle through them (hard links into `image_root`, so a 20k-row dataset needs no 20k
    image files; symlinks would be refused as leaving the folder); without, rows name files that do not exist
    (enough for indexing)."""
    sys.path.insert(0, str(REPO / "src"))
    from train_pytorch_model.image_directory import default_schema

    root.mkdir(parents=True, exist_ok=True)
    (root / "_meta.yaml").write_text("type: ImageDirectory\nimage_list: images.lst\nschema: _schema.json\n")
    (root / "_schema.json").write_text(json.dumps(default_schema(CLASSES)))
    for name in files or []:
        link = root / "image" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(image_root / name, link)
        except OSError:  # no hard links on this file system
            shutil.copyfile(image_root / name, link)
    with open(root / "images.lst", "w", encoding="utf-8") as handle:
        for n in range(rows):
            if files:
                name = files[n % len(files)]
                label = name.split("/", 1)[0]
            else:
                name, label = f"{CLASSES[n % 10]}/{n:07d}.jpg", CLASSES[n % 10]
            handle.write(json.dumps({"image_info": {"file_name": f"image/{name}"}, "category": label, "id": n}) + "\n")
    return root


# --- measurements (each runs in its own subprocess: `--measure KIND`) ----------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    forking parent through exec, which would charge the benchmark driver's memory to every measurement."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20), 1)


def peak_memory() -> dict:
    """Peak resident memory (MiB) of this process and of its largest child (a DataLoader worker; its RSS
    counts the pages it shares with the main process, so the two do not add up)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024 / 1024
    out = {"main_peak_mib": peak_rss_mib(),
           "worker_peak_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale, 1)}
    import torch

    if torch.cuda.is_available():
        out["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def make_model_and_step(spec: dict, device):
    """Model, optimizer, precision and one training step exactly as train_command/train.py set them up."""
    import torch
    import torch.nn.functional as F

    from train_pytorch_model.config import TrainConfig
    from train_pytorch_model.models import Classifier, build_net
    from train_pytorch_model.preprocessing import Preprocessing
    from train_pytorch_model.train import autocast, make_optimizer
    from train_pytorch_model.train_command import resolve_precision

    torch.manual_seed(0)
    precision = resolve_precision(spec.get("precision", "auto"), device)
    channels_last = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train_command.configure_torch: the ceiling is like for like
    model = Classifier(build_net(spec["model"], len(CLASSES))).to(device, memory_format=memory_format)
    if spec.get("compile"):
        model.compile()
    config = TrainConfig(learning_rate=0.001, precision=precision)
    optimizer = make_optimizer(model, config, config.learning_rate, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    prep = Preprocessing(image_size=spec["image_size"])

    def step(images_uint8, targets):
        images = prep.normalize(images_uint8.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        with autocast(device, precision):
            loss = F.cross_entropy(model(images), targets.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return model, step, prep, precision, memory_format


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceiling(spec: dict) -> dict:
    """Images/s of training steps on one in-memory batch, timed over as many steps as an epoch has."""
    import torch

    from train_pytorch_model.distributed import pick_device

    device = pick_device(spec.get("device", "auto"))
    model, step, _, precision, _ = make_model_and_step(spec, device)
    model.train()
    size, batch = spec["image_size"], spec["batch_size"]
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    targets = torch.randint(0, len(CLASSES), (batch,))
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    for _ in range(spec.get("warmup_steps", 5)):
        step(images, targets)
    sync(device)
    steps = max(5, spec["steps_per_epoch"])
    rates = []
    for _ in range(spec["timed_epochs"]):
        start, done = time.perf_counter(), 0
        while done < steps and time.perf_counter() - start < spec.get("max_seconds", math.inf):
            step(images, targets)
            done += 1
        sync(device)
        rates.append(done * batch / (time.perf_counter() - start))
    return {"images_per_second": statistics.median(rates), "epochs": rates, "precision": precision, "timed_steps": done,
            "threads": torch.get_num_threads(), "device": str(device), **peak_memory()}


def measure_eval_ceiling(spec: dict) -> dict:
    """Images/s of inference (inference_mode, eval batch = 2x training batch) on one in-memory batch."""
    import torch

    from train_pytorch_model.distributed import pick_device
    from train_pytorch_model.train import autocast

    device = pick_device(spec.get("device", "auto"))
    model, _, prep, precision, memory_format = make_model_and_step(spec, device)
    model.eval()
    size, batch = spec["image_size"], 2 * spec["batch_size"]
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    steps = max(5, spec["valid_images"] // batch)
    rates = []
    with torch.inference_mode():
        for round_ in range(spec["timed_epochs"] + 1):
            start = time.perf_counter()
            for _ in range(steps):
                with autocast(device, precision):
                    model(prep.normalize(images.to(device)).contiguous(memory_format=memory_format)).float().argmax(1)
            sync(device)
            if round_:
                rates.append(steps * batch / (time.perf_counter() - start))
    return {"images_per_second": statistics.median(rates), "epochs": rates, **peak_memory()}


def train_argv(spec: dict, out: Path) -> list[str]:
    return [
        "train", "--untrained-model", spec["untrained_model"], "--training-data", spec["train_dir"],
        "--validation-data", spec["valid_dir"], "--trained-model", str(out), "--epochs", str(spec["epochs"]),
        "--batch-size", str(spec["batch_size"]), "--image-size", str(spec["image_size"]), "--patience", "0",
        "--num-workers", str(spec.get("workers", "auto")), "--device", spec.get("device", "auto"),
        "--print-freq", "1000000", *(["--compile", "true"] if spec.get("compile") else []),
    ]


def measure_train(spec: dict) -> dict:
    """The CLI, in this process: images/s of each epoch after the first, from the run's metrics.csv."""
    from train_pytorch_model import cli

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        out = Path(tmp) / "trained"
        started = time.perf_counter()
        code = cli.main(train_argv(spec, out))
        wall = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"train exited with {code}")
        with open(out / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        training = json.loads((out / "training_info.json").read_text())["training"]
        settings = {k: training.get(k) for k in ("num_workers", "cpu_threads", "precision", "channels_last", "device")}
    timed = rows[1:] or rows  # the first epoch pays for worker start-up and warm caches
    rates = [float(r["train_images_per_second"]) for r in timed]
    waits = [float(r["data_wait_fraction"]) for r in timed]
    # Validation + bookkeeping time per epoch: the epoch's seconds minus its training time.
    seen = (spec["train_images"] // spec["batch_size"]) * spec["batch_size"]
    valid_seconds = [float(r["seconds"]) - seen / float(r["train_images_per_second"]) for r in timed]
    return {"images_per_second": statistics.median(rates), "epochs": rates,
            "data_wait_fraction": statistics.median(waits),
            "valid_images_per_second": spec["valid_images"] / max(statistics.median(valid_seconds), 1e-9),
            "wall_seconds": wall, **settings, **peak_memory()}


def measure_baseline(spec: dict) -> dict:
    """The original module's shape: decode/resize/ToTensor/Normalize in the main process, no workers, fp32."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from train_pytorch_model.distributed import pick_device
    from train_pytorch_model.models import Classifier, build_net

    device = pick_device(spec.get("device", "auto"))
    files = sorted(p for p in Path(spec["train_dir"]).rglob("*") if p.suffix in (".jpg", ".png"))
    labels = [CLASSES.index(p.parent.name) for p in files]
    size = spec["image_size"]
    # The original had no resize (images had to share a size); mixed sizes need one, so it resizes to a square.
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize([0.5] * 3, [0.5] * 3)])

    class Files(Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return transform(Image.open(files[i]).convert("RGB")), labels[i]

    torch.manual_seed(0)
    # The original: no workers below 10 CPUs, pinned memory with CUDA, fp32.
    loader = DataLoader(Files(), batch_size=spec["batch_size"], shuffle=True, drop_last=True, num_workers=0,
                        pin_memory=device.type == "cuda")
    model = Classifier(build_net(spec["model"], len(CLASSES))).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.train()
    rates = []
    for epoch in range(spec["epochs"]):
        seen, start = 0, time.perf_counter()
        for images, targets in loader:
            loss = F.cross_entropy(model(images.to(device)), targets.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(targets)
        sync(device)
        if epoch:  # as for `train`: the first epoch is warm-up
            rates.append(seen / (time.perf_counter() - start))
    return {"images_per_second": statistics.median(rates), "epochs": rates, **peak_memory()}


def measure_decode(spec: dict) -> dict:
    """Core-milliseconds per image of the data path alone (one process, one thread): the profile of what the
    CPU must do besides the model's math. CPU time, not wall time: it holds up on a busy machine. Each stage
    runs twice and the faster pass counts (the first pays for lazy initialisation and cold allocators)."""
    import torch

    from train_pytorch_model.data import build_dataset, collate
    from train_pytorch_model.image_directory import load_image_directory
    from train_pytorch_model.preprocessing import Preprocessing, decode_image

    torch.set_num_threads(1)
    directory = load_image_directory(spec["train_dir"], "Training")
    prep = Preprocessing(image_size=spec["image_size"])
    dataset = build_dataset(directory, {c: i for i, c in enumerate(CLASSES)}, prep, train=True, seed=1)
    rows = range(0, len(dataset), max(1, len(dataset) // spec.get("decode_images", 1000)))
    transform = prep.train_transform()
    batch = spec["batch_size"]
    clock = time.process_time
    timings: dict[str, float] = {}

    def timed(name: str, work):
        start = clock()
        result = work()
        timings[name] = min(timings.get(name, math.inf), clock() - start)
        return result

    for _ in range(2):
        timed("read_file", lambda: [directory.path(i).read_bytes() for i in rows])
        decoded, by_format = [], {".jpg": 0.0, ".png": 0.0}
        for i in rows:
            start = clock()
            decoded.append(decode_image(directory.path(i), prep.resize_size))
            by_format[directory.path(i).suffix] += clock() - start
        timings["decode"] = min(timings.get("decode", math.inf), sum(by_format.values()))
        for suffix, seconds in by_format.items():
            count = sum(directory.files[i].endswith(suffix) for i in rows)
            key = f"decode{suffix.replace('.', '_')}"
            if count:  # per image of that format
                timings[key] = min(timings.get(key, math.inf), seconds * len(rows) / count)
        tensors = timed("resize_augment", lambda decoded=decoded: [transform(image) for image in decoded])
        items = timed("dataset_item_total", lambda: [dataset[(i, 0)] for i in rows])
        timed("collate", lambda items=items: [collate(items[i:i + batch])
                                              for i in range(0, len(items) - batch + 1, batch)])
        timed("normalize", lambda tensors=tensors: [prep.normalize(torch.stack(tensors[i:i + batch]))
                                    for i in range(0, len(tensors) - batch + 1, batch)])
    result = {name: round(1000 * seconds / len(rows), 4) for name, seconds in timings.items()}
    return result | {"images": len(rows)}


def measure_index(spec: dict) -> dict:
    """Seconds and memory to index an images.lst of `rows` rows."""
    from train_pytorch_model.image_directory import load_image_directory

    before = peak_rss_mib()
    start = time.perf_counter()
    directory = load_image_directory(spec["index_dir"], "Training")
    seconds = time.perf_counter() - start
    return {"rows": len(directory), "seconds": seconds, "rows_per_second": len(directory) / seconds,
            "index_mib": round(peak_rss_mib() - before, 1), "bytes_per_row": round((peak_rss_mib() - before) * 2**20
            / len(directory)), **peak_memory()}




def run_measurement(kind: str, spec: dict, log_dir: Path, name: str, timeout: float | None = None) -> dict:
    """`kind` in a fresh interpreter; returns its JSON result (stderr goes to <out>/logs/<name>.log)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", kind, "--spec", json.dumps(spec)]
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=log_dir,
                              timeout=timeout)
    if done.returncode != 0:
        tail = (log_dir / f"{name}.log").read_text()[-2000:]
        raise RuntimeError(f"measurement {name} failed (exit {done.returncode}):\n{tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name:<28} {summary_line(result)}  ({time.perf_counter() - started:.0f}s)", flush=True)
    return result


def summary_line(result: dict) -> str:
    if "images_per_second" in result:
        return f"{result['images_per_second']:8.1f} img/s  main peak {result.get('main_peak_mib', 0):.0f} MiB"
    if "rows_per_second" in result:
        return f"{result['rows']} rows in {result['seconds']:.2f}s, index {result['index_mib']} MiB"
    return json.dumps(result)


# --- the throughput suite (issue 16): `--suite throughput`, on a GPU `--device cuda` -------------------------


def write_photo_chunk(job: tuple) -> list[tuple[str, int, int]]:
    """Worker of write_photos: images [start, stop) of one recipe (a seed per image: any split, same files)."""
    import numpy as np

    root, start, stop, seed, min_mp, max_mp, quality = job
    written = []
    for n in range(start, stop):
        rng = np.random.default_rng([seed, n])
        label = n % len(CLASSES)
        pixels = math.exp(rng.uniform(math.log(min_mp * 1e6), math.log(max_mp * 1e6)))
        aspect = rng.uniform(0.75, 1.0)  # 4:3 .. 1:1, landscape or portrait
        long_side, short_side = int(math.sqrt(pixels / aspect)), max(8, int(math.sqrt(pixels * aspect)))
        width, height = (long_side, short_side) if n % 3 else (short_side, long_side)
        path = Path(root) / CLASSES[label] / f"{n:06d}.jpg"
        synthetic_photo(rng, width, height, label).save(path, "JPEG", quality=quality)
        written.append((path.relative_to(root).as_posix(), path.stat().st_size, width * height))
    return written


def write_photos(root: Path, count: int, seed: int, min_mp: float, max_mp: float, quality: int = 90) -> dict:
    """An ImageFolder tree of `count` JPEGs of `min_mp`-`max_mp` megapixels, written by every CPU at once.
    Reused when a manifest with the same recipe exists."""
    from concurrent.futures import ProcessPoolExecutor

    recipe = {"count": count, "seed": seed, "min_mp": min_mp, "max_mp": max_mp, "quality": quality, "version": 1}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("recipe") == recipe:
        return json.loads(manifest.read_text())
    shutil.rmtree(root, ignore_errors=True)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    processes = max(1, len(os.sched_getaffinity(0)))
    bounds = [count * k // (4 * processes) for k in range(4 * processes + 1)]
    jobs = [(str(root), a, b, seed, min_mp, max_mp, quality) for a, b in itertools.pairwise(bounds) if b > a]
    with ProcessPoolExecutor(processes) as pool:
        rows = [row for chunk in pool.map(write_photo_chunk, jobs) for row in chunk]
    summary = {"recipe": recipe, "images": count, "megabytes": round(sum(r[1] for r in rows) / 1e6, 1),
               "mean_megapixels": round(sum(r[2] for r in rows) / count / 1e6, 3), "png_fraction": 0.0,
               "sides": f"{min_mp}-{max_mp} MP", "files": [r[0] for r in rows]}
    manifest.write_text(json.dumps(summary))
    return summary


def measure_supply(spec: dict) -> dict:
    """Loader-only images/s: the training DataLoader (CPU decode in `workers` processes, or the --decode gpu
    path: workers read bytes, the device decodes), batches moved to / decoded on the device, no model."""
    import torch
    from torch.utils.data import DataLoader

    from train_pytorch_model import data, gpu_decode
    from train_pytorch_model.distributed import pick_device
    from train_pytorch_model.image_directory import load_image_directory
    from train_pytorch_model.preprocessing import Preprocessing

    device = pick_device(spec.get("device", "auto"))
    directory = load_image_directory(spec["train_dir"], "Training")
    classes = {c: i for i, c in enumerate(directory.categories)}
    prep = Preprocessing(image_size=spec["image_size"])
    workers = int(spec["workers"]) if str(spec["workers"]).isdigit() else data.default_num_workers(device)
    if spec["decode"] == "gpu":
        dataset = gpu_decode.build_gpu_dataset(directory, classes, prep, train=True, seed=1)
        sampler = data.EpochTaggedSampler(torch.utils.data.RandomSampler(range(len(dataset))))
        loader = DataLoader(dataset, batch_size=spec["batch_size"], sampler=sampler, drop_last=True,
                            collate_fn=gpu_decode.collate, num_workers=workers, pin_memory=device.type == "cuda",
                            worker_init_fn=data._worker_init if workers else None,
                            prefetch_factor=4 if workers else None)

        def to_device(batch):
            return gpu_decode.decode_batch(batch, device)
    else:
        dataset = data.build_dataset(directory, classes, prep, train=True, seed=1)
        loader = data.training_loader(dataset, batch_size=spec["batch_size"], seed=1, rank=0, world_size=1,
                                      num_workers=workers, device=device)

        def to_device(batch):
            return batch.images.to(device, non_blocking=True)
    seen, start, batches = 0, None, iter(loader)
    for step, batch in enumerate(batches):
        if step == spec["warmup_steps"]:
            sync(device)
            start, seen = time.perf_counter(), 0
        to_device(batch)
        seen += len(batch)
        timed = step - spec["warmup_steps"]
        if start and (timed >= spec["steps"] or time.perf_counter() - start > spec["max_seconds"]):
            break
    if start is None:
        raise SystemExit(f"the dataset has no more than {spec['warmup_steps']} batches: nothing left to time")
    sync(device)
    elapsed = time.perf_counter() - start
    return {"images_per_second": seen / elapsed, "images": seen, "seconds": elapsed, "workers": workers,
            "decode": spec["decode"], **peak_memory()}


@contextlib.contextmanager
def restored(cls, originals: dict, logger, handler):
    """Undo measure_end_to_end's patches (it also runs inside tests)."""
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(cls, name, original)
        logger.removeHandler(handler)


def measure_end_to_end(spec: dict) -> dict:
    """The real `train` command over one epoch of warmup_steps + steps: images/s between the progress line at
    the end of the warm-up and the last one, and host syncs (Tensor.item/.tolist/.cpu calls) in between.
    Past max_seconds of timing the run is stopped with SIGTERM (the command's own clean stop)."""
    import logging
    import signal

    import torch

    from train_pytorch_model import cli

    calls = [0]
    # On a GPU only calls on device tensors wait for it; on the CPU, where nothing waits, the calls our own code
    # makes are counted (run with workers, so the augmentation's calls happen elsewhere; torch's CPU Adam reads
    # its step counters with .item(), the fused CUDA Adam does not).
    on_gpu = spec.get("device", "auto").startswith("cuda")
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "cpu")}
    for name, original in originals.items():
        def counted(self, *args, _original=original, **kwargs):
            ours = "train_pytorch_model" in sys._getframe(1).f_code.co_filename
            if (on_gpu and self.device.type != "cpu") or (not on_gpu and ours):
                calls[0] += 1
            return _original(self, *args, **kwargs)
        setattr(torch.Tensor, name, counted)
    progress = []  # (step, time, calls) of each progress line

    class Progress(logging.Handler):
        def emit(self, record):
            if isinstance(record.args, tuple) and len(record.args) >= 6 and "step" in str(record.msg):
                step = record.args[2]
                progress.append((step, time.perf_counter(), calls[0]))
                timed = [p for p in progress if p[0] >= spec["warmup_steps"]]
                if timed and progress[-1][1] - timed[0][1] > spec["max_seconds"]:
                    os.kill(os.getpid(), signal.SIGTERM)

    handler, logger = Progress(logging.INFO), logging.getLogger("train_pytorch_model")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp, restored(torch.Tensor, originals, logger, handler):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        argv = train_argv({**spec, "epochs": 1}, Path(tmp) / "trained")
        argv[argv.index("--print-freq") + 1] = str(spec["print_freq"])
        if spec.get("decode", "cpu") != "cpu":
            argv += ["--decode", spec["decode"]]
        code = cli.main(argv)
        stopped = code == 143
        if code not in (0, 143):
            raise SystemExit(f"train exited with {code}")
        info_file = Path(tmp) / "trained" / "training_info.json"
        training = json.loads(info_file.read_text())["training"] if info_file.is_file() else {}
    timed = [p for p in progress if p[0] >= spec["warmup_steps"]]
    if len(timed) < 2:
        raise SystemExit(f"too few progress lines after the warm-up: {progress}")
    (first, t0, c0), (last, t1, c1) = timed[0], timed[-1]
    print_steps = len(timed) - 1
    return {"images_per_second": (last - first) * spec["batch_size"] / (t1 - t0), "timed_steps": last - first,
            "stopped_by_time": stopped, "host_syncs": c1 - c0, "host_syncs_per_step": (c1 - c0) / (last - first),
            "host_syncs_per_print_step": (c1 - c0) / print_steps, "print_freq": spec["print_freq"],
            **{k: training.get(k) for k in ("num_workers", "precision", "channels_last", "device")},
            **peak_memory()}


MEASUREMENTS = {"ceiling": measure_ceiling, "eval_ceiling": measure_eval_ceiling, "train": measure_train,
                "baseline": measure_baseline, "decode": measure_decode, "index": measure_index,
                "supply": measure_supply, "end_to_end": measure_end_to_end}

def throughput_suite(args, out: Path) -> dict:
    """Ceilings, loader supply and end to end for each model / batch / dataset, most important first, each
    measurement capped by steps and seconds, the whole suite by --budget-seconds (what does not fit is listed
    as skipped). Returns the report; report["failed"] lists measurements that failed."""
    started = time.perf_counter()
    data, logs = out / "data", out / "logs"
    quick = args.quick
    print(f"Generating data in {data} with {len(os.sched_getaffinity(0))} processes ...", flush=True)
    kinds = {"imagenet": write_photos(data / "imagenet", 48 if quick else args.images, 1,
                                      0.002 if quick else 0.17, 0.003 if quick else 0.2),
             "photos": write_photos(data / "photos", 24 if quick else args.photo_images, 2,
                                    0.02 if quick else 3.0, 0.04 if quick else 12.0)}
    valid = write_photos(data / "valid", 16 if quick else 512, 3, 0.002 if quick else 0.17, 0.003 if quick else 0.2)
    print(f"  data ready ({time.perf_counter() - started:.0f}s)", flush=True)
    models = (args.model or ("resnet18" if quick else "resnet50,densenet121")).split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    size = int(args.image_sizes.split(",")[0])
    sys.path.insert(0, str(REPO / "src"))
    from train_pytorch_model.model_directory import ModelSpec, write_untrained_model_directory

    for model in models:
        if not (data / f"untrained_{model}" / "model_spec.yaml").is_file():
            write_untrained_model_directory(data / f"untrained_{model}", ModelSpec(model), None)
    warmup, steps, print_freq = (2, 4, 2) if quick else (30, 300, 30)
    cap = 5 if quick else args.max_seconds
    results, skipped, failed = [], [], []

    def e2e_rows(kind: str, batch: int) -> Path:
        """An images.lst of (warmup + steps) batches cycling the kind's files (hard links, no copies)."""
        root = data / f"lst_{kind}_{batch}"
        rows = (warmup + steps + 1) * batch
        listed = (root / "images.lst").read_bytes().count(b"\n") if (root / "images.lst").is_file() else -1
        if listed != rows:
            shutil.rmtree(root, ignore_errors=True)
            write_image_list(root, rows, kinds[kind]["files"], data / kind)
        return root

    def plan():
        """(name, kind, spec) in order of importance: the targets' measurements first."""
        first, rest = models[0], models[1:]
        big, small = batches[0], batches[1:]
        base = {"image_size": size, "device": args.device, "workers": 1 if quick else args.workers,
                "valid_dir": str(data / "valid"),
                "valid_images": valid["images"], "warmup_steps": warmup, "steps": steps, "max_seconds": cap,
                "timed_epochs": 1, "steps_per_epoch": steps, "print_freq": print_freq, "patience": 0}
        yield f"ceiling {first} b{big}", "ceiling", {**base, "model": first, "batch_size": big,
                                                   "max_seconds": cap / 2}
        for kind, decode in (("imagenet", "cpu"), ("photos", "cpu"), ("photos", "gpu"), ("imagenet", "gpu")):
            yield f"train {first} b{big} {kind} {decode}-decode", "end_to_end", {
                **base, "model": first, "batch_size": big, "decode": decode, "kind": kind}
        for kind in kinds:
            for decode in ("cpu", "gpu"):
                yield f"supply {kind} {decode}-decode b{big}", "supply", {
                    **base, "batch_size": big, "decode": decode, "train_dir": str(data / kind),
                    "steps": steps // 3, "max_seconds": cap / 3}
        if args.compile:
            yield f"ceiling {first} b{big} compiled", "ceiling", {**base, "model": first, "batch_size": big,
                                                                   "compile": True, "max_seconds": cap}
        for model in rest:
            yield f"ceiling {model} b{big}", "ceiling", {**base, "model": model, "batch_size": big,
                                                       "max_seconds": cap / 2}
            yield f"train {model} b{big} imagenet cpu-decode", "end_to_end", {
                **base, "model": model, "batch_size": big, "decode": "cpu", "kind": "imagenet"}
        for batch in small:
            for model in models:
                yield f"ceiling {model} b{batch}", "ceiling", {**base, "model": model, "batch_size": batch,
                                                             "max_seconds": cap / 3}
                yield f"train {model} b{batch} imagenet cpu-decode", "end_to_end", {
                    **base, "model": model, "batch_size": batch, "decode": "cpu", "kind": "imagenet"}
        if args.compile:
            for model in rest:
                yield f"ceiling {model} b{big} compiled", "ceiling", {**base, "model": model, "batch_size": big,
                                                                       "compile": True}

    for name, measure, spec in plan():
        left = args.budget_seconds - (time.perf_counter() - started)
        if measure == "end_to_end":
            spec = {**spec, "train_dir": str(e2e_rows(spec["kind"], spec["batch_size"])),
                    "untrained_model": str(data / f"untrained_{spec['model']}"), "train_images": 0}
        need = 30 if quick else (150 if spec.get("compile") else spec["max_seconds"] + 30)
        if left < need:
            skipped.append((name, f"budget: {left:.0f}s left, needs ~{need}s"))
            print(f"  {name:<44} skipped (budget)", flush=True)
            continue
        try:
            result = run_measurement(measure, spec, logs, name.replace(" ", "_"),
                                     timeout=None if math.isinf(left) else left)
        except subprocess.TimeoutExpired:
            skipped.append((name, f"stopped at the end of the budget after {left:.0f}s"))
            print(f"  {name:<44} stopped (budget)", flush=True)
            continue
        except RuntimeError as exc:
            failed.append((name, str(exc)[-600:]))
            print(f"  {name:<44} FAILED: {str(exc)[-300:]}", flush=True)
            continue
        results.append({"name": name, "measure": measure, **{k: spec.get(k) for k in (
            "model", "batch_size", "decode", "kind", "compile")}, **result})
    dataset = {kind: {k: v for k, v in info.items() if k != "files"} for kind, info in kinds.items()}
    return {"suite": "throughput", "results": results, "skipped": skipped, "failed": failed, "datasets": dataset,
            "image_size": size, "seconds": time.perf_counter() - started}


def throughput_markdown(report: dict) -> str:
    m = report["machine"]
    rows = report["results"]
    ceiling = {(r["model"], r["batch_size"]): r["images_per_second"] for r in rows
               if r["measure"] == "ceiling" and not r.get("compile")}
    lines = ["# Throughput benchmark (issue 16)", "",
             f"Machine: {m.get('gpu', 'no GPU')}; {m['cpu']}, {m['cpus_available']} CPUs; torch {m['torch']}. "
             f"Image size {report['image_size']}, channels_last and bf16 autocast on GPUs (fp32 on CPU).  ",
             "Datasets: " + "; ".join(f"{k}: {d['images']} JPEGs, {d['sides']} (mean {d['mean_megapixels']} MP), "
                                      f"{d['megabytes']} MB" for k, d in report["datasets"].items()) + ".  ",
             f"Command: `{report['command']}`", "",
             "| measurement | img/s | / eager ceiling | timed steps | host syncs per step (per print step) "
             "| workers | peak GPU MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = ceiling.get((r.get("model"), r.get("batch_size")))
        ratio = f"{r['images_per_second'] / base:.2f}" if base and r["measure"] != "supply" else "-"
        if r["measure"] == "supply" and base is None:
            big = [v for (_, b), v in ceiling.items() if b == r["batch_size"]]
            ratio = f"{r['images_per_second'] / big[0]:.2f} (supply)" if big else "-"
        syncs = (f"{r['host_syncs_per_step']:.3f} ({r['host_syncs_per_print_step']:.1f})"
                 if "host_syncs" in r else "-")
        steps = r.get("timed_steps", r.get("images", 0) // max(1, r.get("batch_size") or 1))
        stopped = " (time cap)" if r.get("stopped_by_time") else ""
        lines.append(f"| {r['name']} | {r['images_per_second']:.0f} | {ratio} | {steps}{stopped} | {syncs} "
                     f"| {r.get('num_workers', r.get('workers', '-'))} | {r.get('gpu_peak_mib', '-')} |")
    for name, why in report["skipped"]:
        lines.append(f"| {name} | skipped: {why} | | | | | |")
    for name, _why in report["failed"]:
        lines.append(f"| {name} | **FAILED** (see logs/) | | | | | |")
    return "\n".join(lines) + "\n"


# --- the report ----------------------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpus_available": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def median_of(results: list[dict], key: str = "images_per_second") -> float:
    return statistics.median(r[key] for r in results)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Training speed benchmark", "",
        f"Machine: {m['cpu']}, {m['cpus_available']} CPUs available, torch {m['torch']} "
        f"({m.get('gpu', 'no GPU')}, CPU capability {m['cpu_capability']}), Python {m['python']}.  ",
        f"Dataset: {report['dataset']['images']} training images ({report['dataset']['sides']}, "
        f"{report['dataset']['png_fraction']:.0%} PNG, rest JPEG, {report['dataset']['megabytes']} MB), "
        f"{report['config']['valid_images']} validation images; model {report['config']['model']}, batch "
        f"{report['config']['batch_size']}, {report['config']['epochs']} epochs per run (first excluded), "
        f"medians over {report['config']['repeats']} repeats.  ",
        f"Command: `{report['command']}`", "",
        "| image size | ceiling img/s | train (end-to-end) img/s | baseline img/s | train / ceiling | train / baseline "
        "| data wait | workers / threads | valid img/s (ceiling) "
        "| train peak MiB (main / worker) | baseline peak MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["sizes"]:
        worker_peak = f"{row['train_worker_peak_mib']:.0f}" if row["workers"] else "-"
        lines.append(
            f"| {row['image_size']} | {row['ceiling']:.0f} | {row['train']:.0f} | {row['baseline']:.0f} "
            f"| **{row['train_over_ceiling']:.2f}** | **{row['train_over_baseline']:.2f}** "
            f"| {row['data_wait_fraction']:.0%} | {row['workers']} / {row['threads']} "
            f"| {row['valid']:.0f} ({row['eval_ceiling']:.0f}) "
            f"| {row['train_main_peak_mib']:.0f} / {worker_peak} "
            f"| {row['baseline_peak_mib']:.0f} |")
    if report.get("decode"):
        lines += ["", "Where a training image's CPU time goes (core-milliseconds per image; the model's math is "
                  "CPUs / ceiling). The last column is the best train / ceiling these allow: with decoding "
                  "overlapped perfectly on all cores, and with decoding in the training process between steps.", "",
                  "| image size | read file | decode (PIL, JPEG draft) | of a JPEG / a PNG | resize + augment "
                  "| whole dataset item | collate | normalise | model math | best train / ceiling |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for size, d in report["decode"].items():
            lines.append(f"| {size} | {d['read_file']:.3f} | {d['decode']:.3f} "
                         f"| {d.get('decode_jpg', 0):.2f} / {d.get('decode_png', 0):.2f} | {d['resize_augment']:.3f} "
                         f"| {d['dataset_item_total']:.3f} | {d['collate']:.3f} | {d['normalize']:.3f} "
                         + (f"| {d['model_core_ms']:.3f} | {d['bound']:.2f} / {d['serial_bound']:.2f} |"
                            if "bound" in d else "| - | - |"))
    if report.get("workers"):
        lines += ["", f"Decoding workers (image size {report['workers']['image_size']}):", "",
                  "| --num-workers | model threads | train img/s | data wait |", "|---:|---:|---:|---:|"]
        for w, r in report["workers"]["results"].items():
            lines.append(f"| {w} | {r['cpu_threads']} | {r['images_per_second']:.0f} | {r['data_wait_fraction']:.0%} |")
    if report.get("index"):
        lines += ["", "Indexing an `images.lst` (load_image_directory, meta route):", "",
                  "| rows | seconds | rows/s | index memory MiB | process peak MiB |", "|---:|---:|---:|---:|---:|"]
        for r in report["index"]:
            lines.append(f"| {r['rows']:,} | {r['seconds']:.2f} | {r['rows_per_second']:,.0f} | {r['index_mib']} "
                         f"| {r['main_peak_mib']:.0f} |")
    if report.get("memory"):
        lines += ["", "Peak memory of `train` vs dataset size (rows; 1 epoch):", "",
                  "| rows | main process peak MiB | workers | largest worker peak MiB | img/s |",
                  "|---:|---:|---:|---:|---:|"]
        for r in report["memory"]:
            worker = f"{r['worker_peak_mib']:.0f}" if r["num_workers"] else "-"
            lines.append(f"| {r['rows']:,} | {r['main_peak_mib']:.0f} | {r['num_workers']} | {worker} "
                         f"| {r['images_per_second']:.0f} |")
    if report.get("fixture"):
        f = report["fixture"]
        lines += ["", f"Legacy fixture ImageDirectory (18 images): `train` ran, {f['images_per_second']:.0f} img/s "
                  "(too small to mean anything but that the path works)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_output")
    parser.add_argument("--images", type=int, default=1600, help="training images generated (default 1600)")
    parser.add_argument("--valid-images", type=int, default=320, help="validation images generated (default 320)")
    parser.add_argument("--min-side", type=int, default=48, help="smallest generated long side, px (default 48)")
    parser.add_argument("--max-side", type=int, default=500, help="largest generated long side, px (default 500)")
    parser.add_argument("--png-fraction", type=float, default=0.2, help="share of PNG files (default 0.2)")
    parser.add_argument("--image-sizes", default="32,64", help="--image-size values, comma-separated (default 32,64)")
    parser.add_argument("--model", help="default resnet18; throughput suite: resnet50,densenet121 (comma-separated)")
    parser.add_argument("--batch-size", type=int, default=32, help="per step, as in the demo (default 32)")
    parser.add_argument("--suite", choices=("auto", "speed", "throughput"), default="auto",
                        help="speed: the CPU report below; throughput: ceilings / loader supply / end to end per "
                             "model, batch and dataset (issue 16). auto: throughput with --device cuda")
    parser.add_argument("--batch-sizes", default="256,16", help="throughput suite: batch sizes (default 256,16)")
    parser.add_argument("--photo-images", type=int, default=1024,
                        help="throughput suite: 3-12 MP photos generated (default 1024)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="throughput suite: timing cap of one measurement (default 30)")
    parser.add_argument("--budget-seconds", type=float, default=math.inf,
                        help="throughput suite: skip what would start past this many seconds (default no limit)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run; the first is excluded (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of ceiling/train/baseline (default 3)")
    parser.add_argument("--workers", default="auto", help="--num-workers for `train` (default auto)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also pass --compile true to `train` and the ceiling")
    parser.add_argument("--workers-sweep", default="0,1,2", help="worker counts to compare; '' skips (default 0,1,2)")
    parser.add_argument("--index-rows", default="100000,1000000", help="images.lst sizes to index; '' skips")
    parser.add_argument("--memory-rows", default="2000,20000", help="dataset rows for the memory check; '' skips")
    parser.add_argument("--sections", default="speed,workers,index,memory,fixture",
                        help="what to run, comma-separated (default: all of speed,workers,index,memory,fixture)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the speed")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:  # inside a measurement subprocess
        result = MEASUREMENTS[args.measure](json.loads(args.spec))
        print(json.dumps(result), flush=True)
        return 0

    if args.suite == "throughput" or (args.suite == "auto" and args.device.startswith("cuda")):
        return run_throughput_suite(args, argv)
    args.model = args.model or "resnet18"
    if args.quick:
        args.images, args.valid_images, args.image_sizes, args.epochs, args.repeats = 256, 64, "32", 2, 1
        args.batch_size, args.index_rows, args.memory_rows, args.workers_sweep = 32, "10000,100000", "256,1024", ""
    command = " ".join(["python benchmarks/benchmark_training.py", *(argv if argv is not None else sys.argv[1:])])
    out = args.out.resolve()
    data, logs = out / "data", out / "logs"
    sizes = [int(s) for s in args.image_sizes.split(",") if s]
    started = time.perf_counter()

    print(f"Generating data in {data} ...", flush=True)
    train_info = write_dataset(data / "train", args.images, 1, args.min_side, args.max_side, args.png_fraction)
    write_dataset(data / "valid", args.valid_images, 2, args.min_side, args.max_side, args.png_fraction)
    untrained = data / f"untrained_{args.model}"
    if not (untrained / "model_spec.yaml").is_file():
        sys.path.insert(0, str(REPO / "src"))
        from train_pytorch_model.model_directory import ModelSpec, write_untrained_model_directory

        write_untrained_model_directory(untrained, ModelSpec(args.model), None)
    base = {"model": args.model, "batch_size": args.batch_size, "epochs": args.epochs, "device": args.device,
            "train_dir": str(data / "train"), "valid_dir": str(data / "valid"), "untrained_model": str(untrained),
            "train_images": args.images, "valid_images": args.valid_images, "workers": args.workers,
            "timed_epochs": max(1, args.epochs - 1), "steps_per_epoch": args.images // args.batch_size,
            "compile": args.compile}

    report = {"command": command, "machine": machine(), "config": {k: v for k, v in vars(args).items()
              if k not in ("measure", "spec", "out")} | {"out": str(out)},
              "dataset": {k: v for k, v in train_info.items() if k != "files"}, "sizes": [], "raw": {}}

    sections = set(args.sections.split(","))
    for size in sizes if "speed" in sections else []:
        spec = {**base, "image_size": size}
        raw = report["raw"][str(size)] = {"ceiling": [], "train": [], "baseline": []}
        print(f"Image size {size}:", flush=True)
        for r in range(args.repeats):  # interleaved, so background load hits every kind alike
            for kind in ("ceiling", "train", "baseline"):
                raw[kind].append(run_measurement(kind, spec, logs, f"{kind}-{size}-{r}"))
        raw["eval_ceiling"] = [run_measurement("eval_ceiling", spec, logs, f"eval_ceiling-{size}")]
        raw["decode"] = run_measurement("decode", spec, logs, f"decode-{size}")
        ceiling, train, baseline = median_of(raw["ceiling"]), median_of(raw["train"]), median_of(raw["baseline"])
        report["sizes"].append({
            "image_size": size, "ceiling": ceiling, "train": train, "baseline": baseline,
            "train_over_ceiling": train / ceiling, "train_over_baseline": train / baseline,
            "data_wait_fraction": median_of(raw["train"], "data_wait_fraction"),
            "workers": raw["train"][0]["num_workers"], "threads": raw["train"][0]["cpu_threads"],
            "valid": median_of(raw["train"], "valid_images_per_second"), "eval_ceiling": median_of(raw["eval_ceiling"]),
            "train_main_peak_mib": max(r["main_peak_mib"] for r in raw["train"]),
            "train_worker_peak_mib": max(r["worker_peak_mib"] for r in raw["train"]),
            "baseline_peak_mib": max(r["main_peak_mib"] for r in raw["baseline"]),
        })
        d = raw["decode"]
        if raw["ceiling"][0]["device"] == "cpu":  # on a GPU the math does not compete with decoding for cores
            data_ms = d["dataset_item_total"] + d["collate"]
            d["model_core_ms"] = 1000 * report["machine"]["cpus_available"] / ceiling
            # Decoding overlapped perfectly: the cores share the model's math and the data work.
            d["bound"] = d["model_core_ms"] / (d["model_core_ms"] + data_ms)
            # Decoding in the training process, between steps: its time adds to every step's.
            d["serial_bound"] = 1 / (1 + data_ms * ceiling / 1000)
        report.setdefault("decode", {})[str(size)] = d

    if args.workers_sweep and "workers" in sections:
        size = sizes[0]
        print(f"Workers sweep (image size {size}):", flush=True)
        results = {}
        for workers in args.workers_sweep.split(","):
            spec = {**base, "image_size": size, "workers": workers}
            results[workers] = run_measurement("train", spec, logs, f"workers-{workers}")
        report["workers"] = {"image_size": size, "results": results}

    if args.index_rows and "index" in sections:
        print("Indexing images.lst:", flush=True)
        report["index"] = []
        for rows in [int(r) for r in args.index_rows.split(",")]:
            index_dir = out / "index" / f"rows{rows}"
            if not (index_dir / "images.lst").is_file():
                write_image_list(index_dir, rows, None)
            report["index"].append(run_measurement("index", {"index_dir": str(index_dir)}, logs, f"index-{rows}"))

    if args.memory_rows and "memory" in sections:
        print("Peak memory vs dataset size:", flush=True)
        report["memory"] = []
        for rows in [int(r) for r in args.memory_rows.split(",")]:
            root = out / "memory" / f"rows{rows}"
            shutil.rmtree(root, ignore_errors=True)  # its links must point at this run's images
            write_image_list(root, rows, train_info["files"], data / "train")
            spec = {**base, "image_size": sizes[0], "epochs": 1, "train_dir": str(root), "train_images": rows}
            result = run_measurement("train", spec, logs, f"memory-{rows}")
            report["memory"].append({"rows": rows, **result})

    fixture = FIXTURES / "legacy_image_directory"
    if fixture.is_dir() and "fixture" in sections:
        print("Legacy fixture:", flush=True)
        spec = {**base, "image_size": 32, "batch_size": 4, "train_dir": str(fixture), "valid_dir": str(fixture),
                "train_images": 18, "valid_images": 18, "epochs": 2,
                "untrained_model": str(FIXTURES / "legacy_untrained_model" / "resnet18")}
        report["fixture"] = run_measurement("train", spec, logs, "fixture")

    report["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    (out / "benchmark.md").write_text(markdown(report))
    print("\n" + markdown(report))
    print(f"Written {out / 'benchmark.json'} and {out / 'benchmark.md'} in {report['seconds']:.0f}s.")
    return 0



def run_throughput_suite(args, argv) -> int:
    """The throughput suite: JSON + Markdown in --out; exit 1 when a measurement failed."""
    if args.quick:
        args.image_sizes, args.batch_sizes = "32", "4,2"
    elif args.image_sizes == "32,64":  # the CPU suite's default
        args.image_sizes = "224"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = throughput_suite(args, out)
    report["command"] = " ".join(["python benchmarks/benchmark_training.py",
                                  *(argv if argv is not None else sys.argv[1:])])
    report["machine"] = machine()
    (out / "throughput.json").write_text(json.dumps(report, indent=2))
    (out / "throughput.md").write_text(throughput_markdown(report))
    print("\n" + throughput_markdown(report))
    print(f"Written {out / 'throughput.json'} and {out / 'throughput.md'} in {report['seconds']:.0f}s.")
    if report["failed"]:
        print(f"{len(report['failed'])} measurement(s) failed: " + ", ".join(n for n, _ in report["failed"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
