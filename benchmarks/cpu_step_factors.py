"""What a CPU training step costs under each setting `train` makes (issue 16, CPU target): the optimizer and its
implementation, deterministic algorithms, intra-op threads, memory format, the model's implementation; against a
plain eager loop like timm's `train.py` (SGD in torch's default implementation, no determinism, all threads, NCHW);
then the optimizer step alone, in torch's default (foreach) implementation and fused.

All variants live in one process and take turns, `--steps` steps each, over `--rounds` rounds; each variant's
figure is the median of its turns and is compared as a ratio. On a shared machine whose speed drifts by 30 %
within a minute, turns of a second or two keep the drift out of the ratios (separate processes did not).
benchmarks/timm_comparison.py times whole epochs.

    python benchmarks/cpu_step_factors.py                 # resnet18, 64 px, batch 16 (the issue's timm setting)
    python benchmarks/cpu_step_factors.py --rounds 30 --steps 10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPUS = len(os.sched_getaffinity(0))
EAGER = {"deterministic": False, "threads": CPUS, "channels_last": False, "optimizer": "sgd", "fused": False,
         "model": "torchvision"}
TRAIN = EAGER | {"deterministic": True, "fused": True}
VARIANTS = {
    "eager SGD (timm-like)": EAGER,  # torch's default optimizer implementation (foreach), as timm's train.py
    "+ fused optimizer": EAGER | {"fused": True},
    "+ deterministic": EAGER | {"deterministic": True},
    "train --optimizer sgd (fused, deterministic)": TRAIN,
    "train (AdamW fused, deterministic)": TRAIN | {"optimizer": "adamw"},
    "AdamW foreach, deterministic (train before)": TRAIN | {"optimizer": "adamw", "fused": False},
    "threads 1": EAGER | {"threads": 1},
    "channels_last": EAGER | {"channels_last": True},
    "timm's resnet18": EAGER | {"model": "timm"},  # only when timm is installed
}
# `train` on a CPU with --num-workers 0 (train_command.configure_torch): deterministic, all threads, NCHW.


def build(variant: dict, model_name: str, size: int, batch: int):
    """One variant's training step, as `train` builds it (or as timm's loop does)."""
    import torch
    import torch.nn.functional as F

    from train_pytorch_model.config import TrainConfig
    from train_pytorch_model.models import Classifier, build_net
    from train_pytorch_model.preprocessing import Preprocessing
    from train_pytorch_model.train import make_optimizer

    torch.manual_seed(0)
    memory_format = torch.channels_last if variant["channels_last"] else torch.contiguous_format
    if variant["model"] == "timm":
        import timm

        net = timm.create_model(model_name, num_classes=10)
    else:
        net = build_net(model_name, 10)
    model = Classifier(net).to(memory_format=memory_format).train()
    # make_optimizer fuses on a CPU; for a device type it does not fuse on, it leaves torch's default (foreach).
    device_type = "cpu" if variant["fused"] else "meta"
    optimizer = make_optimizer(model, TrainConfig(optimizer=variant["optimizer"]), 0.001, torch.device(device_type))
    prep = Preprocessing(image_size=size)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    targets = torch.randint(0, 10, (batch,))

    def step():
        torch.set_num_threads(variant["threads"])
        torch.use_deterministic_algorithms(variant["deterministic"], warn_only=True)
        loss = F.cross_entropy(model(prep.normalize(images).contiguous(memory_format=memory_format)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def optimizer_steps(model_name: str, rounds: int) -> dict[str, list[float]]:
    """ms per optimizer step alone (random gradients), torch's default implementation against fused."""
    import torch

    from train_pytorch_model.config import TrainConfig
    from train_pytorch_model.models import Classifier, build_net
    from train_pytorch_model.train import make_optimizer

    model = Classifier(build_net(model_name, 10))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = {f"{name} {'fused' if device == 'cpu' else 'foreach'}":
                  make_optimizer(model, TrainConfig(optimizer=name), 0.001, torch.device(device))
                  for name in ("sgd", "adamw") for device in ("meta", "cpu")}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            for _ in range(5):
                optimizer.step()
            times[name].append(1000 * (time.perf_counter() - start) / 5)
    return times


def table(times: dict[str, list[float]]) -> str:
    base = statistics.median(times["eager SGD (timm-like)"])
    lines = ["| variant | ms per step | / eager SGD |", "|---|---:|---:|"]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="per turn")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps per variant before the first round")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_output" / "cpu_step_factors.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    timm = importlib.util.find_spec("timm") is not None
    variants = {name: v for name, v in VARIANTS.items() if v["model"] != "timm" or timm}
    steps = {name: build(v, args.model, args.size, args.batch) for name, v in variants.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append(1000 * (time.perf_counter() - start) / args.steps)
    print(f"{args.model} {args.size} px batch {args.batch}, {CPUS} CPUs, medians of {args.rounds} turns x "
          f"{args.steps} steps{'' if timm else ' (timm not installed)'}:\n")
    print(table(times))
    optimizer_times = optimizer_steps(args.model, args.rounds)
    print(f"\n{args.model}'s optimizer step alone, medians of {args.rounds} turns x 5 steps:\n")
    print("| optimizer | ms per step |\n|---|---:|")
    print("\n".join(f"| {name} | {statistics.median(v):.1f} |" for name, v in optimizer_times.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"times_ms": times, "optimizer_step_ms": optimizer_times, "cpus": CPUS,
                                    "args": vars(args) | {"out": str(args.out)}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
