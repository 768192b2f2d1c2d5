"""Explanations (issue 25): Grad-CAM heat maps point at what decides the class, from `score --explain` and from
the served MLflow model, bounded in cost."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from conftest import train_tiny_model, write_image_folder
from train_pytorch_model.cli import main
from train_pytorch_model.explain import colour_map, grad_cam, overlay
from train_pytorch_model.models import Classifier

RED_SQUARE = (slice(4, 12), slice(18, 26))  # rows, columns of a 32 x 32 image
GREEN_SQUARE = (slice(20, 28), slice(3, 11))


def colour_detector() -> nn.Module:
    """Class 0 = "there is red", class 1 = "there is green", built by hand so the right answer is known: a 1x1
    convolution that fires on saturated red (or green) and never on grey, a strided 3x3 smoothing (the map is
    coarser than the image, as in any CNN), global pooling and an identity head."""
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]]).view(2, 3, 1, 1))
        net[0].bias.zero_()
        net[2].weight.zero_()
        net[2].weight[0, 0] = net[2].weight[1, 1] = 1 / 9
        net[2].bias.zero_()
        net[6].weight.copy_(torch.eye(2))
        net[6].bias.zero_()
    return net.eval()


def squares_on_noise() -> torch.Tensor:
    """A (1, 3, 32, 32) image in [0, 1]: grey noise (R = G = B) with a red and a green square."""
    grey = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    image = grey.repeat(1, 3, 1, 1)
    image[0, :, RED_SQUARE[0], RED_SQUARE[1]] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    image[0, :, GREEN_SQUARE[0], GREEN_SQUARE[1]] = torch.tensor([0.1, 0.9, 0.1]).view(3, 1, 1)
    return image


def peak(heat: torch.Tensor) -> tuple[int, int]:
    row, column = divmod(int(heat.argmax()), heat.shape[-1])
    return row, column


def inside(point: tuple[int, int], square: tuple[slice, slice]) -> bool:
    return square[0].start <= point[0] < square[0].stop and square[1].start <= point[1] < square[1].stop


def test_the_heat_map_of_each_class_peaks_on_its_own_square():
    model, image = colour_detector(), squares_on_noise()
    assert model(image).argmax().item() in (0, 1)  # both classes are present
    with torch.inference_mode():  # as score and serving call it
        heat = grad_cam(model, image.repeat(2, 1, 1, 1), torch.tensor([0, 1]))
    assert heat.shape == (2, 32, 32) and float(heat.min()) >= 0 and float(heat.max()) == 1.0
    assert inside(peak(heat[0]), RED_SQUARE) and not inside(peak(heat[0]), GREEN_SQUARE)
    assert inside(peak(heat[1]), GREEN_SQUARE)
    # Most of each map's mass is on its square: it points at the object, not just somewhere near it.
    for h, square in ((heat[0], RED_SQUARE), (heat[1], GREEN_SQUARE)):
        assert float(h[square].sum() / h.sum()) > 0.5


def test_grad_cam_on_a_torchvision_net_leaves_no_gradients_and_keeps_the_mode():
    model = Classifier(torchvision.models.resnet18(num_classes=3)).train()
    images = torch.randn(2, 3, 64, 64)
    heat = grad_cam(model, images, torch.tensor([2, 0]))
    assert heat.shape == (2, 64, 64) and torch.isfinite(heat).all()
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_overlay_colours_hot_regions_red_and_cold_regions_blue():
    assert colour_map(np.array([[0.0, 1.0]])).tolist() == [[[0, 0, 160], [230, 0, 0]]]
    image = np.full((1, 2, 3), 100, dtype=np.uint8)
    blended = overlay(image, np.array([[0.0, 1.0]]))
    assert blended[0, 0, 2] > blended[0, 0, 0] and blended[0, 1, 0] > blended[0, 1, 2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet18 trained for one epoch on 32 px images of classes a, b (its images in trained.parent/images)."""
    return train_tiny_model(tmp_path_factory.mktemp("explain"), classes=("a", "b"))


def test_score_explain_writes_a_heat_map_per_scored_image(tmp_path, trained):
    data = write_image_folder(tmp_path / "data", {"a": 3, "b": 3})
    model = trained
    (data / "a" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "scored"
    assert main(["score", "--trained-model", str(model), "--image-directory", str(data), "--scored-data", str(out),
                 "--num-workers", "0", "--explain"]) == 0
    table = pd.read_parquet(out / "scored.parquet")
    scored = table[table["error"] == ""]
    assert len(scored) == 6 and (table.loc[table["error"] != "", "explanation"] == "").all()
    for name in scored["explanation"]:
        with Image.open(out / name) as picture:
            assert picture.size == (32, 32) and picture.mode == "RGB"
    assert sorted(p.name for p in (out / "explanations").iterdir()) == sorted(n.split("/")[1]
                                                                               for n in scored["explanation"])


def test_the_served_model_explains_on_request_within_bounds(trained, tmp_path):
    import base64
    import io

    import mlflow.pyfunc

    from train_pytorch_model.errors import InvalidDatasetError
    from train_pytorch_model.pyfunc import MAX_EXPLAINED_IMAGES

    png = next((trained.parent / "images" / "a").iterdir()).read_bytes()
    model = mlflow.pyfunc.load_model(str(trained))
    plain = model.predict(pd.DataFrame({"image": [png]}))
    assert "explanation" not in plain.columns
    explained = model.predict(pd.DataFrame({"image": [png, png]}), params={"explain": True})
    # The same predictions, and a heat-map PNG per image at the model's input size.
    assert explained["Scored Labels"].tolist() == [plain["Scored Labels"][0]] * 2
    with Image.open(io.BytesIO(base64.b64decode(explained["explanation"][0]))) as picture:
        assert picture.format == "PNG" and picture.size == (32, 32)
    # Bounded: a request cannot make the endpoint explain without limit.
    with pytest.raises(InvalidDatasetError, match=f"at most {MAX_EXPLAINED_IMAGES} images"):
        model.predict(pd.DataFrame({"image": [png] * (MAX_EXPLAINED_IMAGES + 1)}), params={"explain": True})
    assert len(model.predict(pd.DataFrame({"image": [png] * (MAX_EXPLAINED_IMAGES + 1)}))) == 9  # plain: no limit
    # MLflow checks the param against the signature; a caller of the loader itself gets our named error.
    with pytest.raises(mlflow.exceptions.MlflowException, match="explain"):
        model.predict(pd.DataFrame({"image": [png]}), params={"explain": "perhaps"})
    from train_pytorch_model.pyfunc import _load_pyfunc

    with pytest.raises(InvalidDatasetError, match="must be true or false"):
        _load_pyfunc(str(trained)).predict(pd.DataFrame({"image": [png]}), params={"explain": "perhaps"})


def test_labels_to_explain_are_the_prediction_or_each_predicted_label():
    from train_pytorch_model.explain import MAX_EXPLAINED_LABELS, labels_to_explain

    probs = np.array([[0.2, 0.7, 0.6, 0.1], [0.1, 0.2, 0.3, 0.4]])
    assert labels_to_explain(probs) == [[1], [3]]
    assert labels_to_explain(probs, multilabel=True, threshold=0.5) == [[1, 2], []]
    assert labels_to_explain(np.full((1, 9), 0.9), multilabel=True) == [list(range(MAX_EXPLAINED_LABELS))]


def test_a_multilabel_model_explains_each_predicted_label(tmp_path):
    import json

    import mlflow.pyfunc

    from conftest import SHARED_FIXTURES, write_multilabel_mltable

    data = write_multilabel_mltable(tmp_path / "ml", count=16)
    model = tmp_path / "model"
    assert main(["train", "--untrained-model", str(SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"),
                 "--training-data", str(data), "--trained-model", str(model), "--epochs", "1", "--batch-size", "8",
                 "--image-size", "32", "--num-workers", "0"]) == 0
    out = tmp_path / "scored"
    # Threshold 0: every label is predicted, so every image has 4 heat maps (the classes' count, under the cap).
    assert main(["score", "--trained-model", str(model), "--image-directory", str(data), "--scored-data", str(out),
                 "--num-workers", "0", "--threshold", "0", "--explain"]) == 0
    table = pd.read_parquet(out / "scored.parquet")
    for labels, names in zip(table["Scored Labels"], table["explanation"]):
        names = json.loads(names)
        assert len(names) == len(json.loads(labels)) == 4 and all((out / name).is_file() for name in names)
    image = (data / "images" / "0.png").read_bytes()
    served = mlflow.pyfunc.load_model(str(model)).predict(pd.DataFrame({"image": [image]}),
                                                          params={"explain": True, "threshold": 0.0})
    maps = json.loads(served["explanation"][0])
    assert sorted(maps) == sorted(json.loads(served["Scored Labels"][0])) and len(maps) == 4
    assert all(base64.b64decode(text).startswith(b"\x89PNG") for text in maps.values())
