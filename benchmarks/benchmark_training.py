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
- eval:     validation throughput inside `train` (Trainer.evaluate, and the BatchNorm re-estimation before it) vs an
            in-memory inference ceiling.
- workers:  `train` with --num-workers 0, 1, 2, ... (the data behind default_num_workers).
- index:    load_image_directory on generated images.lst files of 100k and 1M rows: seconds and memory.
- memory:   peak memory of `train` at 2k vs 20k rows (the 20k-row images.lst repeats the generated files).
- fixture:  `train` on the legacy fixture ImageDirectory (a compatibility check; too small to time).

Results: <out>/benchmark.json and <out>/benchmark.md (a markdown table). Timing is never asserted.

This file is the entry point (`make benchmark`, gpu_check.sh) and the measurement runner; the suites live in
speed.py and throughput.py, shared helpers in common.py; supply.py (per-core decode cost) and the comparisons
(timm_comparison.py, cpu_step_factors.py, omp_wait_policy.py, recipe.py) are scripts of their own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suites import their shared helpers by name

import speed  # noqa: E402
import throughput  # noqa: E402
from common import REPO, write_image_list, write_photos  # noqa: E402,F401  (the tests' and gpu_check's names)
from speed import (  # noqa: E402,F401
    measure_baseline,
    measure_ceiling,
    measure_decode,
    measure_eval_ceiling,
    measure_index,
    measure_train,
)
from throughput import measure_end_to_end, measure_supply  # noqa: E402,F401

MEASUREMENTS = {"ceiling": measure_ceiling, "eval_ceiling": measure_eval_ceiling, "train": measure_train,
                "baseline": measure_baseline, "decode": measure_decode, "index": measure_index,
                "supply": measure_supply, "end_to_end": measure_end_to_end}


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
        return throughput.run_throughput_suite(args, argv)
    return speed.run_speed_suite(args, argv)


if __name__ == "__main__":
    sys.exit(main())
