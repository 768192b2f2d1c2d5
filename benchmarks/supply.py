"""Supply cost per core: core-milliseconds per image from a file on disk to an augmented uint8 batch (issue 22).

    python benchmarks/supply.py                 # ~1 minute on 2 cores
    python benchmarks/supply.py --quick         # a smoke run at toy size (tests/test_benchmark.py runs it)

Two pipelines, timed in the same process on the same files, taking turns over `--rounds` rounds (so background
load hits both alike), one thread, CPU time (`time.process_time`: it holds up on a busy machine better than wall
time); the median round counts:

- ours:      the training dataset of `train` (`data.build_dataset(..., train=True)`: per-sample seeding, the
             crop drawn from the header, JPEG DCT scaling chosen for that crop, crop + resize + flip in one
             torch call) and `data.collate` into a batch.
- reference: torchvision's recipe: PIL open + convert("RGB"), v2.RandomResizedCrop (the same scale 0.5-1,
             antialiased), v2.RandomHorizontalFlip, v2.PILToTensor, torch.stack.
- decode alone: the floor, libjpeg-turbo decoding each file at the DCT scale `ours` chose for it (torchvision's
             decoder at full scale, as `ours` uses it there; Pillow's draft mode when scaled).

And for the 6 MP photos, the route docs/performance.md gives for photos: `convert --to parquet --max-side
SHRINK_SIDE` once (its cost per image is timed too), then `train`'s shard loader (`data.training_loader`, no
workers) over the shards, every epoch ("photo-shards", ours only: the reference reads files).

Images, generated in a temporary folder: ImageNet-like JPEGs (~500x375, q90, ~110 KB: the grain makes them as
big as ImageNet's average file), 6-megapixel photos (3000x2000, q90, ~1.6 MB: camera-like) and smooth 6 MP
photos (~0.8 MB: the throughput suite's). JPEG decoding time follows the compressed size.

Results: <out>/supply.json and supply.md. Timing is never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLASSES, REPO, machine, synthetic_photo, write_results  # noqa: E402

# name -> (width, height, grain, target core-ms per image or None)
KINDS = {
    "imagenet": (500, 375, 28.0, 2.0),
    "photo": (3000, 2000, 6.0, 6.0),
    "photo-smooth": (3000, 2000, 0.0, 6.0),
}
QUICK_KINDS = {"imagenet": (100, 75, 28.0, None), "photo": (600, 400, 6.0, None)}
# Photos shrunk once so that the smallest crop (scale 0.5, aspect 4:3 on a 3:2 photo) is still >= 224 px a side:
# no crop is ever upsampled.
SHRINK_SIDE = 512


def write_images(root: Path, kind: str, count: int, shape: tuple) -> dict:
    """`count` JPEGs of one kind in an ImageFolder tree; sides vary +-10 %, half of them portrait."""
    import numpy as np

    width, height, grain, _ = shape
    rng = np.random.default_rng(len(kind))
    sizes = 0
    for n in range(count):
        w, h = int(width * rng.uniform(0.9, 1.1)), int(height * rng.uniform(0.9, 1.1))
        if n % 2:
            w, h = h, w
        path = root / kind / CLASSES[n % 2] / f"{n:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_photo(rng, w, h, n % len(CLASSES), grain).save(path, "JPEG", quality=90)
        sizes += path.stat().st_size
    return {"images": count, "mean_kb": round(sizes / count / 1000, 1), "width": width, "height": height}


def pipelines(folder: Path, size: int, batch: int):
    """name -> a function of the epoch that turns every file into batches once."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from train_pytorch_model.data import build_dataset, collate, sample_seed
    from train_pytorch_model.image_directory import load_image_directory
    from train_pytorch_model.preprocessing import Preprocessing, _full_scale_jpeg

    directory = load_image_directory(folder, "Training")
    dataset = build_dataset(directory, {c: i for i, c in enumerate(directory.categories)}, Preprocessing(size),
                            train=True, seed=1)
    rows = range(len(dataset))
    reference = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                            v2.PILToTensor()])
    paths = [directory.path(i) for i in rows]

    def ours(epoch: int) -> int:
        for start in range(0, len(rows), batch):
            images = collate([dataset[(i, epoch)] for i in rows[start:start + batch]]).images
        return images.shape[-1]

    def torchvision_reference(epoch: int) -> int:
        for start in range(0, len(paths), batch):
            images = torch.stack([reference(Image.open(p).convert("RGB")) for p in paths[start:start + batch]])
        return images.shape[-1]

    def decode_alone(epoch: int) -> int:
        """The floor: Pillow (libjpeg-turbo) decoding each file at the DCT scale `ours` chose for its crop."""
        for start in range(0, len(rows), batch):
            for i in rows[start:start + batch]:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(sample_seed(1, epoch, i))
                    box, _ = dataset.transform.params(*header_sizes[i])
                reduce = dataset.transform.dct_scale(box)
                with Image.open(paths[i]) as image:
                    if reduce > 1:
                        image.draft("RGB", (image.width // reduce, image.height // reduce))
                        image.load()
                    elif _full_scale_jpeg(image) is None:
                        image.load()
        return size

    header_sizes = []
    for path in paths:
        with Image.open(path) as image:
            header_sizes.append(image.size[::-1])
    return {"ours": ours, "reference": torchvision_reference, "decode_alone": decode_alone}, len(paths)


def shard_pipeline(folder: Path, size: int, batch: int, max_side: int) -> tuple[dict, int, float]:
    """`folder` converted once to Parquet shards shrunk to `max_side` (core-ms per image of that, timed), and
    `train`'s shard loader over them."""
    import torch

    from train_pytorch_model.convert import ShardOptions, convert
    from train_pytorch_model.data import build_dataset, training_loader
    from train_pytorch_model.image_directory import load_image_directory
    from train_pytorch_model.preprocessing import Preprocessing

    shards = folder.parent / f"{folder.name}-shards"
    start = time.process_time()
    convert(folder, shards, to="parquet", shards=ShardOptions(max_side=max_side))
    directory = load_image_directory(shards, "Training")
    convert_ms = 1000 * (time.process_time() - start) / len(directory)
    dataset = build_dataset(directory, {c: i for i, c in enumerate(directory.categories)}, Preprocessing(size),
                            train=True, seed=1)
    loader = training_loader(dataset, batch_size=batch, seed=1, rank=0, world_size=1, num_workers=0,
                             device=torch.device("cpu"))
    count = len(loader) * batch  # whole batches: the loader leaves the remainder out of an epoch

    def ours(epoch: int) -> int:
        loader.sampler.set_epoch(epoch)
        sizes = [batch_.images.shape[-1] for batch_ in loader]
        return sizes[-1]

    return {"ours": ours}, count, convert_ms


def measure(runs: dict, count: int, size: int, rounds: int) -> dict:
    """Core-ms per image of each pipeline (`count` images a pass) per round, taking turns; the first pass of each
    is a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds + 1):
        for name, run in runs.items():
            start = time.process_time()
            assert run(round_) == size
            if round_:
                times[name].append(1000 * (time.process_time() - start) / count)
    return {name: {"core_ms": statistics.median(values), "rounds": values} for name, values in times.items()}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Supply cost per core: file on disk -> augmented {report['size']}x{report['size']} uint8 batch", "",
             f"{m['cpu']}, {m['cpus_available']} CPUs, torch {m['torch']}; load average {report['load_before']} "
             f"before, {report['load_after']} after (a shared machine: ratios in one run are what to read). One "
             f"thread, CPU time, batches of {report['batch']}, medians of {report['rounds']} rounds taking turns.",
             f"Command: `{report['command']}`", "",
             "| images | mean file | ours core-ms | torchvision reference core-ms | reference / ours "
             "| of which the JPEG decode alone (at our DCT scale) | target |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, row in report["kinds"].items():
        data, ours = row["data"], row["ours"]["core_ms"]
        target = f"<= {row['target']:g}" if row.get("target") else "-"
        if "convert_once" in row:
            once = row["convert_once"]
            lines.append(f"| {kind}: the same photos after `convert --to parquet --max-side {once['max_side']}` "
                         f"(once: {once['core_ms']:.1f} core-ms per photo) | {data['shard_kb']:g} KB | **{ours:.2f}** "
                         f"| - | - | - | {target} |")
            continue
        ref = row["reference"]["core_ms"]
        lines.append(f"| {kind} ({data['images']} JPEGs ~{data['width']}x{data['height']}) | {data['mean_kb']:g} KB "
                     f"| **{ours:.2f}** | {ref:.2f} | {ref / ours:.2f}x | {row['decode_alone']['core_ms']:.2f} "
                     f"| {target} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="ImageNet-like JPEGs (default 48)")
    parser.add_argument("--photos", type=int, default=16, help="6 MP photos of each kind (default 16)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated (default {','.join(KINDS)})")
    parser.add_argument("--size", type=int, default=224, help="--image-size (default 224)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up (default 5)")
    parser.add_argument("--shrink", type=int, default=SHRINK_SIDE,
                        help=f"--max-side of the photo shards row (default {SHRINK_SIDE}; 0: no such row)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_output" / "supply")
    args = parser.parse_args(argv)
    kinds = {k: KINDS[k] for k in args.kinds.split(",")}
    if args.quick:
        kinds, args.images, args.photos, args.size, args.batch, args.rounds = QUICK_KINDS, 6, 4, 32, 4, 1
        args.shrink = 128 if args.shrink else 0
    sys.path.insert(0, str(REPO / "src"))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: what a DataLoader worker has
    report = {"command": " ".join(["python benchmarks/supply.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(), "size": args.size, "batch": args.batch, "rounds": args.rounds,
              "load_before": [round(x, 1) for x in os.getloadavg()], "kinds": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="supply-") as tmp:
            for kind, shape in kinds.items():
                count = args.images if kind == "imagenet" else args.photos
                data = write_images(Path(tmp), kind, count, shape)
                result = measure(*pipelines(Path(tmp) / kind, args.size, args.batch), args.size, args.rounds)
                report["kinds"][kind] = {"data": data, "target": shape[3], **result}
                print(f"  {kind:<13} ours {result['ours']['core_ms']:6.2f}  reference "
                      f"{result['reference']['core_ms']:6.2f} core-ms/image", flush=True)
                if kind == "photo" and args.shrink:
                    runs, shard_count, convert_ms = shard_pipeline(Path(tmp) / kind, args.size, args.batch, args.shrink)
                    result = {**measure(runs, shard_count, args.size, args.rounds),
                              "convert_once": {"core_ms": convert_ms, "max_side": args.shrink}}
                    shard_bytes = sum(p.stat().st_size for p in (Path(tmp) / "photo-shards").rglob("*.parquet"))
                    report["kinds"]["photo-shards"] = {
                        "data": {**data, "shard_kb": round(shard_bytes / count / 1000, 1)}, "target": shape[3],
                        **result}
                    print(f"  photo-shards  ours {result['ours']['core_ms']:6.2f} core-ms/image (convert once "
                          f"{result['convert_once']['core_ms']:.1f})", flush=True)
    finally:
        torch.set_num_threads(threads)
    report["load_after"] = [round(x, 1) for x in os.getloadavg()]
    write_results(args.out, "supply", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
