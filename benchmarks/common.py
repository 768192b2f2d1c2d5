"""What every benchmark suite shares: generated data (photo-like JPEGs/PNGs, ImageFolder trees, images.lst
files), peak memory, the training step as `train` builds it, the machine's description, and running one
measurement in a fresh interpreter (`benchmark_training.py --measure KIND --spec JSON`)."""

from __future__ import annotations

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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "examples"
CLASSES = [f"class{k}" for k in range(10)]
ENTRY = Path(__file__).resolve().parent / "benchmark_training.py"  # runs any suite's measurement by name


# --- dataset -------------------------------------------------------------------------------------------------


def synthetic_photo(rng, width: int, height: int, label: int, grain: float = 0.0):
    """A photo-like image: smooth colour field, a class-coloured shape with edges, mild sensor noise.

    (Pure noise would make JPEG decoding unrealistically slow; flat colour unrealistically fast.) `grain` adds
    Gaussian luminance grain of that standard deviation: texture, for files as big as real photos' (JPEG
    decoding time follows the compressed size).
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
    if grain:
        pixels = pixels + rng.normal(0, grain, (height, width, 1)).astype(np.int16)
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


def train_argv(spec: dict, out: Path) -> list[str]:
    return [
        "train", "--untrained-model", spec["untrained_model"], "--training-data", spec["train_dir"],
        "--validation-data", spec["valid_dir"], "--trained-model", str(out), "--epochs", str(spec["epochs"]),
        "--batch-size", str(spec["batch_size"]), "--image-size", str(spec["image_size"]), "--patience", "0",
        "--num-workers", str(spec.get("workers", "auto")), "--device", spec.get("device", "auto"),
        "--print-freq", "1000000", *(["--compile", "true"] if spec.get("compile") else []),
    ]




def run_measurement(kind: str, spec: dict, log_dir: Path, name: str, timeout: float | None = None) -> dict:
    """`kind` in a fresh interpreter; returns its JSON result (stderr goes to <out>/logs/<name>.log)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    # Every measurement's OpenMP threads wait as `train`'s do (cli.main sets it before torch loads; the ceiling
    # and the baseline import torch themselves): ratios compare runs under one policy.
    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    from train_pytorch_model.cli import bounded_openmp_spinning  # torch-free

    bounded_openmp_spinning(env)
    command = [sys.executable, str(ENTRY), "--measure", kind, "--spec", json.dumps(spec)]
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


def write_results(out: Path, name: str, report: dict, markdown_text: str) -> None:
    """`<name>.json` (everything) and `<name>.md` (the table) in `out`, and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(markdown_text)
    print("\n" + markdown_text)


def median_of(results: list[dict], key: str = "images_per_second") -> float:
    return statistics.median(r[key] for r in results)


