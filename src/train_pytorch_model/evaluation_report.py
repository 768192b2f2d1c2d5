"""`report.html` of `evaluate`: one self-contained page that a newcomer opens and understands.

Every picture is embedded (base64 PNG): no network, no other file, so the page can be mailed, attached to a run
or opened on a phone. The CSS is inline, fluid (one column on a phone, wide tables scroll sideways) and has print
rules (sections and cards do not split across pages). Every text that comes from the data (class names, file
names) is HTML-escaped: a label is never markup.

The gallery's pictures (`mistake_pictures`) come from the model and the images that `score` was given: each image
as the model saw it (resized and cropped) and the Grad-CAM heat map of the wrong prediction (explain.py). Images
are looked up by the table's `file` among the files the image directory lists itself: no path from the table is
ever opened.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidParameterError
from .evaluate_multilabel import threshold_text

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

PER_CLASS_ROWS = 50  # classes in the per-class table; beyond that the ones with the lowest F1
TOP_CONFUSIONS = 20
THUMBNAIL_SIDE = 160  # pixels: small model inputs (32 px) are upscaled, pixelated, to stay visible

CSS = """
:root{color-scheme:light}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;margin:0 auto;
 max-width:1100px;padding:1rem;line-height:1.45;background:#fff}
h1{font-size:1.6rem;margin:.2rem 0 .4rem}h2{font-size:1.25rem;margin:1.8rem 0 .5rem;border-bottom:1px solid #d0d7de;
 padding-bottom:.2rem}
p.lead,p.note{color:#57606a;margin:.3rem 0 .8rem}
nav a{margin-right:.8rem;white-space:nowrap}
img{max-width:100%;height:auto}figure{margin:0}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.6rem}
.tile{border:1px solid #d0d7de;border-radius:8px;padding:.5rem .7rem}
.tile b{display:block;font-size:1.6rem}.tile span{color:#57606a;font-size:.85rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.9rem;min-width:60%}
th,td{padding:.3rem .6rem;border-bottom:1px solid #eaeef2;text-align:right}
th:first-child,td:first-child{text-align:left}
tr.low td{background:#fff5f5}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:1rem;align-items:start}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:.8rem}
.card{border:1px solid #d0d7de;border-radius:8px;padding:.5rem;font-size:.85rem}
.card .pair{display:grid;grid-template-columns:1fr 1fr;gap:.3rem}
.card img{width:100%;image-rendering:pixelated}
.card .file{color:#57606a;word-break:break-all}
.wrong{color:#b42318;font-weight:600}
@media (max-width:600px){body{padding:.6rem}.tile b{font-size:1.3rem}}
@media print{body{max-width:none;padding:0}nav{display:none}section,.card,.tile,figure{break-inside:avoid}
 h2{break-after:avoid}a{color:inherit;text-decoration:none}}
"""


def mistake_pictures(mistakes: pd.DataFrame, classes: list[str], model_dir: Path,
                     image_dir: Path) -> list[dict | None]:
    """Per row of `mistakes`: {"image", "overlay"} (uint8 HWC: the model's input, and it under the heat map of the
    predicted class), or None when the image is not in `image_dir` or cannot be read."""
    from array import array

    import torch

    from .data import ImageDataset
    from .explain import explained_images
    from .model_directory import read_trained_model_directory
    from .score import images_to_score

    trained = read_trained_model_directory(model_dir)
    if list(trained.classes) != list(classes):
        raise InvalidParameterError("Trained model", str(model_dir),
                                    f"has the classes {trained.classes[:10]}, the scored table "
                                    f"{list(classes)[:10]}: give the model that scored the table")
    prep, model = trained.preprocessing, trained.model.eval()
    class_index = {name: i for i, name in enumerate(classes)}
    pictures: list[dict | None] = []
    with images_to_score([Path(image_dir)]) as directory:
        row_of = {name: row for row, name in enumerate(directory.files)}
        dataset = ImageDataset(directory, array("l", [0] * len(directory)), prep.eval_transform(), prep.resize_size,
                               seed=0)
        for mistake in mistakes.itertuples():
            row = row_of.get(mistake.file)
            image, error = None, "not in the image directory"
            if row is not None:
                image, _, _, error = dataset[row]
            if image is None:
                log.warning("No picture for '%s' in the report: %s.", mistake.file, error)
                pictures.append(None)
                continue
            target = torch.tensor([class_index[mistake.predicted]])
            with torch.inference_mode():
                overlay = explained_images(model, prep.normalize, image.unsqueeze(0), target)[0]
            pictures.append({"image": image.permute(1, 2, 0).numpy(), "overlay": overlay})
    return pictures


def _png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(folder: Path, name: str, alt: str) -> str:
    path = folder / name
    if not path.is_file():
        return ""
    return f'<figure><img src="{_png_data_url(path.read_bytes())}" alt="{html.escape(alt)}"></figure>'


def _tile(value: str, label: str) -> str:
    return f'<div class="tile"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def write_report_html(path: Path, figures: Path, *, metrics: dict, matrix: np.ndarray, labels: list[str],
                      curves: dict, mistakes: pd.DataFrame, pictures: list | None, title: str) -> None:
    """report.html at `path`, embedding the PNGs of `figures` (the evaluation folder being written)."""
    from . import reports
    from .explain import png_bytes

    esc = html.escape
    top_k = "".join(_tile(f"{v:.1%}", f"top-{k} accuracy") for k, v in metrics["top_k_accuracy"].items() if k != "1")
    tiles = [_tile(f"{metrics['accuracy']:.1%}", "accuracy (top-1)"), top_k,
             _tile(f"{metrics['macro']['f1']:.3f}", "macro F1"),
             _tile(f"{metrics['macro']['precision']:.3f}", "macro precision"),
             _tile(f"{metrics['macro']['recall']:.3f}", "macro recall"),
             _tile(f"{metrics['evaluated_rows']:,}", f"images evaluated of {metrics['rows']:,}")]
    if metrics["log_loss"] is not None:
        tiles.append(_tile(f"{metrics['log_loss']:.3f}", "log loss (lower is better)"))
    left_out_text = _left_out_note(metrics)
    per_class_table, per_class_note = _per_class_table(metrics["per_class"], {
        "AP": {name: c.get("average_precision") for name, c in curves.items()},
        "ROC AUC": {name: c.get("roc_auc") for name, c in curves.items()}})

    confusions = reports.top_confusions(matrix, labels, TOP_CONFUSIONS)
    confusion_rows = "".join(
        f"<tr><td>{esc(c['true'])}</td><td>{esc(c['predicted'])}</td><td>{c['count']:,}</td><td>{c['share']:.1%}</td>"
        "</tr>" for c in confusions)
    confusion_table = (
        '<h3>Largest confusions</h3><div class="scroll"><table><tr><th>true class</th><th>predicted as</th>'
        f'<th>images</th><th>share of the true class</th></tr>{confusion_rows}</table></div>'
        if confusions else '<p class="note">No image was confused: every prediction was right.</p>')
    subset = "" if len(labels) <= reports.MATRIX_CLASSES else (
        f" With {len(labels)} classes, the pictures show the {reports.MATRIX_CLASSES} classes with the most errors; "
        "the full matrix is confusion_matrix.csv.")

    cards = []
    for i, mistake in enumerate(mistakes.itertuples()):
        picture = pictures[i] if pictures else None
        images = ""
        if picture:
            images = ('<div class="pair">'
                      f'<img src="{_png_data_url(png_bytes(picture["image"], THUMBNAIL_SIDE))}" alt="image">'
                      f'<img src="{_png_data_url(png_bytes(picture["overlay"], THUMBNAIL_SIDE))}" '
                      'alt="heat map of the prediction"></div>')
        cards.append(f'<div class="card">{images}<div>true: <b>{esc(mistake.true)}</b></div>'
                     f'<div class="wrong">predicted: {esc(mistake.predicted)} ({mistake.probability:.1%})</div>'
                     f'<div class="file">{esc(str(mistake.file))}</div></div>')
    if not cards:
        gallery = '<p class="note">No wrong prediction: nothing to show.</p>'
    else:
        hint = ("Left: the image as the model saw it (resized and cropped). Right: a Grad-CAM heat map of what drove "
                "the wrong prediction (red: most, blue: least)." if pictures else
                "Give evaluate --trained-model and --image-directory (what score was given) to see the images and "
                "heat maps of what the model looked at.")
        gallery = f'<p class="lead">{hint}</p><div class="cards">{"".join(cards)}</div>'

    body = f"""<p class="lead">How well the model classifies images it did not train on:
{metrics['evaluated_rows']:,} labeled images, {len(metrics['classes'])} classes. Written by
<code>train_pytorch_model evaluate</code>; the numbers are in metrics.json next to this page.</p>
<nav><a href="#summary">Summary</a><a href="#confusion">Confusion matrix</a><a href="#per-class">Per class</a>
<a href="#curves">PR and ROC curves</a><a href="#mistakes">Confident mistakes</a></nav>

<section id="summary"><h2>Headline metrics</h2>
<p class="lead">Accuracy: the share of images whose most probable class is the true one. Top-k: the true class is
among the k most probable. Macro averages weigh every class the same, however many images it has.</p>
<div class="tiles">{"".join(tiles)}</div>{left_out_text}</section>

<section id="confusion"><h2>Confusion matrix</h2>
<p class="lead">Rows are the true classes, columns the predictions: the diagonal is right, everything else is a
mistake. The second picture shows each row as shares, so that small classes read as well as large ones.{subset}</p>
<div class="figures">{_figure(figures, "confusion_matrix.png", "confusion matrix, counts")}
{_figure(figures, "confusion_matrix_normalized.png", "confusion matrix, shares of each true class")}</div>
{confusion_table}</section>

<section id="per-class"><h2>Per-class precision, recall and F1</h2>
<p class="lead">Precision: of the images predicted as the class, the share that are. Recall: of the images of the
class, the share found. F1 combines both. Support: images of the class. AP and ROC AUC: one class against the rest
(1 is perfect). {per_class_note}</p>
{per_class_table}</section>

<section id="curves"><h2>One-vs-rest precision-recall and ROC curves</h2>
<p class="lead">Each class against all others, as the probability threshold moves. A curve near the top (PR) or the
top-left corner (ROC) separates its class well.</p>
{_figure(figures, "pr_roc_curves.png", "precision-recall and ROC curves")}</section>

<section id="mistakes"><h2>Most confidently wrong images</h2>
<p class="lead">The wrong predictions the model was surest of: often a wrong label in the data, or a class the model
mixes up for a visible reason.</p>
{gallery}</section>"""
    _write_page(path, title, body)


def write_multilabel_report_html(path: Path, figures: Path, *, metrics: dict, title: str) -> None:
    """report.html of a multi-label evaluation (evaluate_multilabel.py's metrics): the headline numbers, the
    per-class table and the per-class decisions picture of `figures`."""
    micro, macro = metrics["micro"], metrics["macro"]
    tiles = [_tile(f"{metrics['iou']:.3f}", "IoU (mean per image)"), _tile(f"{metrics['map']:.3f}", "mAP"),
             _tile(f"{metrics['accuracy']:.1%}", "exact-set accuracy"), _tile(f"{micro['f1']:.3f}", "micro F1"),
             _tile(f"{macro['f1']:.3f}", "macro F1"), _tile(f"{micro['precision']:.3f}", "micro precision"),
             _tile(f"{micro['recall']:.3f}", "micro recall"), _tile(threshold_text(metrics["threshold"]), "threshold"),
             _tile(f"{metrics['evaluated_rows']:,}", f"images evaluated of {metrics['rows']:,}")]
    per_class = metrics["per_class"]
    per_class_table, per_class_note = _per_class_table(
        per_class, {"AP": {name: m["average_precision"] for name, m in per_class.items()}})
    predicted_when = ("the predicted labels as scored (a CSV does not record the threshold)"
                      if metrics["threshold"] is None
                      else f"a label predicted when its probability reaches {metrics['threshold']:g}")
    body = f"""<p class="lead">How well the multi-label model finds every label of images it did not train on:
{metrics['evaluated_rows']:,} labeled images, {len(metrics['classes'])} classes, {predicted_when}. Written by
<code>train_pytorch_model evaluate</code>; the numbers are in metrics.json next to this page.</p>
<nav><a href="#summary">Summary</a><a href="#per-class">Per class</a><a href="#decisions">Per-class decisions</a></nav>

<section id="summary"><h2>Headline metrics</h2>
<p class="lead">IoU: per image, the labels both true and predicted over the labels either true or predicted, averaged
(AutoML's headline for multi-label). mAP: each class's average precision over every threshold, averaged.
Exact-set accuracy: images whose predicted set is exactly the true one. Micro averages count every label decision
alike; macro averages weigh every class the same.</p>
<div class="tiles">{"".join(tiles)}</div>{_left_out_note(metrics)}</section>

<section id="per-class"><h2>Per-class precision, recall and F1</h2>
<p class="lead">Each class on its own: precision, of the images given the label, the share that have it; recall, of
the images that have it, the share given it; AP, its average precision over every threshold; support, images that
have it. {per_class_note}</p>
{per_class_table}</section>

<section id="decisions"><h2>Per-class decisions</h2>
<p class="lead">For each class, the images rightly given the label (true positives), wrongly given it (false
positives), missed (false negatives) and rightly left without it (true negatives).</p>
{_figure(figures, "confusion_matrix.png", "per-class true and false positives and negatives")}</section>"""
    _write_page(path, title, body)


def _left_out_note(metrics: dict) -> str:
    left_out = []
    if metrics["unlabeled_rows"]:
        left_out.append(f"{metrics['unlabeled_rows']} rows without a true label")
    if metrics["unscored_rows"]:
        left_out.append(f"{metrics['unscored_rows']} images that could not be scored")
    if metrics["labels_unknown_to_model"]:
        left_out.append("true labels the model does not know (always counted as wrong): "
                        + ", ".join(metrics["labels_unknown_to_model"][:10]))
    return f'<p class="note">Left out or worth knowing: {html.escape("; ".join(left_out))}.</p>' if left_out else ""


def _per_class_table(per_class: dict, extra: dict[str, dict]) -> tuple[str, str]:
    """The per-class table, and the note that says which classes it shows: precision, recall, F1 and support, then
    each `extra` column (class -> value; "–" where there is none); every class, or the PER_CLASS_ROWS with the
    lowest F1."""
    esc = html.escape
    names = list(per_class)
    note = "Rows shaded red have an F1 below 0.5."
    if len(names) > PER_CLASS_ROWS:
        names = sorted(names, key=lambda n: (per_class[n]["f1"], n))[:PER_CLASS_ROWS]
        note = (f"The {PER_CLASS_ROWS} of {len(per_class)} classes with the lowest F1; every class is in "
                "per_class_metrics.csv.")
    head = "".join(f"<th>{esc(column)}</th>" for column in ("class", "precision", "recall", "F1", "support", *extra))
    rows = []
    for name in names:
        m = per_class[name]
        cells = "".join("<td>–</td>" if values.get(name) is None else f"<td>{values[name]:.3f}</td>"
                        for values in extra.values())
        rows.append(f'<tr class="{"low" if m["f1"] < 0.5 else ""}"><td>{esc(str(name))}</td>'
                    f'<td>{m["precision"]:.3f}</td><td>{m["recall"]:.3f}</td><td>{m["f1"]:.3f}</td>'
                    f'<td>{m["support"]:,}</td>{cells}</tr>')
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>', note


def _write_page(path: Path, title: str, body: str) -> None:
    esc = html.escape
    path.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
{body}
</body></html>
""", encoding="utf-8")
