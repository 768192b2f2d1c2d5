"""Parquet shards against a folder of images on a slow-to-open mount (issue 23).

    python benchmarks/parquet_shards.py                      # ~300 images, a few minutes on a loaded laptop
    python benchmarks/parquet_shards.py --images 600 --workers 4 --out results.json

A blob-storage mount answers a file open in milliseconds; this stands in for one with an LD_PRELOAD shim,
compiled here with gcc, that sleeps `--open-delay-ms` in every open()/openat() of a path below the data
folder and counts those opens. One `train` epoch (the same model, image size, batch and workers) is timed:

    folder            the ImageFolder, no delay           (the reference)
    folder + delay    the ImageFolder, every open delayed
    shards + delay    its Parquet shards (convert --to parquet), every open delayed

Target: shards + delay within 1.15x of the folder without delay. The epoch time is the training epoch's
(metrics.csv: images / train_images_per_second), validation reads a small folder outside the delayed path. On
a CPU the model's steps hide the data path, so the loader's epoch alone (its batches, no model: what a GPU
waits for) is timed too, in its steady state (the second epoch), with the delayed opens it made.
Also measured: convert throughput (with and without --max-side), shard sizes, and the decode cost of a
multi-megapixel photo as training decodes it before and after `--max-side 512`. All figures of one run
come from one machine in one sitting: compare the ratios, not the absolute times, on a loaded machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESNET18 = REPO / "examples" / "legacy_untrained_model" / "resnet18"

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
#include <time.h>

/* Every open()/openat() of a path under $SLOW_OPEN_PREFIX sleeps $SLOW_OPEN_US microseconds (a mount's open
   latency) and appends one byte to $SLOW_OPEN_LOG, so the log's size counts the delayed opens of all
   processes (DataLoader workers leave with _exit: no destructor would run). */
static int delayed(const char *path) {
    const char *prefix = getenv("SLOW_OPEN_PREFIX");
    if (!prefix || !path || strncmp(path, prefix, strlen(prefix)) != 0) return 0;
    const char *us = getenv("SLOW_OPEN_US");
    long micros = us ? atol(us) : 5000;
    struct timespec ts = {micros / 1000000, (micros % 1000000) * 1000};
    nanosleep(&ts, NULL);
    const char *log = getenv("SLOW_OPEN_LOG");
    if (log) {
        static int (*real_open)(const char *, int, ...);
        if (!real_open) real_open = dlsym(RTLD_NEXT, "open");
        int fd = real_open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
        if (fd >= 0) { ssize_t n = write(fd, "o", 1); (void)n; close(fd); }
    }
    return 1;
}

#define MODE(flags) mode_t mode = 0; if ((flags) & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); \
    mode = va_arg(ap, mode_t); va_end(ap); }

#define WRAP_OPEN(name) int name(const char *path, int flags, ...) { MODE(flags) \
    static int (*real)(const char *, int, ...); if (!real) real = dlsym(RTLD_NEXT, #name); \
    delayed(path); return real(path, flags, mode); }
#define WRAP_OPENAT(name) int name(int dirfd, const char *path, int flags, ...) { MODE(flags) \
    static int (*real)(int, const char *, int, ...); if (!real) real = dlsym(RTLD_NEXT, #name); \
    delayed(path); return real(dirfd, path, flags, mode); }

WRAP_OPEN(open)
WRAP_OPEN(open64)
WRAP_OPENAT(openat)
WRAP_OPENAT(openat64)
int __open_2(const char *path, int flags) { return open(path, flags); }
int __open64_2(const char *path, int flags) { return open64(path, flags); }
int __openat_2(int dirfd, const char *path, int flags) { return openat(dirfd, path, flags); }
int __openat64_2(int dirfd, const char *path, int flags) { return openat64(dirfd, path, flags); }
"""


def build_shim(folder: Path) -> Path:
    source, library = folder / "slow_open.c", folder / "slow_open.so"
    source.write_text(SHIM)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"], check=True)
    return library


def photo(rng: np.random.Generator, size: tuple[int, int], label: int) -> Image.Image:
    """A JPEG-like photo: smooth colour fields with grain (noise alone would make decoding unrealistically slow)."""
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    base = np.array([label * 37 % 255, 90, 200 - label * 23 % 200], dtype=np.float32)
    pixels = base * (0.6 + 0.4 * x) * (0.7 + 0.3 * y) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def image_folder(root: Path, images: int, classes: int, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng, size, i % classes).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def cli(*args: str, env: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "train_pytorch_model", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {result.stderr[-3000:]}")
    return time.perf_counter() - started


def train_epoch(data: Path, valid: Path, out: Path, args, env: dict | None) -> float:
    """Seconds of one training epoch of `args.images` images (validation aside), from the run's metrics.csv."""
    cli("train", "--untrained-model", str(RESNET18), "--training-data", str(data), "--validation-data", str(valid),
        "--trained-model", str(out), "--epochs", "1", "--image-size", str(args.image_size), "--batch-size",
        str(args.batch_size), "--num-workers", str(args.workers), "--mlflow-tracking-uri",
        f"sqlite:///{out.parent / (out.name + '.db')}", env=env)
    with open(out / "metrics.csv") as handle:
        row = next(csv.DictReader(handle))
    # Per image, for the whole set (shards leave out up to a batch per worker stream, a folder up to one batch).
    return args.images / float(row["train_images_per_second"])


# The data path alone: the training loader's batches for epochs 0 and 1, no model; epoch 1 is the steady state
# (workers started, shard files already open), and the delayed opens are counted around it.
SUPPLY = """
import os, sys, time, torch
from train_pytorch_model.data import build_dataset, training_loader
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.preprocessing import Preprocessing
data, size, batch, workers, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
directory = load_image_directory(data, "Training")
prep = Preprocessing(image_size=size, augmentation="flip_crop")
dataset = build_dataset(directory, {c: i for i, c in enumerate(directory.categories)}, prep, train=True, seed=1)
loader = training_loader(dataset, batch_size=batch, seed=1, rank=0, world_size=1, num_workers=workers,
                         device=torch.device("cpu"))
opened = lambda: os.path.getsize(log) if os.path.exists(log) else 0
for epoch in (0, 1):
    loader.sampler.set_epoch(epoch)
    before, start = opened(), time.perf_counter()
    images = sum(len(b) for b in loader)
    seconds, opens = time.perf_counter() - start, opened() - before
print(seconds, images, opens)
"""


def supply_epoch(data: Path, args, env: dict | None, log: Path) -> tuple[float, int]:
    """(seconds per `args.images` images, delayed opens) of the loader's steady-state epoch, without a model."""
    result = subprocess.run([sys.executable, "-c", SUPPLY, str(data), str(args.image_size), str(args.batch_size),
                             str(args.workers), str(log)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"the loader failed: {result.stderr[-3000:]}")
    seconds, images, opens = result.stdout.split()
    return float(seconds) * args.images / int(images), int(opens)


def convert_seconds(folder: Path, out: Path, max_side: int | None) -> float:
    """`convert --to parquet` in this process (the interpreter's start left out), index included."""
    from train_pytorch_model.convert import ShardOptions, convert

    started = time.perf_counter()
    convert(folder, out, to="parquet", shards=ShardOptions(max_side=max_side))
    return time.perf_counter() - started


def decode_ms(data: bytes, size_hint: int, repeat: int) -> float:
    from train_pytorch_model.preprocessing import decode_image

    started = time.perf_counter()
    for _ in range(repeat):
        decode_image(data, size_hint)
    return (time.perf_counter() - started) / repeat * 1000


def measure(args, work: Path) -> dict:
    from train_pytorch_model.convert import shrink

    shim = build_shim(work)
    mount = work / "mount"  # the delayed prefix
    folder = image_folder(mount / "folder", args.images, args.classes, (args.side, args.side * 3 // 4))
    valid = image_folder(work / "valid", 2 * args.classes, args.classes, (args.side, args.side * 3 // 4), seed=1)
    results: dict = {"images": args.images, "image_pixels": f"{args.side}x{args.side * 3 // 4}",
                     "workers": args.workers, "batch_size": args.batch_size, "image_size": args.image_size,
                     "open_delay_ms": args.open_delay_ms}

    seconds = convert_seconds(folder, mount / "shards", None)
    shards = sorted((mount / "shards" / "data").glob("*.parquet"))
    results["convert_images_per_second"] = args.images / seconds
    results["shards"] = [{"file": s.name, "mib": round(s.stat().st_size / 2**20, 2)} for s in shards]
    folder_mib = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
    results["folder_mib"] = round(folder_mib, 2)
    seconds = convert_seconds(folder, work / "shrunk", args.side // 2)
    results["convert_max_side_images_per_second"] = args.images / seconds
    results["convert_max_side"] = args.side // 2

    log = work / "opens.log"
    delayed = {"LD_PRELOAD": str(shim), "SLOW_OPEN_PREFIX": str(mount), "SLOW_OPEN_US": str(args.open_delay_ms * 1000),
               "SLOW_OPEN_LOG": str(log)}
    runs = {"folder": (folder, None), "folder_delay": (folder, delayed), "shards_delay": (mount / "shards", delayed)}
    epochs: dict[str, list[float]] = {name: [] for name in runs}
    opens: dict[str, int] = {}
    for attempt in range(args.repeat):  # interleaved: a change in the machine's load hits every variant alike
        for name, (data, env) in runs.items():
            log.unlink(missing_ok=True)
            epochs[name].append(train_epoch(data, valid, work / f"{name}-{attempt}", args, env))
            opens[name] = log.stat().st_size if log.exists() else 0
    supply: dict[str, list[float]] = {name: [] for name in runs}
    supply_opens: dict[str, int] = {}
    for _ in range(args.repeat + 1):
        for name, (data, env) in runs.items():
            seconds, supply_opens[name] = supply_epoch(data, args, env, log)
            supply[name].append(seconds)
    fastest = {name: min(times) for name, times in supply.items()}
    results["loader_epoch_seconds"] = {name: [round(t, 3) for t in times] for name, times in supply.items()}
    results["loader_delayed_opens_per_epoch"] = supply_opens
    results["loader_shards_delay_over_folder"] = fastest["shards_delay"] / fastest["folder"]
    results["loader_folder_delay_over_folder"] = fastest["folder_delay"] / fastest["folder"]
    best = {name: min(times) for name, times in epochs.items()}
    results["epoch_seconds"] = {name: [round(t, 2) for t in times] for name, times in epochs.items()}
    results["delayed_opens_per_run"] = opens
    results["shards_delay_over_folder"] = best["shards_delay"] / best["folder"]
    results["folder_delay_over_folder"] = best["folder_delay"] / best["folder"]

    # A multi-megapixel photo as training decodes it (draft for JPEG at the resize size), then after --max-side.
    rng = np.random.default_rng(2)
    buffer = __import__("io").BytesIO()
    photo(rng, (4000, 3000), 1).save(buffer, "JPEG", quality=92)
    big = buffer.getvalue()
    small, _ = shrink(big, 512)
    results["photo"] = {"pixels": "4000x3000", "kib": len(big) // 1024, "max_side_512_kib": len(small) // 1024,
                        "decode_ms_full": decode_ms(big, None, 3), "decode_ms_as_training": decode_ms(big, 256, 5),
                        "decode_ms_after_max_side_512": decode_ms(small, 256, 20)}
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--side", type=int, default=160, help="generated images are side x 3/4 side pixels")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--open-delay-ms", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2, help="epochs of each variant; the fastest counts")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        sys.exit("gcc is needed to build the open-delay shim")
    with tempfile.TemporaryDirectory(prefix="shards-bench-") as temporary:
        results = measure(args, Path(temporary))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
