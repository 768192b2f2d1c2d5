"""The throughput suite (`benchmark_training.py --suite throughput`, the default with `--device cuda`; issue 16,
run on a GPU by gpu_check.sh): same-batch ceilings, loader-only supply and the real `train` end to end, per
model, batch size and dataset (ImageNet-like JPEGs and 3-12 MP photos)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    REPO,
    machine,
    peak_memory,
    run_measurement,
    sync,
    train_argv,
    write_image_list,
    write_photos,
    write_results,
)


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
        # What issue 22's GPU check reports first: ceiling, end to end on both kinds of image, the designer's
        # batch 16, DenseNet-121; then the rest (a budget cut skips from the end).
        yield f"ceiling {first} b{big}", "ceiling", {**base, "model": first, "batch_size": big,
                                                   "max_seconds": cap / 2}
        for kind, decode in (("imagenet", "cpu"), ("photos", "gpu"), ("photos", "cpu")):
            yield f"train {first} b{big} {kind} {decode}-decode", "end_to_end", {
                **base, "model": first, "batch_size": big, "decode": decode, "kind": kind}
        for batch in small:
            yield f"ceiling {first} b{batch}", "ceiling", {**base, "model": first, "batch_size": batch,
                                                         "max_seconds": cap / 3}
            yield f"train {first} b{batch} imagenet cpu-decode", "end_to_end", {
                **base, "model": first, "batch_size": batch, "decode": "cpu", "kind": "imagenet"}
        for model in rest:
            yield f"ceiling {model} b{big}", "ceiling", {**base, "model": model, "batch_size": big,
                                                       "max_seconds": cap / 2}
            yield f"train {model} b{big} imagenet cpu-decode", "end_to_end", {
                **base, "model": model, "batch_size": big, "decode": "cpu", "kind": "imagenet"}
        yield f"train {first} b{big} imagenet gpu-decode", "end_to_end", {
            **base, "model": first, "batch_size": big, "decode": "gpu", "kind": "imagenet"}
        for kind in kinds:
            for decode in ("cpu", "gpu"):
                yield f"supply {kind} {decode}-decode b{big}", "supply", {
                    **base, "batch_size": big, "decode": decode, "train_dir": str(data / kind),
                    "steps": steps // 3, "max_seconds": cap / 3}
        for batch in small:
            for model in rest:
                yield f"ceiling {model} b{batch}", "ceiling", {**base, "model": model, "batch_size": batch,
                                                             "max_seconds": cap / 3}
                yield f"train {model} b{batch} imagenet cpu-decode", "end_to_end", {
                    **base, "model": model, "batch_size": batch, "decode": "cpu", "kind": "imagenet"}
        if args.compile:
            for model in models:
                yield f"ceiling {model} b{big} compiled", "ceiling", {**base, "model": model, "batch_size": big,
                                                                       "compile": True, "max_seconds": cap}

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
    write_results(out, "throughput", report, throughput_markdown(report))
    print(f"Written {out / 'throughput.json'} and {out / 'throughput.md'} in {report['seconds']:.0f}s.")
    if report["failed"]:
        print(f"{len(report['failed'])} measurement(s) failed: " + ", ".join(n for n, _ in report["failed"]))
        return 1
    return 0

