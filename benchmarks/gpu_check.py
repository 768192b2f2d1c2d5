"""The GPU check's body (benchmarks/gpu_check.sh sets up Python, then runs this): environment, nvidia-smi, the
nvJPEG hazard script, the throughput suite of benchmark_training.py, and one summary, inside a time budget.

Generated data and the suite's own files stay in --work (a temporary folder); --out gets at most 8 files:
summary.md (img/s, fraction of the eager ceiling, of batch 256, the hazard's result, what was skipped),
throughput.json, hazard.md, environment.txt, nvidia-smi.txt, logs.txt (the tail of every measurement's log) and
gpu_check.log (written by gpu_check.sh). --smoke runs the same steps on the CPU at toy size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_LOG_BYTES = 8 * 2**20  # logs.txt: every measurement's tail, within the 16 MiB a results file may take
LOG_TAIL_LINES = 150
TARGETS = {"imagenet": 0.90, "photos": 0.80}  # end to end / eager ceiling, batch 256 (issue 22)


def run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, timeout), **kwargs)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return subprocess.CompletedProcess(command, 124, out, f"stopped after {timeout:.0f}s (time budget)")
    except OSError as exc:
        return subprocess.CompletedProcess(command, 127, "", str(exc))


def environment(smoke: bool) -> str:
    import torch
    import torchvision

    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"mode: {'smoke (CPU, toy size)' if smoke else 'GPU'}",
             f"python: {sys.version.split()[0]} ({sys.executable})", f"platform: {platform.platform()}",
             f"torch: {torch.__version__} ({Path(torch.__file__).parent}), CUDA {torch.version.cuda}, "
             f"cuDNN {torch.backends.cudnn.version()}", f"torchvision: {torchvision.__version__}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible, "
                     f"bf16 {torch.cuda.is_bf16_supported()}")
    try:
        import mlflow

        lines.append(f"mlflow: {mlflow.__version__} ({Path(mlflow.__file__).parent})")
    except ImportError as exc:
        lines.append(f"mlflow: not importable ({exc})")
    cpus = len(os.sched_getaffinity(0))
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else 0
    lines += [f"CPUs: {cpus} available ({os.cpu_count()} online), /dev/shm {shm:.1f} GiB",
              f"cpu: {cpu_name()}", f"memory: {memory_gib():.0f} GiB",
              f"git: {run(['git', '-C', str(HERE.parent), 'rev-parse', 'HEAD'], 10).stdout.strip() or 'no git'}",
              f"PYTHONPATH: {os.environ.get('PYTHONPATH', '')}"]
    lines += [f"{k}: {v}" for k, v in sorted(os.environ.items())
              if k.startswith(("CUDA_", "NVIDIA_", "OMP_", "TORCH", "PYTORCH_", "NCCL_"))]
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def summary(report: dict, hazard: str, smoke: bool) -> str:
    rows = report.get("results", [])
    ceiling = {(r["model"], r["batch_size"]): r["images_per_second"] for r in rows
               if r["measure"] == "ceiling" and not r.get("compile")}
    batches = sorted({b for _, b in ceiling}, reverse=True)
    big = batches[0] if batches else None
    m = report.get("machine", {})
    lines = ["# GPU check" + (" (smoke run on the CPU, toy sizes: checks the path, not the speed)" if smoke else ""),
             "", f"Machine: {m.get('gpu', 'no GPU')}; {m.get('cpu', '?')}, {m.get('cpus_available', '?')} CPUs; "
             f"torch {m.get('torch', '?')}. Image size {report.get('image_size')}, bf16 autocast and channels_last "
             "on the GPU. Datasets (generated): " + "; ".join(
                 f"{k}: {d['images']} JPEGs, {d['sides']}, {d['megabytes']} MB"
                 for k, d in report.get("datasets", {}).items()) + ".", "",
             f"| measurement | img/s | / eager ceiling (same batch) | / batch {big} of the same measurement | "
             "target | host syncs per step |", "|---|---:|---:|---:|---:|---:|"]
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        base = ceiling.get((r.get("model"), r.get("batch_size")))
        fraction = f"{r['images_per_second'] / base:.2f}" if base and r["measure"] != "supply" else "-"
        if r["measure"] == "supply" and big:  # what the loader alone supplies, against the first model's ceiling
            first = [v for (_, b), v in ceiling.items() if b == r.get("batch_size")]
            fraction = f"{r['images_per_second'] / first[0]:.2f} (supply)" if first else "-"
        of_big = "-"
        if big and r.get("batch_size") and r["batch_size"] != big:
            twin = by_name.get(r["name"].replace(f" b{r['batch_size']}", f" b{big}"))
            of_big = f"{r['images_per_second'] / twin['images_per_second']:.2f}" if twin else "-"
        target = TARGETS.get(r.get("kind")) if r["measure"] == "end_to_end" and r.get("batch_size") == big else None
        syncs = f"{r['host_syncs_per_step']:.3f}" if "host_syncs_per_step" in r else "-"
        lines.append(f"| {r['name']} | {r['images_per_second']:.0f} | {fraction} | {of_big} | "
                     f"{f'>= {target:.2f}' if target else '-'} | {syncs} |")
    for name, why in report.get("skipped", []):
        lines.append(f"| {name} | skipped: {why} | | | | |")
    for name, why in report.get("failed", []):
        lines.append(f"| {name} | FAILED: {' '.join(why.split())[-200:]} | | | | |")
    lines += ["", "## nvJPEG stream hazard (benchmarks/nvjpeg_hazard.py)", "", hazard.strip(), "",
              f"Suite command: `{report.get('command', '-')}`; {report.get('seconds', 0):.0f}s."]
    return "\n".join(lines) + "\n"


def collect_logs(logs: Path, into: Path) -> None:
    parts = []
    for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        parts.append(f"===== {log.name} (last {len(tail)} lines) =====\n" + "\n".join(tail) + "\n")
    text = "".join(parts) or "no measurement logs\n"
    into.write_text(text[-MAX_LOG_BYTES:])


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="a temporary folder: generated data, suite files")
    parser.add_argument("--budget-seconds", type=float, default=430)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def left() -> float:
        return args.budget_seconds - (time.monotonic() - started)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (GPU_CHECK_SMOKE=1 runs the CPU smoke check)", file=sys.stderr)
        return 2
    (args.out / "environment.txt").write_text(environment(args.smoke))
    smi = run(["nvidia-smi"], 30)
    (args.out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr if smi.returncode != 127 else
                                             f"nvidia-smi not found ({smi.stderr})\n")
    print(f"[gpu_check] environment written; hazard check ({left():.0f}s left)", flush=True)
    hazard = run([sys.executable, str(HERE / "nvjpeg_hazard.py"), "--iterations", "3" if args.smoke else "100",
                  "--out", str(args.out / "hazard.md")], min(150.0, left() / 3))
    print(hazard.stdout + hazard.stderr, flush=True)
    if not (args.out / "hazard.md").is_file():
        (args.out / "hazard.md").write_text(hazard.stdout + hazard.stderr + f"\nexit status {hazard.returncode}\n")
    suite_out = args.work / "suite"
    suite = [sys.executable, str(HERE / "benchmark_training.py"), "--suite", "throughput", "--out", str(suite_out)]
    if args.smoke:
        suite += ["--device", "cpu", "--quick", "--batch-sizes", "4", "--model", "resnet18"]
    else:
        # 15 s of timing per measurement: what fits 8 minutes in the suite's order (ceiling, end to end on both
        # kinds of image, batch 16, DenseNet-121, then the rest); the end-to-end rows cycle the generated files.
        suite += ["--device", "cuda", "--model", "resnet50,densenet121", "--batch-sizes", "256,16",
                  "--image-sizes", "224", "--images", "2048", "--photo-images", "512",
                  "--max-seconds", os.environ.get("MAX_SECONDS", "15")]
    budget = left() - 12  # the summary, the copies and the suite's own wind-down
    print(f"[gpu_check] throughput suite, budget {budget:.0f}s: {' '.join(suite)}", flush=True)
    process = None
    if budget > 30:
        try:
            process = subprocess.run([*suite, "--budget-seconds", f"{budget:.0f}"], timeout=budget + 20)
        except subprocess.TimeoutExpired:  # the suite skips what would not fit; this is the backstop
            process = subprocess.CompletedProcess(suite, 124)
    report_file = suite_out / "throughput.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {
        "results": [], "skipped": [("throughput suite", "no time left" if process is None else
                                    f"exit status {process.returncode}, no report")]}
    if report_file.is_file():
        shutil.copyfile(report_file, args.out / "throughput.json")
    collect_logs(suite_out / "logs", args.out / "logs.txt")
    text = summary(report, (args.out / "hazard.md").read_text(), args.smoke)
    (args.out / "summary.md").write_text(text)
    print(text, flush=True)
    failed = bool(report.get("failed")) or hazard.returncode != 0 or not report_file.is_file()
    print(f"[gpu_check] done in {time.monotonic() - started:.0f}s; results in {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
