"""`export`: ONNX and torch.export files that reproduce the PyTorch model on real images."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch

from conftest import REPO, train_tiny_model, write_image_folder
from train_pytorch_model.cli import main
from train_pytorch_model.model_directory import read_trained_model_directory
from train_pytorch_model.preprocessing import decode_image
from train_pytorch_model.pyfunc import _load_pyfunc

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    trained = train_tiny_model(root, CLASSES)
    out = root / "exported"
    assert main(["export", "--trained-model", str(trained), "--output", str(out), "--format", "onnx,pt2"]) == 0
    # Real images, of other sizes than the model's, through the model's own decode + resize recipe.
    real = write_image_folder(root / "real", {name: 3 for name in CLASSES}, size=(57, 43), seed=5)
    files = sorted(real.rglob("*.png"))
    return trained, out, files


def real_batch(trained, files) -> tuple[torch.Tensor, pd.DataFrame]:
    model = read_trained_model_directory(trained)
    transform = model.preprocessing.eval_transform()
    batch = torch.stack([transform(decode_image(f, model.preprocessing.resize_size)) for f in files])
    expected = _load_pyfunc(str(trained)).predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    return batch, expected


@pytest.mark.slow
def test_onnx_matches_pytorch_on_real_images_at_any_batch_size(exported):
    trained, out, files = exported
    batch, expected = real_batch(trained, files)
    want = expected[[f"Scored Probabilities_{c}" for c in CLASSES]].to_numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for rows in (slice(0, 1), slice(0, 7), slice(None)):
        got = session.run(["probabilities"], {"images": batch[rows].numpy()})[0]
        assert np.abs(got - want[rows]).max() <= 1e-4
        assert [CLASSES[i] for i in got.argmax(axis=1)] == list(expected["Scored Labels"][rows])


def test_onnx_metadata_says_how_to_preprocess(exported):
    trained, out, _ = exported
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == CLASSES
    assert json.loads(props["image_size"]) == 32 and json.loads(props["mean"]) == [0.485, 0.456, 0.406]
    assert props["resize"].startswith("resize the shorter side to 37")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 18 and json.loads(props["onnx_opset"]) == opset
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch dimension is symbolic
    info = json.loads((out / "export_info.json").read_text())
    assert info["classes"] == CLASSES and info["image_size"] == 32


def test_torch_export_program_matches_pytorch(exported):
    trained, out, files = exported
    batch, expected = real_batch(trained, files)
    program = torch.export.load(str(out / "model.pt2")).module()
    with torch.inference_mode():
        got = program(batch[:5]).numpy()
    want = expected[[f"Scored Probabilities_{c}" for c in CLASSES]].to_numpy()[:5]
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("fmt, error", [("torchscript", "InvalidParameterError: "), ("", "InvalidParameterError: ")])
def test_bad_format_is_refused_before_anything_is_written(exported, tmp_path, capsys, fmt, error):
    trained, _, _ = exported
    assert main(["export", "--trained-model", str(trained), "--output", str(tmp_path / "out"), "--format", fmt]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(error)
    assert not (tmp_path / "out").exists()


def test_export_component_validates_and_its_command_parses(tmp_path):
    import argparse

    import yaml
    from azure.ai.ml import load_component

    from test_component import lint_component
    from train_pytorch_model import export
    from train_pytorch_model.component_runner import bind_command

    component = load_component(REPO / "components" / "export.yaml")
    result = component._validate()
    assert result.passed, result.error_messages
    assert set(component.inputs) == {"trained_model", "formats"} and list(component.outputs) == ["exported_model"]
    spec = yaml.safe_load((REPO / "components" / "export.yaml").read_text())
    assert lint_component(spec) == []
    assert spec["environment"] == yaml.safe_load((REPO / "components" / "score.yaml").read_text())["environment"]
    argv = bind_command(spec["command"], {"trained_model": str(tmp_path / "m"), "formats": "onnx"},
                        {"exported_model": str(tmp_path / "out")})
    assert argv[:4] == ["python", "-m", "train_pytorch_model", "export"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    export.add_arguments(parser)
    args = parser.parse_args(argv[4:])
    assert (args.exported_model, args.format) == (tmp_path / "out", "onnx")


@pytest.mark.slow
def test_onnx_without_the_export_extra_is_a_named_error(exported, tmp_path):
    """A real process in which onnxruntime cannot be imported (as without `pip install '.[export]'`)."""
    import subprocess
    import sys

    trained, _, _ = exported
    code = ("import sys; sys.modules['onnxruntime'] = None; from train_pytorch_model.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "export", "--trained-model", str(trained), "--output",
                             str(tmp_path / "out"), "--format", "onnx"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "ExportError: ONNX export needs the optional dependencies (onnxruntime is missing)")
    assert not (tmp_path / "out").exists()


def test_the_docs_onnxruntime_example_feeds_the_model_what_score_does(exported, tmp_path, capsys):
    """docs/deploy.md's Python block, run as written on a large rotated JPEG: its pixels are score's, exactly."""
    import contextlib
    import re

    from PIL import Image

    trained, out, _ = exported
    block = re.search(r"tests/test_export.py` runs this block.*?```python\n(.*?)```",
                      (REPO / "docs" / "deploy.md").read_text(), re.S).group(1)
    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: EXIF orientation applies before the resize
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 260, 3), dtype=np.uint8)).save(photo, quality=90, exif=exif)
    source = block.replace('EXPORTED, IMAGE = "out/exported", "cat.jpg"', f'EXPORTED, IMAGE = "{out}", "{photo}"')
    assert source != block
    namespace: dict = {}
    with contextlib.chdir(tmp_path):
        exec(compile(source, "deploy.md", "exec"), namespace)
    model = read_trained_model_directory(trained)
    expected = model.preprocessing.eval_transform()(decode_image(photo, model.preprocessing.resize_size))
    assert np.array_equal(namespace["images"][0], expected.numpy())
    label = _load_pyfunc(str(trained)).predict(pd.DataFrame({"image": [photo.read_bytes()]}))["Scored Labels"][0]
    assert capsys.readouterr().out.startswith(label + " ")


@pytest.mark.slow
def test_export_keeps_the_onnx_optimizers_progress_out_of_the_log(exported, tmp_path, caplog):
    """A dozen INFO lines of onnxscript/onnx_ir passes per export; its warnings would still show."""
    import logging

    trained, _, _ = exported
    with caplog.at_level(logging.INFO):
        assert main(["export", "--trained-model", str(trained), "--output", str(tmp_path / "e"), "--format",
                     "onnx"]) == 0
    assert not [r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir"))], caplog.text
    assert "max probability difference" in caplog.text
    assert logging.getLogger("onnxscript").level == logging.NOTSET  # put back


def test_export_info_states_the_exact_resize(exported):
    _, out, _ = exported
    info = json.loads((out / "export_info.json").read_text())
    assert info["resize_size"] == 37 and "Image.BILINEAR and reducing_gap=None" in info["resize"]
    assert "antialiased" not in info["resize"]
