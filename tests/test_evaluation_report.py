"""`evaluate`'s report.html (issue 25): one self-contained page, checked as text and as a person sees it (a real
headless Chromium renders it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import train_tiny_model, write_image_folder
from train_pytorch_model.cli import main

SECTIONS = ("Headline metrics", "Confusion matrix", "Per-class precision, recall and F1",
            "One-vs-rest precision-recall and ROC curves", "Most confidently wrong images")


def scored(classes: list[str], true: list[str], probabilities: np.ndarray) -> pd.DataFrame:
    columns = {"id": range(len(true)), "file": [f"{t}/{i}.png" for i, t in enumerate(true)], "category": true,
               "Scored Labels": [classes[i] for i in probabilities.argmax(axis=1)]}
    columns.update({f"Scored Probabilities_{name}": probabilities[:, j] for j, name in enumerate(classes)})
    return pd.DataFrame({**columns, "error": ""})


def random_scores(classes: list[str], rows: int, seed: int = 0) -> pd.DataFrame:
    """A scored table where the true class usually, not always, gets the most probability."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, len(classes), rows)
    logits = rng.normal(size=(rows, len(classes)))
    logits[np.arange(rows), true] += 2.5
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return scored(classes, [classes[t] for t in true], probabilities)


def evaluate(tmp_path, table: pd.DataFrame, *extra: str):
    (tmp_path / "scored").mkdir()
    table.to_parquet(tmp_path / "scored" / "scored.parquet", index=False)
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored"), "--evaluation", str(out), *extra]) == 0
    return out


def test_the_report_is_one_self_contained_page_with_every_section(tmp_path):
    hostile = '<img src=x onerror="alert(1)">'
    out = evaluate(tmp_path, random_scores(["cat", "dog", hostile], 60))
    page = (out / "report.html").read_text()
    for title in SECTIONS:
        assert f">{title}</h2>" in page
    # Self-contained: every picture embedded, nothing fetched (no URL at all).
    assert re.findall(r'src="([^"]{0,20})', page) and all(
        s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]{0,30})', page))
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    # A class name is text, never markup.
    assert hostile not in page and html_escaped(hostile) in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page and "@media print" in page
    # Without the model and images, the gallery names the mistakes and says how to see them.
    assert "Give evaluate --trained-model and --image-directory" in page
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/pr_roc_curves.png", "evaluation/confusion_matrix_normalized.png"} \
        <= logged


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


@pytest.mark.slow
def test_many_classes_stay_readable(tmp_path):
    classes = [f"class {i:03d}" for i in range(150)]
    out = evaluate(tmp_path, random_scores(classes, 600))
    page = (out / "report.html").read_text()
    assert "The 50 of 150 classes with the lowest F1" in page and "the 30 classes with the most errors" in page
    assert page.count("<tr") - page.count("<tr><th") == 50 + 20  # per-class rows + the largest confusions
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png"):
        with Image.open(out / name) as picture:
            assert max(picture.size) < 2000, name


def test_pictures_need_both_the_model_and_the_images(tmp_path, capsys):
    assert main(["evaluate", "--scored-data", str(tmp_path), "--evaluation", str(tmp_path / "e"),
                 "--trained-model", str(tmp_path)]) != 0
    assert 'Parameter "Image directory"' in capsys.readouterr().err


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Debian's Chromium, headless (.ci/run installs it)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Chromium is not installed: apt-get install -y chromium (.ci/run does)"
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={os.getcwd()}/chromium-profile", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_chromium_renders_the_report_with_images_and_heat_maps(tmp_path):
    model = train_tiny_model(tmp_path / "model", classes=("cat", "dog", "fox"))
    images = write_image_folder(tmp_path / "test", {"cat": 3, "dog": 3, "fox": 3}, seed=2)
    assert main(["score", "--trained-model", str(model), "--image-directory", str(images), "--scored-data",
                 str(tmp_path / "scored"), "--num-workers", "0"]) == 0
    table = pd.read_parquet(tmp_path / "scored" / "scored.parquet")
    # Mislabel 3 rows (a class other than the predicted one): at least 3 mistakes for the gallery.
    table.loc[:2, "category"] = [next(c for c in ("cat", "dog", "fox") if c != p) for p in table["Scored Labels"][:3]]
    table.to_parquet(tmp_path / "scored" / "scored.parquet", index=False)
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored"), "--evaluation", str(out),
                 "--trained-model", str(model), "--image-directory", str(images)]) == 0
    page = out / "report.html"
    wrong = int((table["category"] != table["Scored Labels"]).sum())
    assert page.read_text().count('alt="heat map of the prediction"') == wrong >= 3

    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    for title in SECTIONS:
        assert title in text
    assert "predicted: " in text and "accuracy (top-1)" in text

    for name, size in (("desktop", "1200,2200"), ("phone", "390,2400")):
        shot = tmp_path / f"{name}.png"
        result = chromium(f"--screenshot={shot}", f"--window-size={size}", page.as_uri())
        assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
        assert pixels.shape == tuple(int(v) for v in reversed(size.split(",")))
        assert pixels.std() > 20, name  # not a blank page: text, tiles and pictures
        # Content reaches down the page (the pictures), not only a header.
        lower = pixels[pixels.shape[0] // 2:]
        assert lower.std() > 10, name

    # Printable: Chromium prints it to a PDF of more than one page, with the pictures in it.
    pdf = tmp_path / "report.pdf"
    result = chromium(f"--print-to-pdf={pdf}", "--no-pdf-header-footer", page.as_uri())
    assert result.returncode == 0 and pdf.read_bytes().startswith(b"%PDF"), result.stderr[-2000:]
    data = pdf.read_bytes()
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) >= 2 and data.count(b"/Subtype /Image") >= 3


@pytest.mark.slow
def test_gallery_pictures_come_only_from_the_image_directory_and_the_scoring_model(tmp_path, capsys, caplog):
    model = train_tiny_model(tmp_path / "model", classes=("cat", "dog"))
    images = model.parent / "images"
    assert main(["score", "--trained-model", str(model), "--image-directory", str(images), "--scored-data",
                 str(tmp_path / "scored"), "--num-workers", "0"]) == 0
    table = pd.read_parquet(tmp_path / "scored" / "scored.parquet")
    table["category"] = ["dog" if p == "cat" else "cat" for p in table["Scored Labels"]]  # every row wrong
    table.loc[0, "file"] = "../../outside.png"  # a path out of the folder: looked up, never opened
    table.to_parquet(tmp_path / "scored" / "scored.parquet", index=False)
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored"), "--evaluation", str(out),
                 "--trained-model", str(model), "--image-directory", str(images)]) == 0
    page = (out / "report.html").read_text()
    assert page.count('alt="heat map of the prediction"') == len(table) - 1 and "../../outside.png" in page
    assert "No picture for '../../outside.png' in the report: not in the image directory" in caplog.text

    other = train_tiny_model(tmp_path / "other", classes=("cat", "fox"))
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored"), "--evaluation", str(tmp_path / "e2"),
                 "--trained-model", str(other), "--image-directory", str(images)]) != 0
    assert "give the model that scored the table" in capsys.readouterr().err and not (tmp_path / "e2").exists()


@pytest.mark.slow
def test_a_multilabel_evaluation_has_its_own_report(tmp_path):
    """A multi-label table (label sets as JSON list text) gets report.html too: IoU, mAP and the set metrics,
    the per-class table and the per-class decisions picture; class names escaped; Chromium renders it."""
    import json

    classes = ["can", "carton", "<b>milk</b>"]
    rng = np.random.default_rng(3)
    truth = rng.random((30, 3)) < 0.4
    probabilities = truth * 0.3 + rng.random((30, 3)) * 0.6  # some labels missed, some given wrongly
    sets = lambda rows: [json.dumps([c for c, on in zip(classes, row) if on]) for row in rows]  # noqa: E731
    table = pd.DataFrame({"id": range(30), "file": [f"{i}.png" for i in range(30)], "category": sets(truth),
                          "Scored Labels": sets(probabilities >= 0.5), "error": "",
                          **{f"Scored Probabilities_{c}": probabilities[:, j] for j, c in enumerate(classes)}})
    out = evaluate(tmp_path, table)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "multilabel"
    page = (out / "report.html").read_text()
    for shown in (f"{metrics['iou']:.3f}", f"{metrics['map']:.3f}", f"{metrics['micro']['f1']:.3f}",
                  f"{metrics['accuracy']:.1%}", "IoU (mean per image)", "Per-class decisions"):
        assert shown in page, shown
    assert "&lt;b&gt;milk&lt;/b&gt;" in page and "<b>milk</b>" not in page  # a label is never markup
    assert page.count("<tr class=") == 3 and page.count("data:image/png;base64,") == 1
    assert "https://" not in page and "http://" not in page  # self-contained

    dom = chromium("--dump-dom", (out / "report.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    assert "Headline metrics" in text and "Per-class precision, recall and F1" in text and "exact-set accuracy" in text
    shot = tmp_path / "multilabel.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1200,1600", (out / "report.html").as_uri())
    assert result.returncode == 0 and np.asarray(Image.open(shot).convert("L"), dtype=np.float64).std() > 20
