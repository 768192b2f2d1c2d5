"""`make demo` (`python -m train_pytorch_model.demo`): the whole designer pipeline on real data, locally.

Data: scikit-learn's bundled handwritten digits (1,797 labeled 8x8 greyscale images, 10 classes;
installed with scikit-learn, nothing is downloaded). They are written as PNG files in
<digit>/<n>.png folders and split, stratified with a fixed seed, into training (70%), validation
(10%, drives early stopping and the best epoch) and a held-out test set (20%, only scored and
evaluated). Then the same CLI a user runs does each step, printed before it runs:

    convert (x3) -> init-model -> train -> score (test set) -> evaluate (report.html)

For scale, the demo also fits the classifier of scikit-learn's published "Recognizing
hand-written digits" example (an SVC on the raw pixels) on the same training + validation images
and reports its accuracy on the same test set.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MARKER = ".train_pytorch_model_demo"  # only a folder carrying it is ever cleared by the demo
PUBLISHED_BASELINE = ("scikit-learn example 'Recognizing hand-written digits' (SVC, gamma=0.001, "
                      "50/50 split): 97% accuracy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train_pytorch_model.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo_output"),
                        help="folder for everything the demo writes; cleared first if an earlier demo made it")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default %(default)s)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="use only the first N images of each digit (a quicker, less accurate run)")
    parser.add_argument("--model-name", default="resnet18", help="architecture for init-model (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="training image size (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=0.002, help="peak learning rate (default %(default)s)")
    parser.add_argument("--print-freq", type=int, default=10,
                        help="training progress line every N steps (default %(default)s)")
    return parser.parse_args(argv)


def prepare_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise SystemExit(f"'{out}' exists and was not made by the demo; give another --output.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("Written by python -m train_pytorch_model.demo; deleted by the next demo run.\n")


def write_digit_folders(root: Path, per_class: int | None = None, seed: int = 0) -> dict:
    """train/valid/test ImageFolder trees of scikit-learn's digits, and the SVC baseline on the same split."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    rows = np.arange(len(digits.target))
    if per_class is not None:
        rows = np.concatenate([rows[digits.target == d][:per_class] for d in range(10)])
    targets = digits.target[rows]
    rest, test = train_test_split(rows, test_size=0.2, stratify=targets, random_state=seed)
    train, valid = train_test_split(rest, test_size=0.125, stratify=digits.target[rest], random_state=seed)
    # 17 grey levels (0..16) -> 0..255, so the PNGs look like what they are.
    pixels = np.round(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    for split, split_rows in (("train", train), ("valid", valid), ("test", test)):
        for row in split_rows:
            folder = root / split / str(digits.target[row])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[row]).save(folder / f"{row:04d}.png")

    flat = digits.images.reshape(len(digits.images), -1)
    svc = SVC(gamma=0.001).fit(flat[rest], digits.target[rest])
    svc_accuracy = float((svc.predict(flat[test]) == digits.target[test]).mean())
    return {"train": len(train), "valid": len(valid), "test": len(test), "svc_accuracy": svc_accuracy}


def run_step(number: int, title: str, args: list[str], env: dict) -> None:
    print(f"\n[{number}] {title}\n$ python -m train_pytorch_model {shlex.join(args)}", flush=True)
    completed = subprocess.run([sys.executable, "-m", "train_pytorch_model", *args], env=env)
    if completed.returncode != 0:
        raise SystemExit(f"Step {number} ({title}) failed with exit code {completed.returncode}; see the error above.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = args.output
    prepare_output(out)
    env = dict(os.environ)
    # Keep the demo's MLflow runs next to its other outputs unless the user chose a store.
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(out / 'mlflow.db').resolve()}")
    env.setdefault("PYTHONUNBUFFERED", "1")

    print(f"[0] Writing scikit-learn's digits as PNG folders under {out / 'digits'} ...", flush=True)
    split = write_digit_folders(out / "digits", args.per_class)
    print(f"    {split['train']} training, {split['valid']} validation, {split['test']} test images (10 classes)")

    d = {name: str(out / name) for name in ("train_images", "valid_images", "test_images", "untrained_model",
                                            "trained_model", "scored", "evaluation")}
    for number, name in enumerate(("train", "valid", "test"), start=1):
        run_step(number, f"Convert the {name} folder to an ImageDirectory",
                 ["convert", "--input", str(out / "digits" / name), "--image-directory", d[f"{name}_images"]], env)
    run_step(4, "Create an untrained model directory",
             # From scratch, explicitly: the demo never reaches the network, whatever init-model defaults to.
             ["init-model", "--model-name", args.model_name, "--pretrained", "false",
              "--untrained-model", d["untrained_model"]], env)
    run_step(5, "Train", [
        "train", "--untrained-model", d["untrained_model"], "--training-data", d["train_images"],
        "--validation-data", d["valid_images"], "--trained-model", d["trained_model"],
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
        # The default recipe (AdamW, random crops without flips, BatchNorm re-estimation: docs/recipe.md).
        "--image-size", str(args.image_size), "--print-freq", str(args.print_freq),
    ], env)
    run_step(6, "Score the held-out test images",
             ["score", "--trained-model", d["trained_model"], "--image-directory", d["test_images"],
              "--scored-data", d["scored"]], env)
    run_step(7, "Evaluate, with a report page of pictures",
             ["evaluate", "--scored-data", d["scored"], "--evaluation", d["evaluation"],
              # The model and images too: the report's gallery of mistakes shows each image and its heat map.
              "--trained-model", d["trained_model"], "--image-directory", d["test_images"]], env)

    metrics = json.loads((Path(d["evaluation"]) / "metrics.json").read_text())
    minutes, seconds = divmod(time.perf_counter() - started, 60)
    print(f"""
Demo finished in {int(minutes)} min {seconds:.0f} s.
  Test accuracy ({args.model_name}, {metrics['evaluated_rows']} held-out images): {metrics['accuracy']:.2%}
  Baseline, same split: SVC on raw pixels {split['svc_accuracy']:.2%}; published: {PUBLISHED_BASELINE}
  Trained model:     {d['trained_model']}  (designer ModelDirectory + MLflow model)
  Training pictures: {Path(d['trained_model']) / 'training_curves.png'}, training_images.png,
                     validation_confusion_matrix.png and metrics.csv
  Scored table:      {Path(d['scored']) / 'scored.csv'}  (.parquet too)
  Metrics:           {Path(d['evaluation']) / 'metrics.json'}
  Confusion matrix:  {Path(d['evaluation']) / 'confusion_matrix.png'}
  MLflow runs:       mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}

  Open the report in a browser: {(Path(d['evaluation']) / 'report.html').resolve()}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
