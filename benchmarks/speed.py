"""The CPU speed suite (`benchmark_training.py --suite speed`, the default without a GPU): ceiling, `train`,
the original-shaped baseline, evaluation, the decode profile, the workers sweep, indexing and memory.
benchmark_training.py's docstring says what each measures."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    CLASSES,
    FIXTURES,
    REPO,
    machine,
    make_model_and_step,
    median_of,
    peak_memory,
    peak_rss_mib,
    run_measurement,
    sync,
    train_argv,
    write_dataset,
    write_image_list,
    write_results,
)


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




def run_speed_suite(args, argv) -> int:
    """The CPU speed report: <out>/benchmark.json and benchmark.md."""
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
    write_results(out, "benchmark", report, markdown(report))
    print(f"Written {out / 'benchmark.json'} and {out / 'benchmark.md'} in {report['seconds']:.0f}s.")
    return 0

