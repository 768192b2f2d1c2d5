"""The trained model directory served by MLflow, also where our package is not installed."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from train_pytorch_model.cli import main

SERVE_WITHOUT_PACKAGE = r"""
import base64, importlib.util, sys
sys.path = [p for p in sys.path if not p.rstrip('/').endswith('/src')]
assert importlib.util.find_spec('train_pytorch_model') is None, 'package must not be importable here'
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
image = open(sys.argv[2], 'rb').read()
result = model.predict(pd.DataFrame({'image': [image, base64.b64encode(image).decode()]}))
print(list(result.columns)); print(list(result['Scored Labels']))
"""


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, request):
    fixtures = request.config.rootpath / "examples"
    out = tmp_path_factory.mktemp("pyfunc") / "trained"
    assert main(["train", "--untrained-model", str(fixtures / "legacy_untrained_model" / "resnet18"),
                 "--training-data", str(fixtures / "legacy_image_directory"),
                 "--validation-data", str(fixtures / "legacy_image_directory"), "--trained-model", str(out),
                 "--epochs", "1", "--batch-size", "6", "--image-size", "32", "--num-workers", "0"]) == 0
    return out


@pytest.mark.slow
def test_serves_from_its_own_code_copy_without_the_package_installed(trained_dir, legacy_image_dir):
    image = next((legacy_image_dir / "image").iterdir())
    result = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_PACKAGE, str(trained_dir), str(image)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    columns, labels = result.stdout.strip().splitlines()[-2:]
    # The same columns as `score` writes (predictions.py): one table shape everywhere.
    assert columns == ("['Scored Labels', 'Scored Probabilities_cat', 'Scored Probabilities_dog', "
                       "'Scored Probabilities_fox']")
    assert eval(labels)[0] == eval(labels)[1] and eval(labels)[0] in ("cat", "dog", "fox")


def test_bad_input_is_a_named_error(trained_dir):
    import mlflow.pyfunc
    import pandas as pd

    from train_pytorch_model.errors import InvalidDatasetError

    model = mlflow.pyfunc.load_model(str(trained_dir))
    with pytest.raises(InvalidDatasetError, match="Row 0: 'image' is not a readable image"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # never handed to Ghostscript
    with pytest.raises(InvalidDatasetError, match="Row 0: 'image' is not a readable image .*cannot identify"):
        model.predict(pd.DataFrame({"image": [eps]}))
    with pytest.raises(InvalidDatasetError, match="not valid base64"):
        model.predict(pd.DataFrame({"image": ["%%%"]}))
    # Past MLflow's schema check (a caller of the loader itself): still named errors.
    from train_pytorch_model.pyfunc import _load_pyfunc

    direct = _load_pyfunc(str(trained_dir))
    with pytest.raises(InvalidDatasetError, match="must be image bytes or a base64 string, got int"):
        direct.predict(pd.DataFrame({"image": [7]}))
    with pytest.raises(InvalidDatasetError, match="Input needs a column 'image'"):
        direct.predict(pd.DataFrame({"picture": [b""]}))
    with pytest.raises(InvalidDatasetError, match="is over the 32 MiB limit per image"):
        direct.predict(pd.DataFrame({"image": [b"\x89" * (48 * 2**20)]}))


def test_base64_text_given_as_bytes_is_decoded_first(trained_dir, legacy_image_dir):
    """MLflow's `inputs`/`instances` path hands the base64 text over as bytes."""
    import mlflow.pyfunc
    import pandas as pd

    image = next((legacy_image_dir / "image").iterdir()).read_bytes()
    model = mlflow.pyfunc.load_model(str(trained_dir))
    text = base64.b64encode(image)
    forms = [image, text, text.decode(), b"data:image/jpeg;base64," + text, base64.encodebytes(image)]
    result = model.predict(pd.DataFrame({"image": forms}))
    assert result["Scored Labels"].nunique() == 1
    assert result.filter(like="Scored Probabilities_").std().max() < 1e-7
