"""What a CPU training step costs under each setting `train` makes (issue 16, CPU target): deterministic
algorithms, intra-op threads, memory format; against a plain eager loop like timm's (no determinism, all
threads, NCHW). Each variant runs in a fresh process; variants are interleaved over --repeats rounds and the
medians compared as ratios, so a busy shared machine slows all of them alike.

    python benchmarks/cpu_step_factors.py                 # resnet18, 64 px, batch 16 (the issue's timm setting)
    python benchmarks/cpu_step_factors.py --repeats 5 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPUS = len(os.sched_getaffinity(0))
# name: (deterministic, threads, channels_last)
VARIANTS = {
    "eager (timm-like)": (False, CPUS, False),
    "+ deterministic": (True, CPUS, False),
    "threads 1": (False, 1, False),
    "channels_last": (False, CPUS, True),
}
# `train` on CPU with --num-workers 0 (train_command.configure_torch) is "+ deterministic": all threads, NCHW.


def measure(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "src"))
    from train_pytorch_model.config import TrainConfig
    from train_pytorch_model.models import Classifier, build_net
    from train_pytorch_model.preprocessing import Preprocessing
    from train_pytorch_model.train import make_optimizer

    deterministic, threads, channels_last = spec["variant"]
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = Classifier(build_net(spec["model"], 10)).to(memory_format=memory_format)
    optimizer = make_optimizer(model, TrainConfig(), 0.001, 10, torch.device("cpu"))
    prep = Preprocessing(image_size=spec["size"])
    images = torch.randint(0, 256, (spec["batch"], 3, spec["size"], spec["size"]), dtype=torch.uint8)
    targets = torch.randint(0, 10, (spec["batch"],))
    model.train()

    def step():
        loss = F.cross_entropy(model(prep.normalize(images).contiguous(memory_format=memory_format)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(spec["warmup"]):
        step()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    return {"ms_per_step": 1000 * (time.perf_counter() - start) / spec["steps"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_output" / "cpu_step_factors.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.repeats):
        for name, variant in VARIANTS.items():
            spec = {"variant": variant, "model": args.model, "size": args.size, "batch": args.batch,
                    "steps": args.steps, "warmup": args.warmup}
            done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True,
                                  text=True, env=env, check=True)
            times[name].append(json.loads(done.stdout.strip().splitlines()[-1])["ms_per_step"])
            print(f"  round {round_ + 1} {name:<20} {times[name][-1]:7.1f} ms/step", flush=True)
    base = statistics.median(times["eager (timm-like)"])
    print(f"\n{args.model} {args.size} px batch {args.batch}, {CPUS} CPUs, medians of {args.repeats}:\n")
    print("| variant | ms per step | / eager |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"times_ms": times, "cpus": CPUS, "args": vars(args) | {"out": str(args.out)}},
                                   indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
