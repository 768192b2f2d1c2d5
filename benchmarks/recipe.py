"""Recipe benchmark (issue 15): does the default training recipe learn on small data, from random init?

Each case's data is generated here (deterministic, nothing downloaded); each case is trained for each candidate
recipe (a named list of extra `train` flags) through the real CLI in a subprocess, then scored:

- digits: scikit-learn's digits as 32 px PNG class folders (the demo's stratified split), resnet18 from random
  init at exactly the designer defaults (5 epochs, batch 16, lr 0.001, patience 3) plus `--image-size 32`;
  test accuracy on the held-out split through `score` + `evaluate`. Target: mean >= 97 %, none below 96 %.
- colour-lr0.01 / colour-lr0.001: 36 solid-colour images in 3 classes (mixed sizes, PNG/BMP, RGB/grey/RGBA/
  palette modes) and 12 validation images, 10 epochs, batch 8, 64 px (to fit 2 cores); validation top-1 of the
  saved (best) epoch. Target: >= 95 %.
- pretrained: resnet18 trained by this trainer on digits 0-4, fine-tuned at the designer defaults on a few
  images of digits 5-9; test accuracy. Target: no regression against the original recipe.

    python benchmarks/recipe.py                                   # everything (about an hour on 2 cores)
    python benchmarks/recipe.py --cases colour-lr0.01 --recipes default,sgd --seeds 1 --max-epochs 2  # minutes

Rows go to <work>/recipe_results.json and .md as they finish, and accumulate across runs in one --work folder.
Accuracy is deterministic for a seed; time is a rough figure (shared machine). Each run uses --num-workers 0 and
OMP_NUM_THREADS=2 (--threads); a run's output is appended to <work>/recipe_runs.log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"

# A recipe is the `train` flags it adds to a case's own flags; "default" adds nothing (the build's defaults).
RECIPES: dict[str, list[str]] = {
    "default": [],
    "original": ["--optimizer", "sgd", "--bn-recalibration", "false"],  # the recipe before issue 15
    "sgd": ["--optimizer", "sgd", "--bn-recalibration", "true"],
    "sgd-crop": ["--optimizer", "sgd", "--bn-recalibration", "true", "--augmentation", "crop"],
    "adamw-nobn": ["--optimizer", "adamw", "--bn-recalibration", "false"],
    "adamw": ["--optimizer", "adamw", "--bn-recalibration", "true"],
    "adamw-crop": ["--optimizer", "adamw", "--bn-recalibration", "true", "--augmentation", "crop"],
    "adamw-ls": ["--optimizer", "adamw", "--bn-recalibration", "true", "--label-smoothing", "0.1"],
    "adamw-warmup1": ["--optimizer", "adamw", "--bn-recalibration", "true", "--warmup-epochs", "1"],
    "adamw-top1": ["--optimizer", "adamw", "--bn-recalibration", "true", "--early-stopping-metric", "valid_top1"],
    "adamw-ema": ["--optimizer", "adamw", "--bn-recalibration", "true", "--ema-decay", "0.99"],
}
SEEDS = (1, 2, 3)


@dataclass
class Case:
    name: str
    flags: list[str]  # the case's own `train` flags (besides data, seed and --num-workers 0)
    metric: str  # "test": score + evaluate the held-out split; "valid": best epoch's validation top-1
    target: str
    data: str  # which prepared data set (see prepare_data)
    tags: list[str] = field(default_factory=list)


DESIGNER = ["--epochs", "5", "--batch-size", "16", "--learning-rate", "0.001", "--patience", "3"]
CASES: dict[str, Case] = {
    "digits": Case("digits", [*DESIGNER, "--image-size", "32"], "test", "mean >= 97 %, each >= 96 %", "digits"),
    "colour-lr0.01": Case("colour-lr0.01", ["--epochs", "10", "--batch-size", "8", "--learning-rate", "0.01",
                                            "--image-size", "64"], "valid", ">= 95 %", "colour"),
    "colour-lr0.001": Case("colour-lr0.001", ["--epochs", "10", "--batch-size", "8", "--learning-rate", "0.001",
                                              "--image-size", "64"], "valid", ">= 95 %", "colour"),
    "pretrained": Case("pretrained", [*DESIGNER, "--image-size", "32"], "test", ">= original (no regression)",
                       "transfer"),
}
# Far apart in luminance too, so that the greyscale images still tell the classes apart.
COLOURS = {"red": (130, 10, 10), "green": (40, 200, 60), "blue": (170, 200, 255)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated random seeds")
    parser.add_argument("--work", type=Path, default=Path("recipe_benchmark"),
                        help="folder for data, models and results (data is reused between runs)")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap every case's epochs (a quick check)")
    parser.add_argument("--digits-per-class", type=int, default=None,
                        help="use only N digits per class (a quick check; the targets need all)")
    parser.add_argument("--image-size", type=int, default=None, help="override every case's image size (a quick check)")
    parser.add_argument("--threads", type=int, default=2,
                        help="OMP_NUM_THREADS of each run (default 2); 1 is far faster on an oversubscribed machine")
    args = parser.parse_args(argv)
    args.cases, args.recipes = args.cases.split(","), args.recipes.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.cases:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    for name in args.recipes:
        if name not in RECIPES:
            parser.error(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return args


THREADS = {"omp": "2"}  # --threads; 2 by default, for repeatable figures


def cli(*args: str, log: Path | None = None) -> subprocess.CompletedProcess:
    """One `python -m train_pytorch_model` step; its output goes to `log` (appended) when given."""
    env = {**os.environ, "OMP_NUM_THREADS": THREADS["omp"], "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "train_pytorch_model", *args]
    if log is None:
        return subprocess.run(command, env=env, capture_output=True, text=True)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(args)}\n")
        handle.flush()
        return subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)


def check(completed: subprocess.CompletedProcess, what: str) -> None:
    if completed.returncode != 0:
        raise SystemExit(f"{what} failed (exit {completed.returncode}):\n{completed.stderr or completed.stdout}")


def write_colour_folders(root: Path, per_class: int, seed: int) -> None:
    """Solid colours with a little shade jitter; mixed sizes, PNG/BMP and RGB/L/RGBA/P modes, as users upload."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes, modes = ((24, 24), (40, 30), (64, 64), (17, 50)), ("RGB", "L", "RGBA", "P")
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shade = np.clip(np.array(rgb) + rng.integers(-15, 16, size=3), 0, 255).astype(np.uint8)
            image = Image.new("RGB", sizes[i % len(sizes)], tuple(int(v) for v in shade))
            mode = modes[i % len(modes)]
            if mode == "P":
                image = image.quantize(colors=4)
            elif mode != "RGB":
                image = image.convert(mode)
            suffix = ".bmp" if i % 3 == 0 and mode != "RGBA" else ".png"
            image.save(root / name / f"{name}_{i:02d}{suffix}")


def class_subset(source: Path, target: Path, classes: list[str]) -> Path:
    for split in ("train", "valid", "test"):
        for name in classes:
            shutil.copytree(source / split / name, target / split / name, dirs_exist_ok=True)
    return target


def prepare_data(work: Path, name: str, digits_per_class: int | None, log: Path) -> dict[str, Path]:
    """Data set `name`'s train/valid(/test) folders and untrained model; written once per --work folder."""
    sys.path.insert(0, str(SRC))  # this checkout's package, as the subprocesses get it
    from train_pytorch_model.demo import write_digit_folders

    data = work / "data" / f"digits{digits_per_class or 'all'}"
    untrained = data / "resnet18"
    if not (untrained / "model").is_file():
        shutil.rmtree(untrained, ignore_errors=True)
        check(cli("init-model", "--model-name", "resnet18", "--pretrained", "false",
                  "--untrained-model", str(untrained)), "init-model")
    done = data / f"{name}.done"
    if name == "colour":
        if not done.is_file():  # (a change of COLOURS needs a new --work folder)
            shutil.rmtree(data / "colour", ignore_errors=True)
            write_colour_folders(data / "colour" / "train", per_class=12, seed=0)
            write_colour_folders(data / "colour" / "valid", per_class=4, seed=1)
        paths = {"train": data / "colour" / "train", "valid": data / "colour" / "valid", "untrained": untrained}
    elif name == "digits":
        if not done.is_file():
            shutil.rmtree(data / "digits", ignore_errors=True)
            write_digit_folders(data / "digits", digits_per_class)
        paths = {split: data / "digits" / split for split in ("train", "valid", "test")}
        paths["untrained"] = untrained
    else:  # transfer: pre-train on digits 0-4, fine-tune on a few images of the other five digits
        digits = prepare_data(work, "digits", digits_per_class, log)
        base = data / "base"
        if not done.is_file():
            for folder in ("digits0-4", "few", "digits5-9", "base"):
                shutil.rmtree(data / folder, ignore_errors=True)
            class_subset(digits["train"].parent, data / "digits0-4", [str(d) for d in range(5)])
            write_digit_folders(data / "few", per_class=min(60, digits_per_class or 60))
            class_subset(data / "few", data / "digits5-9", [str(d) for d in range(5, 10)])
            # The "pretrained" weights: a fixed recipe, not the one under test.
            check(cli("train", "--untrained-model", str(untrained), "--training-data", str(data / "digits0-4/train"),
                      "--validation-data", str(data / "digits0-4/valid"), "--trained-model", str(base),
                      "--optimizer", "adamw", "--epochs", "2", "--image-size", "32", "--augmentation", "crop",
                      "--num-workers", "0", "--print-freq", "1000", log=log), "pre-training on digits 0-4")
        paths = {split: data / "digits5-9" / split for split in ("train", "valid", "test")}
        paths["untrained"] = base
    done.write_text("")
    return paths


def supported_flags() -> str:
    completed = cli("train", "--help")
    check(completed, "train --help")
    return completed.stdout


def case_flags(case: Case, max_epochs: int | None, image_size: int | None) -> list[str]:
    flags = list(case.flags)
    if max_epochs is not None:
        at = flags.index("--epochs") + 1
        flags[at] = str(min(int(flags[at]), max_epochs))
    if image_size is not None:
        flags[flags.index("--image-size") + 1] = str(image_size)
    return flags


def run_one(case: Case, recipe: str, seed: int, paths: dict[str, Path], run_dir: Path, flags: list[str],
            log: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    row = {"case": case.name, "recipe": recipe, "seed": seed, "metric": case.metric, "accuracy": None,
           "epochs_run": None, "best_epoch": None, "seconds": None, "error": None,
           "train_flags": [*flags, *RECIPES[recipe]]}
    started = time.perf_counter()
    trained = run_dir / "trained_model"
    completed = cli("train", "--untrained-model", str(paths["untrained"]), "--training-data", str(paths["train"]),
                    "--validation-data", str(paths["valid"]), "--trained-model", str(trained),
                    "--random-seed", str(seed), "--num-workers", "0", "--print-freq", "1000",
                    *flags, *RECIPES[recipe], log=log)
    row["seconds"] = round(time.perf_counter() - started, 1)
    if completed.returncode != 0:
        row["error"] = f"train exit {completed.returncode} (see {log})"
        return row
    training = json.loads((trained / "training_info.json").read_text())["training"]
    row["epochs_run"], row["best_epoch"] = training["epochs_run"], training["best_epoch"]
    if case.metric == "valid":
        row["accuracy"] = training["best_valid_top1"]
        return row
    scored, evaluation = run_dir / "scored", run_dir / "evaluation"
    for step in (("score", "--trained-model", str(trained), "--image-directory", str(paths["test"]),
                  "--scored-data", str(scored), "--num-workers", "0"),
                 ("evaluate", "--scored-data", str(scored), "--evaluation", str(evaluation))):
        completed = cli(*step, log=log)
        if completed.returncode != 0:
            row["error"] = f"{step[0]} exit {completed.returncode} (see {log})"
            return row
    row["accuracy"] = json.loads((evaluation / "metrics.json").read_text())["accuracy"]
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per case and recipe: mean and minimum accuracy over the seeds that ran."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row["accuracy"] is not None:
            groups.setdefault((row["case"], row["recipe"]), []).append(row["accuracy"])
    return [{"case": case, "recipe": recipe, "runs": len(values), "mean": statistics.mean(values),
             "min": min(values)} for (case, recipe), values in groups.items()]


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}; --num-workers 0. Time is rough (shared machine).", "",
             "| case | recipe | seed | accuracy | epochs run (best) | time | threads |", "|---" * 7 + "|"]
    for r in rows:
        accuracy = percent(r["accuracy"]) if r["error"] is None else f"error: {r['error']}"
        epochs = "-" if r["epochs_run"] is None else f"{r['epochs_run']} ({r['best_epoch']})"
        lines.append(f"| {r['case']} | {r['recipe']} | {r['seed']} | {accuracy} | {epochs} | {r['seconds']} s "
                     f"| {r.get('threads', 2)} |")
    lines += ["", "| case | recipe | runs | mean | min | target |", "|---|---|---|---|---|---|"]
    for s in summarize(rows):
        lines.append(f"| {s['case']} | {s['recipe']} | {s['runs']} | {percent(s['mean'])} | {percent(s['min'])} "
                     f"| {CASES[s['case']].target} |")
    return "\n".join(lines) + "\n"


def machine_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def record(results: Path, row: dict) -> list[dict]:
    """Rows accumulate in one --work folder (read again before each write: runs may go side by side); a rerun of a
    (case, recipe, seed) replaces its earlier row."""
    rows = json.loads(results.read_text())["rows"] if results.is_file() else []
    key = (row["case"], row["recipe"], row["seed"])
    return [r for r in rows if (r["case"], r["recipe"], r["seed"]) != key] + [row]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    THREADS["omp"] = str(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "recipe_runs.log"
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    print(f"Preparing data under {work} ...", flush=True)
    sets = {CASES[c].data: prepare_data(work, CASES[c].data, args.digits_per_class, log) for c in args.cases}
    help_text = supported_flags()
    machine = machine_name()
    commit = subprocess.run(["git", "-C", str(SRC), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None  # which trainer the rows measured
    if args.max_epochs or args.image_size or args.digits_per_class:
        machine += f" (quick check: --max-epochs {args.max_epochs} --image-size {args.image_size} " \
                   f"--digits-per-class {args.digits_per_class}; not the benchmark's figures)"
    results = work / "recipe_results.json"
    for case_name in args.cases:
        case = CASES[case_name]
        for recipe in args.recipes:
            missing = [f for f in RECIPES[recipe] if f.startswith("--") and f not in help_text]
            for seed in args.seeds:
                if missing:
                    row = {"case": case.name, "recipe": recipe, "seed": seed, "metric": case.metric,
                           "accuracy": None, "epochs_run": None, "best_epoch": None, "seconds": None,
                           "error": f"train has no {', '.join(missing)}"}
                else:
                    row = run_one(case, recipe, seed, sets[case.data], work / "runs" / f"{case_name}-{recipe}-{seed}",
                                  case_flags(case, args.max_epochs, args.image_size), log)
                row["commit"], row["threads"] = commit, args.threads
                rows = record(results, row)
                print(f"{case.name:15} {recipe:14} seed {seed}  {percent(row['accuracy']):>8}  "
                      f"epochs {row['epochs_run']} (best {row['best_epoch']})  {row['seconds']} s"
                      + (f"  {row['error']}" if row["error"] else ""), flush=True)
                results.write_text(json.dumps(
                    {"machine": machine, "argv": sys.argv[1:] if argv is None else argv, "rows": rows,
                     "summary": summarize(rows)}, indent=2) + "\n")
                (work / "recipe_results.md").write_text(markdown(rows, machine))
    rows = json.loads(results.read_text())["rows"] if results.is_file() else []
    print("\n" + markdown(rows, machine), flush=True)
    return 0 if all(r["error"] is None or r["error"].startswith("train has no") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
