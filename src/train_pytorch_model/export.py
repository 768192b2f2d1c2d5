"""`export`: a trained model directory -> files other runtimes load without this package.

- `model.onnx` (`--format onnx`): ONNX, the opset of the pinned torch's exporter, batch size dynamic.
- `model.pt2` (`--format pt2`): a `torch.export` program (`torch.export.load(path).module()`), the
  successor of TorchScript, which torch 2.14 deprecates.

Both take what `score` gives the model after decoding: a uint8 RGB batch `images` of shape
(N, 3, image_size, image_size) (any height and width for a directory trained by the original
module), and return `probabilities`, softmax over the classes in `classes` order (a multi-label model:
one sigmoid per class; a class is predicted at `threshold`, written down too). Normalisation
is inside the graph; the resize that comes before it is not, and is written down: in the ONNX
file's `metadata_props` and in `export_info.json` beside both files (image size, resize rule,
mean/std, class names). Each file is checked against PyTorch before the output is written.
Needs the `[export]` extra (onnx, onnxscript, onnxruntime) for ONNX.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError, InvalidParameterError
from .model_directory import TrainedModel, read_trained_model_directory
from .output_folder import reserved_output, staged_output
from .preprocessing import MAX_RESIZE_ASPECT

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
INFO_FILE = "export_info.json"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
MAX_DIFFERENCE = 1e-4  # max absolute probability difference an exported file may show against PyTorch
CHECK_BATCH = 3  # not 1 or 2: the exported batch dimension must really be dynamic
MAX_BATCH = 65536
# The ONNX exporter's optimizer reports each pass at INFO (a dozen lines per export): only its warnings and errors
# are shown.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


class ProbabilityModel(torch.nn.Module):
    """uint8 NCHW images -> class probabilities: the trained network with its normalisation and softmax (or a
    multi-label model's sigmoid per class)."""

    def __init__(self, trained: TrainedModel):
        super().__init__()
        self.network = trained.model.eval()
        self.multilabel = trained.is_multilabel
        prep = trained.preprocessing
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.network((images.float() - self.mean) / self.std)
        return logits.sigmoid() if self.multilabel else logits.softmax(dim=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trained-model", required=True, type=Path, help="trained model directory (output of train)")
    parser.add_argument("--output", "--exported-model", dest="exported_model", required=True, type=Path,
                        help="output folder (new or empty) for the files")
    parser.add_argument("--format", default="onnx,pt2",
                        help=f"comma-separated, of {', '.join(FORMATS)} (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format)
    if "onnx" in formats:
        onnx_modules()  # missing dependencies are found before anything is read or written
    with reserved_output(args.exported_model, inputs=[args.trained_model]):
        trained = read_trained_model_directory(args.trained_model)
        info = export_info(trained)
        with staged_output(args.exported_model) as stage:
            for name in formats:
                (export_onnx if name == "onnx" else export_pt2)(trained, stage / FORMATS[name], info)
            (stage / INFO_FILE).write_text(json.dumps(info, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"Exported {', '.join(FORMATS[f] for f in formats)} to {args.exported_model} "
          f"({len(trained.classes)} classes; input {info['input']}; each checked against PyTorch).")
    return 0


def parse_formats(text: str) -> list[str]:
    formats = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        raise InvalidParameterError("Format", text, f"must be a comma-separated list of {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def export_info(trained: TrainedModel) -> dict:
    """The preprocessing a caller must do before the exported graph: what `score` does."""
    prep = trained.preprocessing
    side = prep.image_size
    return {
        "model_name": trained.spec.model_name,
        "classes": list(trained.classes),
        "input": f"{INPUT_NAME}: uint8 RGB, shape (batch, 3, {side or 'height'}, {side or 'width'})",
        "output": f"{OUTPUT_NAME}: float32 {'sigmoid per class' if trained.is_multilabel else 'softmax'}, shape "
                  f"(batch, {len(trained.classes)}), in 'classes' order",
        "task": trained.task,
        **({"threshold": trained.threshold} if trained.is_multilabel else {}),
        "image_size": side,
        "resize_size": prep.resize_size,
        "resize": resize_rule(prep) if side else "none: the model was trained on images as they are",
        "mean": list(prep.mean),
        "std": list(prep.std),
        "normalization": "inside the graph: (pixel - 255 * mean) / (255 * std), per channel",
    }


def resize_rule(prep) -> str:
    """What `score` does to an image before the model, step by step, exactly (docs/deploy.md shows it in Python)."""
    r, side = prep.resize_size, prep.image_size
    return (f"resize the shorter side to {r} pixels with Pillow's Image.BILINEAR and reducing_gap=None (a JPEG first "
            f"decoded with Image.draft('RGB', ({r}, {r})), then EXIF-oriented and converted to RGB; the longer side "
            f"at most {MAX_RESIZE_ASPECT * r}), then centre-crop {side}x{side} at offsets round((width - {side}) / 2), "
            f"round((height - {side}) / 2)")


def _example(trained: TrainedModel, batch: int) -> torch.Tensor:
    side = trained.preprocessing.image_size or 64
    return torch.randint(0, 256, (batch, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _dynamic_shapes(trained: TrainedModel) -> dict:
    dims = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if trained.preprocessing.image_size is None:  # legacy recipe: no resize, so any image size
        dims.update({2: torch.export.Dim("height", min=16, max=8192), 3: torch.export.Dim("width", min=16, max=8192)})
    return {INPUT_NAME: dims}


def _reference(model: ProbabilityModel, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(images).numpy()


def _check(path: Path, expected: np.ndarray, actual: np.ndarray) -> None:
    difference = float(np.abs(expected - actual).max())
    if difference > MAX_DIFFERENCE or not (expected.argmax(1) == actual.argmax(1)).all():
        raise ExportError(f"'{path.name}' does not reproduce the PyTorch model: max probability difference "
                          f"{difference:.2e} (allowed {MAX_DIFFERENCE:.0e}). Please report it with the model name.")
    log.info("%s: max probability difference against PyTorch %.2e", path.name, difference)


def onnx_modules():
    """(onnx, onnxruntime), or ExportError saying how to install them (torch's exporter needs onnxscript too)."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # torch.onnx imports it itself: here only to fail early, with the fix
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the optional dependencies ({exc.name} is missing): "
                          "pip install 'train-pytorch-model[export]', or use --format pt2.") from None
    del onnxscript
    return onnx, onnxruntime


@contextlib.contextmanager
def exporter_warnings_only():
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(trained: TrainedModel, path: Path, info: dict) -> None:
    onnx, onnxruntime = onnx_modules()
    model = ProbabilityModel(trained).eval()
    with exporter_warnings_only():
        program = torch.onnx.export(model, (_example(trained, CHECK_BATCH),), dynamo=True, verbose=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=_dynamic_shapes(trained))
        program.save(str(path))
    proto = onnx.load(str(path))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    info["onnx_opset"] = opset
    onnx.helper.set_model_props(proto, {key: value if isinstance(value, str) else json.dumps(value)
                                        for key, value in info.items()})
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    images = _example(trained, CHECK_BATCH + 2)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _check(path, _reference(model, images), session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])


def export_pt2(trained: TrainedModel, path: Path, info: dict) -> None:
    model = ProbabilityModel(trained).eval()
    program = torch.export.export(model, (_example(trained, CHECK_BATCH),), dynamic_shapes=_dynamic_shapes(trained))
    torch.export.save(program, str(path))
    images = _example(trained, CHECK_BATCH + 2)
    with torch.inference_mode():
        actual = torch.export.load(str(path)).module()(images).numpy()
    _check(path, _reference(model, images), actual)
