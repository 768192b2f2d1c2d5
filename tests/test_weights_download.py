"""Pretrained weights that arrive by themselves (init-model only), against an HTTP server on 127.0.0.1.

The server serves a small real state dict (squeezenet1_1) named `<arch>-<sha256 prefix>.pth` as torchvision
names its files. Nothing here contacts any other address: the torchvision URL is never used without the URL
list given, and TORCH_HOME is a temporary folder.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
from pathlib import Path

import pytest
import torch
import torchvision
from azure.ai.ml import load_component

from conftest import free_port
from train_pytorch_model.cli import main
from train_pytorch_model.errors import PretrainedWeightsNotFoundError, WeightsHashMismatchError
from train_pytorch_model.models import hub_cache_path, imagenet_weights_file
from train_pytorch_model.weights import official_urls, pretrained_weights

ARCH = "squeezenet1_1"  # 1.2 M parameters: a real torchvision file, small enough to serve quickly
COMPONENT = Path(__file__).resolve().parents[1] / "components" / "init_model.yaml"


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.fixture(scope="module")
def weights() -> tuple[dict, bytes, str]:
    """(state dict, file bytes, torchvision-style file name)."""
    torch.manual_seed(11)
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return state, data, f"{ARCH}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


class WeightsServer(http.server.ThreadingHTTPServer):
    """path -> bytes; `cuts[path]` responses are broken off half-way (Content-Length promises the whole file)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), WeightsHandler)
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, int] = {}
        self.requests: list[str] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class WeightsHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server: WeightsServer = self.server
        server.requests.append(self.path)
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if server.cuts.get(self.path, 0) > 0:
            server.cuts[self.path] -= 1
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = WeightsServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_lands_in_the_hub_cache_and_is_checked(server, weights, torch_home):
    state, data, name = weights
    server.files[f"/{name}"] = data
    path = pretrained_weights(ARCH, [server.url(name)], backoff_s=0)
    assert path == hub_cache_path(name) and path.read_bytes() == data
    assert str(path).startswith(str(torch_home))
    assert not list(path.parent.glob("*.partial"))


def test_init_model_from_a_mirror_writes_the_weights_into_the_directory(server, weights, tmp_path, capsys):
    state, data, name = weights
    server.files[f"/mirror/{name}"] = data
    out = tmp_path / "untrained"
    assert main(["init-model", "--model-name", ARCH, "--untrained-model", str(out),
                 "--weights-url", server.url(f"mirror/{name}")]) == 0
    saved = torch.load(out / "model", weights_only=True)
    assert all(torch.equal(saved[f"model.{k}"], v) for k, v in state.items())
    assert server.url(f"mirror/{name}") in (out / "model_info.json").read_text()


def test_the_cache_is_used_without_any_download(server, weights):
    state, data, _ = weights
    cached = hub_cache_path(imagenet_weights_file(ARCH))  # the name torchvision's own file has
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    assert pretrained_weights(ARCH) == cached  # the default URL list (torchvision's) is never reached
    assert server.requests == []


@pytest.mark.slow
def test_a_file_whose_content_does_not_match_its_name_is_refused(server, weights, tmp_path, capsys):
    _, data, name = weights
    wrong = f"{ARCH}-{'0' * 8}.pth"
    server.files[f"/{wrong}"] = data
    out = tmp_path / "untrained"
    code = main(["init-model", "--model-name", ARCH, "--untrained-model", str(out), "--weights-url", server.url(wrong)])
    assert code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("WeightsHashMismatchError:") and server.url(wrong) in line and "--weights FILE" in line
    assert not out.exists() and not hub_cache_path(wrong).exists()
    assert not list(hub_cache_path(wrong).parent.glob("*"))  # no partial file left in the cache


@pytest.mark.slow
def test_an_unreachable_source_names_the_url_and_the_alternatives(weights, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/{weights[2]}"
    out = tmp_path / "untrained"
    assert main(["init-model", "--model-name", ARCH, "--untrained-model", str(out), "--weights-url", url]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("PretrainedWeightsNotFoundError:") and url in line
    assert "--weights FILE" in line and "--weights-url URL" in line
    assert not out.exists()


def test_a_connection_cut_mid_file_is_retried(server, weights):
    _, data, name = weights
    server.files[f"/{name}"] = data
    server.cuts[f"/{name}"] = 1
    path = pretrained_weights(ARCH, [server.url(name)], backoff_s=0)
    assert path.read_bytes() == data and server.requests == [f"/{name}"] * 2


def test_a_connection_cut_every_time_is_a_clean_error(server, weights):
    _, data, name = weights
    server.files[f"/{name}"] = data
    server.cuts[f"/{name}"] = 99
    with pytest.raises(WeightsHashMismatchError, match="3 times"):
        pretrained_weights(ARCH, [server.url(name)], backoff_s=0)
    assert len(server.requests) == 3 and not hub_cache_path(name).exists()
    assert not list(hub_cache_path(name).parent.glob("*"))


def test_the_next_source_is_tried_when_one_is_unreachable(server, weights):
    _, data, name = weights
    server.files[f"/{name}"] = data
    dead = f"http://127.0.0.1:{free_port()}/{name}"
    assert pretrained_weights(ARCH, [dead, server.url(name)], attempts=1).read_bytes() == data
    with pytest.raises(PretrainedWeightsNotFoundError, match="could not be downloaded"):
        pretrained_weights(ARCH, [dead], attempts=2, backoff_s=0)


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/squeezenet1_1.pth", "ftp://127.0.0.1/squeezenet1_1-0123abcd.pth",
                                 "http://127.0.0.1:1/squeezenet1_1-0123.pth", "/tmp/squeezenet1_1-0123abcd.pth"])
def test_a_mirror_url_without_a_checkable_name_is_refused_before_any_request(url, tmp_path, capsys):
    out = tmp_path / "untrained"
    assert main(["init-model", "--model-name", ARCH, "--untrained-model", str(out), "--weights-url", url]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith('InvalidParameterError: Parameter "Weights url"'), line
    assert not out.exists()


def test_official_urls_are_torchvisions_default_weights():
    assert official_urls("resnet50") == [torchvision.models.ResNet50_Weights.DEFAULT.url]
    assert official_urls("resnet18")[0].endswith("/resnet18-f37072fd.pth")


def test_component_defaults_to_pretrained_and_offers_a_mirror():
    component = load_component(COMPONENT)
    assert component.inputs["pretrained"].default is True
    assert component.inputs["weights_url"].optional and component.inputs["weights_url"].type == "string"
    assert "$[[--weights-url ${{inputs.weights_url}}]]" in COMPONENT.read_text()
