"""CPU training steps under each OpenMP wait policy, on a quiet and on a busy machine (issue 22).

    python benchmarks/omp_wait_policy.py                  # ~3 minutes on 2 cores
    python benchmarks/omp_wait_policy.py --quick          # a smoke run (tests/test_benchmark.py runs it)

OpenMP threads that reach a barrier wait for the others by spinning (libgomp's default: ~300,000 spins, then
sleep). When another process holds one of the cores, the thread that was descheduled holds up every other,
which spins away its own time slice meanwhile: the step slows down by far more than the core share lost.
`OMP_WAIT_POLICY=PASSIVE` makes waiting threads sleep at once; `GOMP_SPINCOUNT` shortens the spin.

Each policy runs in a fresh process (it must be set before torch loads OpenMP): resnet18 training steps
(forward, backward, fused SGD) on one in-memory batch with every CPU as a thread, the policies taking turns
over `--rounds` rounds. Twice: as the machine is, and with `--busy` extra processes spinning meanwhile (the
load another job makes). Medians; ratios to the default policy within the same condition.

Results: <out>/omp_wait_policy.json and .md. Timing is never asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, write_results  # noqa: E402

POLICIES = {"default (unset)": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"}, "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
            "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"}}


def steps_per_second(size: int, batch: int, steps: int) -> dict:
    """Inside a measurement process: training steps per second after two warm-up steps."""
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    images, targets = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step():
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = time.perf_counter() - start
    return {"images_per_second": steps * batch / seconds, "threads": torch.get_num_threads(),
            "loss": float(loss)}


def policy_env(name: str) -> dict:
    """The environment of a policy named in POLICIES, or of any `GOMP_SPINCOUNT=N`."""
    if name in POLICIES:
        return POLICIES[name]
    key, _, value = name.partition("=")
    if key != "GOMP_SPINCOUNT" or not value.isdigit():
        raise SystemExit(f"unknown policy {name!r}: one of {', '.join(POLICIES)}, or GOMP_SPINCOUNT=N")
    return {key: value}


def spin(stop) -> None:
    while not stop.is_set():
        pass


def run(policy: dict, spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | policy
    done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    m = report["machine"]
    baseline = next(iter(next(iter(report["conditions"].values()))))  # the first policy named
    lines = [f"# OpenMP wait policy: CPU training steps, resnet18 {report['size']} px, batch {report['batch']}", "",
             f"{m['cpu']}, {m['cpus_available']} CPUs (every CPU a thread), torch {m['torch']}; load average "
             f"{report['load_before']} before, {report['load_after']} after. Medians of {report['rounds']} rounds, "
             "policies taking turns, each in a fresh process.", f"Command: `{report['command']}`", "",
             f"| condition | policy | img/s | / {baseline} |", "|---|---|---:|---:|"]
    for condition, results in report["conditions"].items():
        base = next(iter(results.values()))["median"]
        for name, row in results.items():
            lines.append(f"| {condition} | {name} | {row['median']:.1f} | {row['median'] / base:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process (default 8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes of the busy condition (default 2)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="comma-separated: from the default list, or GOMP_SPINCOUNT=N (the first is the baseline)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_output" / "omp_wait_policy")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(steps_per_second(spec["size"], spec["batch"], spec["steps"])))
        return 0
    if args.quick:
        args.size, args.batch, args.steps, args.rounds, args.busy = 32, 2, 1, 1, 1
    spec = {"size": args.size, "batch": args.batch, "steps": args.steps}
    report = {"command": " ".join(["python benchmarks/omp_wait_policy.py", *(argv if argv is not None else
                                                                            sys.argv[1:])]),
              "machine": machine(), "size": args.size, "batch": args.batch, "rounds": args.rounds,
              "load_before": [round(x, 1) for x in os.getloadavg()], "conditions": {}}
    policies = {name: policy_env(name) for name in args.policies.split(",")}
    conditions = (("as the machine is", 0), (f"+ {args.busy} busy processes", args.busy))
    for condition, busy in conditions if args.busy else conditions[:1]:
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
        for process in spinners:
            process.start()
        try:
            rates: dict[str, list[float]] = {name: [] for name in policies}
            for _ in range(args.rounds):
                for name, policy in policies.items():
                    rates[name].append(run(policy, spec)["images_per_second"])
                    print(f"  {condition:<22} {name:<16} {rates[name][-1]:7.1f} img/s", flush=True)
        finally:
            stop.set()
            for process in spinners:
                process.join()
        report["conditions"][condition] = {name: {"median": statistics.median(values), "rounds": values}
                                           for name, values in rates.items()}
    report["load_after"] = [round(x, 1) for x in os.getloadavg()]
    write_results(args.out, "omp_wait_policy", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
