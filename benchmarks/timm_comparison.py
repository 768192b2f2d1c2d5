"""Seconds per training epoch: `train` against timm's `train.py` on identical work (issue 16, CPU target).

The work: 512 generated 64x64 JPEGs in 10 class folders (128 more to validate), resnet18 from scratch, batch 16,
random-resized crop (scale 0.5-1, bilinear) + horizontal flip, SGD with Nesterov momentum, fp32, on the CPU.

Contestants, each in a fresh process, interleaved over `--repeats` rounds (so a busy machine slows all alike),
medians of the epochs after the first (which pays for start-up):

- `train --optimizer sgd --bn-recalibration false`: the real CLI (in process) at this machine's defaults for
  workers and threads, doing timm's work: the same optimizer, crop + flip (`--augmentation flip_crop`), and no
  BatchNorm re-estimation before validation.
- `train --optimizer sgd`: the same with the BatchNorm re-estimation (`train`'s default).
- `train`: the CLI at its defaults (AdamW), with crop + flip.
- `torchvision ImageFolder loop`: the plain loop one writes from torchvision's tutorials: ImageFolder with
  RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize, a DataLoader without workers (as `train` on
  2 CPUs), torchvision's resnet18, SGD (Nesterov), validation after each epoch. Needs nothing but torchvision.
- `timm train.py`: timm's training epoch as its `train.py` wires it (its `create_dataset`, `create_loader` with
  the prefetcher and one worker per CPU, `create_model`, `create_optimizer_v2`, `LabelSmoothingCrossEntropy`,
  the cosine scheduler, and `train_one_epoch`'s step: forward, loss, backward, step, `loss.item()`, zero_grad).
  The script itself is not in timm's wheel, so its CPU path is rebuilt here from timm's library.
- `timm, torchvision resnet18`: the same, with this project's model (torchvision's resnet18): the model's share.
- `timm, 0 workers`: the same as `timm train.py`, decoding in the training process: the loader's share.

Per epoch: `train s` is the training loop alone (first batch requested to last step done), `epoch s` adds what
each does before the next epoch (validation; for `train` also the BatchNorm re-estimation, benchmarks/recipe.py),
`cycle s` everything from one epoch's end to the next (for `train` also its logging and checkpoint). Every
contestant's OpenMP threads wait as `train`'s do (see omp_wait_policy.py) unless the caller set a policy.

    pip install --no-deps timm==1.0.31    # not a dependency of the project; only this script needs it
    python benchmarks/timm_comparison.py --repeats 5
    python benchmarks/timm_comparison.py --quick     # a smoke run (tests/test_benchmark.py runs it without timm)

Results: <out>/timm_comparison.json and .md. Timing is never asserted.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # common.py: the benchmarks' shared helpers
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from train_pytorch_model.cli import bounded_openmp_spinning  # noqa: E402  (torch-free)

CPUS = len(os.sched_getaffinity(0))
CLASSES = [f"class{k}" for k in range(10)]
SCALE, RATIO = (0.5, 1.0), (3 / 4, 4 / 3)  # preprocessing.Preprocessing.train_transform's crop

FLIP = ["--augmentation", "flip_crop"]  # timm's and the torchvision loop's crop + flip
CONTESTANTS = {
    "train --optimizer sgd --bn-recalibration false": ("train", {"args": ["--optimizer", "sgd",
                                                                          "--bn-recalibration", "false", *FLIP]}),
    "train --optimizer sgd": ("train", {"args": ["--optimizer", "sgd", *FLIP]}),
    "train": ("train", {"args": FLIP}),
    "torchvision ImageFolder loop": ("torchvision", {}),
    "timm train.py": ("timm", {"model": "timm", "workers": CPUS}),
    "timm, torchvision resnet18": ("timm", {"model": "torchvision", "workers": CPUS}),
    "timm, 0 workers": ("timm", {"model": "timm", "workers": 0}),
}


def write_data(root: Path, train: int, valid: int, size: int) -> Path:
    """`root/train/<class>/*.jpg` and `root/validation/<class>/*.jpg`, square `size` px, JPEG q90; reused."""
    import numpy as np

    from common import synthetic_photo

    recipe = {"train": train, "valid": valid, "size": size, "version": 1}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == recipe:
        return root
    rng = np.random.default_rng(16)
    for split, count in (("train", train), ("validation", valid)):
        for n in range(count):
            path = root / split / CLASSES[n % len(CLASSES)] / f"{n:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            synthetic_photo(rng, size, size, n % len(CLASSES)).save(path, "JPEG", quality=90)
    manifest.write_text(json.dumps(recipe))
    return root


# --- measurements (each in its own process: --measure KIND --spec JSON) -----------------------------------


def measure_train(spec: dict) -> dict:
    """The CLI in this process; per-epoch seconds from its metrics.csv."""
    from train_pytorch_model import cli
    from train_pytorch_model.model_directory import ModelSpec, write_untrained_model_directory

    with tempfile.TemporaryDirectory(prefix="timm-cmp-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        untrained, out = Path(tmp) / "untrained", Path(tmp) / "trained"
        write_untrained_model_directory(untrained, ModelSpec("resnet18"), None)
        argv = ["train", "--untrained-model", str(untrained), "--training-data", f"{spec['data']}/train",
                "--validation-data", f"{spec['data']}/validation", "--trained-model", str(out),
                "--epochs", str(spec["epochs"]), "--batch-size", str(spec["batch_size"]),
                "--image-size", str(spec["size"]), "--patience", "0", "--print-freq", "1000000", *spec.get("args", [])]
        handler = EpochClock()
        logging.getLogger("train_pytorch_model").addHandler(handler)
        if cli.main(argv) != 0:
            raise SystemExit("train failed")
        with open(out / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        training = json.loads((out / "training_info.json").read_text())["training"]
    seen = spec["train_images"] // spec["batch_size"] * spec["batch_size"]  # drop_last
    return {"train_seconds": [seen / float(r["train_images_per_second"]) for r in rows],
            "epoch_seconds": [float(r["seconds"]) for r in rows],
            "cycle_seconds": [b - a for a, b in zip([handler.started, *handler.ends], handler.ends)],
            "settings": {k: training.get(k) for k in ("optimizer", "num_workers", "cpu_threads", "channels_last",
                                                      "bn_recalibration")}}


class EpochClock(logging.Handler):
    """The time of each epoch's summary line: an epoch's whole cycle (training, BatchNorm re-estimation,
    validation, logging, checkpoint) is the time between two."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.started, self.ends = time.perf_counter(), []

    def emit(self, record):
        if record.getMessage().startswith("Epoch "):  # "Epoch 2/3  train loss ..."
            self.ends.append(time.perf_counter())


def measure_torchvision(spec: dict) -> dict:
    """A plain torchvision training loop doing the same work: ImageFolder, RandomResizedCrop + flip + ToTensor +
    Normalize in the DataLoader (no workers, as `train` on 2 CPUs), torchvision's resnet18, SGD (Nesterov),
    fp32; validation (Resize + CenterCrop) after each epoch."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(42)
    size, batch = spec["size"], spec["batch_size"]
    normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = datasets.ImageFolder(f"{spec['data']}/train", transforms.Compose([
        transforms.RandomResizedCrop(size, scale=SCALE, ratio=RATIO), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize]))
    valid = datasets.ImageFolder(f"{spec['data']}/validation", transforms.Compose([
        transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size), transforms.ToTensor(), normalize]))
    train_loader = DataLoader(train, batch_size=batch, shuffle=True, drop_last=True)
    valid_loader = DataLoader(valid, batch_size=batch)
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9, nesterov=True, weight_decay=1e-4)
    train_seconds, epoch_seconds = [], []
    for _epoch in range(spec["epochs"]):
        started = time.perf_counter()
        model.train()
        for images, targets in train_loader:
            loss = F.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_seconds.append(time.perf_counter() - started)
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, targets in valid_loader:
                correct += (model(images).argmax(1) == targets).sum().item()
        epoch_seconds.append(time.perf_counter() - started)
    return {"train_seconds": train_seconds, "epoch_seconds": epoch_seconds, "cycle_seconds": epoch_seconds,
            "settings": {"optimizer": "sgd", "num_workers": 0, "cpu_threads": torch.get_num_threads(),
                         "channels_last": False, "bn_recalibration": False}}


def measure_timm(spec: dict) -> dict:
    """timm's train.py on the CPU, rebuilt from timm's library with the arguments train.py passes."""
    import torch
    from timm import utils
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.models import create_model
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    device = torch.device("cpu")
    utils.random_seed(42, 0)
    if spec["model"] == "timm":
        model = create_model("resnet18", num_classes=len(CLASSES))
        data_config = resolve_data_config({"img_size": spec["size"]}, model=model)
    else:
        from train_pytorch_model.models import build_net

        model = build_net("resnet18", len(CLASSES))
        data_config = resolve_data_config({"img_size": spec["size"]}, model=create_model("resnet18"))
    optimizer = create_optimizer_v2(model, opt="sgd", lr=spec["lr"], weight_decay=2e-5, momentum=0.9)
    loader_args = dict(input_size=data_config["input_size"], batch_size=spec["batch_size"], use_prefetcher=True,
                       mean=data_config["mean"], std=data_config["std"], num_workers=spec["workers"],
                       persistent_workers=spec["workers"] > 0, device=device, interpolation="bilinear")
    loader_train = create_loader(
        create_dataset("", root=spec["data"], split="train", is_training=True, batch_size=spec["batch_size"]),
        is_training=True, scale=SCALE, ratio=RATIO, hflip=0.5, color_jitter=0.0, **loader_args)
    loader_eval = create_loader(create_dataset("", root=spec["data"], split="validation"), is_training=False,
                                crop_pct=data_config["crop_pct"], **loader_args)
    train_loss_fn, validate_loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1), torch.nn.CrossEntropyLoss()
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=spec["epochs"],
                                       updates_per_epoch=len(loader_train))
    train_seconds, epoch_seconds = [], []
    num_updates = 0
    for _epoch in range(spec["epochs"]):
        started = time.perf_counter()
        model.train()
        losses = utils.AverageMeter()
        for input, target in loader_train:  # train_one_epoch, without gradient accumulation
            loss = train_loss_fn(model(input), target)
            loss.backward()
            optimizer.step()
            losses.update(loss.item(), input.size(0))
            optimizer.zero_grad()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        train_seconds.append(time.perf_counter() - started)
        model.eval()
        top1 = utils.AverageMeter()
        with torch.no_grad():
            for input, target in loader_eval:  # validate()
                output = model(input)
                validate_loss_fn(output, target).item()
                top1.update(utils.accuracy(output, target, topk=(1,))[0].item(), input.size(0))
        scheduler.step(_epoch + 1, top1.avg)
        epoch_seconds.append(time.perf_counter() - started)
    return {"train_seconds": train_seconds, "epoch_seconds": epoch_seconds, "cycle_seconds": epoch_seconds,
            "settings": {"optimizer": "sgd", "num_workers": spec["workers"], "cpu_threads": torch.get_num_threads(),
                         "channels_last": False, "bn_recalibration": False}}


MEASUREMENTS = {"train": measure_train, "timm": measure_timm, "torchvision": measure_torchvision}


def run(kind: str, spec: dict) -> dict:
    # Every contestant's OpenMP threads wait the way `train`'s do (cli.main sets it when the user has not, but here
    # torch is imported before cli.main runs), so the comparison is of the work, not of the wait policy.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    bounded_openmp_spinning(env)
    done = subprocess.run([sys.executable, __file__, "--measure", kind, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timm_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import timm"], capture_output=True).returncode == 0


def markdown(report: dict) -> str:
    rows = report["results"]
    base = rows.get("timm train.py", {}).get("train_s")
    lines = [f"{report['work']}; {report['machine']}; medians of {report['repeats']} rounds x "
             f"{report['epochs'] - 1} timed epochs.", "",
             "| contestant | workers | threads | train s / epoch | / timm train.py | epoch s (with validation) "
             "| whole epoch cycle s | / torchvision loop |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    loop = rows.get("torchvision ImageFolder loop", {}).get("cycle_s")
    for name, row in rows.items():
        ratio = f"{row['train_s'] / base:.2f}" if base else "-"
        cycle = f"{row['cycle_s'] / loop:.2f}" if loop else "-"
        lines.append(f"| {name} | {row['settings']['num_workers']} | {row['settings']['cpu_threads']} | "
                     f"{row['train_s']:.2f} | {ratio} | {row['epoch_s']:.2f} | {row['cycle_s']:.2f} | {cycle} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is not timed")
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--valid-images", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--contestants", nargs="+", choices=list(CONTESTANTS), default=list(CONTESTANTS))
    parser.add_argument("--quick", action="store_true", help="64 images, 2 epochs, 1 round")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_output" / "timm_comparison")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(MEASUREMENTS[args.measure](json.loads(args.spec))))
        return 0
    if args.quick:
        args.repeats, args.epochs, args.train_images, args.valid_images = 1, 2, 64, 20
    contestants = list(args.contestants)
    if not timm_available():
        print("timm is not installed (pip install --no-deps timm==1.0.31): only `train` runs", file=sys.stderr)
        contestants = [c for c in contestants if CONTESTANTS[c][0] != "timm"]
    data = write_data(args.out / "data", args.train_images, args.valid_images, args.size)
    common = {"data": str(data), "epochs": args.epochs, "batch_size": args.batch_size, "size": args.size,
              "train_images": args.train_images, "lr": 0.001}
    times: dict[str, list[dict]] = {name: [] for name in contestants}
    for round_ in range(args.repeats):
        for name in contestants:
            kind, extra = CONTESTANTS[name]
            result = run(kind, {**common, **extra})
            times[name].append(result)
            timed = result["train_seconds"][1:] or result["train_seconds"]
            print(f"  round {round_ + 1} {name:<28} train {statistics.median(timed):6.2f} s/epoch", flush=True)

    def median_after_first(runs: list[dict], key: str) -> float:
        return statistics.median(s for r in runs for s in (r[key][1:] or r[key]))

    from common import machine, write_results

    host = machine()
    report = {
        "work": f"{args.train_images} JPEGs {args.size}x{args.size}, resnet18, batch {args.batch_size}, crop + flip",
        "machine": f"{host['cpus_available']} CPUs, {host['cpu']} ({host['cpu_capability']}), torch {host['torch']}",
        "host": host, "repeats": args.repeats, "epochs": args.epochs,
        "results": {name: {"train_s": median_after_first(runs, "train_seconds"),
                           "epoch_s": median_after_first(runs, "epoch_seconds"),
                           "cycle_s": median_after_first(runs, "cycle_seconds"), "settings": runs[0]["settings"],
                           "runs": runs} for name, runs in times.items()}}
    write_results(args.out, "timm_comparison", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
