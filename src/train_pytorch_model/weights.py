"""ImageNet weights that arrive by themselves: the torch hub cache, else a download (init-model only).

torch.hub's own downloader does the work: it writes to a temporary file, checks the sha256 prefix
that torchvision puts in every file name (`resnet18-f37072fd.pth`) and only then moves the file
into place, so a broken download never lands in the cache. A mirror (`--weights-url`) must name
its file the same way, which is what lets us check its content too. Train, score and the MLflow
model never come here: they read the `model` file init-model wrote.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
import tempfile
import time
import urllib.error
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit

import torch

from .errors import InvalidParameterError, PretrainedWeightsNotFoundError, WeightsHashMismatchError, quote
from .models import default_weights, find_cached_weights, hub_cache_path

log = logging.getLogger(__name__)

# torchvision's naming: `<arch>-<first 8 or more hex digits of the sha256>.pth`
WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_.]+-(?P<hash>[0-9a-f]{8,64})\.pth$")
ATTEMPTS = 3  # per URL: a cut connection or a busy server gets two more tries
SOCKET_TIMEOUT_S = 60  # urlopen in torch.hub has no timeout: a stalled server must not hang the job


def official_urls(model_name: str) -> list[str]:
    """Where torchvision downloads the DEFAULT ImageNet weights of `model_name`."""
    return [default_weights(model_name).url]


def check_weights_url(url: str) -> str:
    """`url` if it is http(s) and its file name carries a sha256 prefix, else InvalidParameterError."""
    parts = urlsplit(str(url))
    name = parts.path.rsplit("/", 1)[-1]
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidParameterError("Weights url", url, "must be an http:// or https:// URL")
    if not WEIGHTS_NAME.match(name):
        raise InvalidParameterError(
            "Weights url", url,
            "its file name must follow torchvision's `<arch>-<first 8+ hex digits of the file's sha256>.pth` "
            "(e.g. resnet18-f37072fd.pth), so that the download can be checked: keep torchvision's file name "
            "on the mirror")
    return url


def pretrained_weights(model_name: str, urls: list[str] | None = None, *, attempts: int = ATTEMPTS,
                       backoff_s: float = 1.0) -> Path:
    """A local file with the ImageNet weights: the hub cache's, else the first URL that delivers a file
    whose sha256 matches its name. `urls` defaults to torchvision's; a mirror is checked the same way."""
    if urls is None:
        cached = find_cached_weights(model_name)
        if cached is not None:
            log.info("Pretrained %s weights from the torch hub cache: %s", model_name, cached)
            return cached
        urls = official_urls(model_name)
    failures = []
    for url in urls:
        try:
            return download(url, attempts=attempts, backoff_s=backoff_s)
        except OSError as exc:  # unreachable or broken off every time: try the next source
            failures.append(f"{url} ({exc})")
    raise PretrainedWeightsNotFoundError(
        f"Pretrained {model_name} weights could not be downloaded from {quote('; '.join(failures), 600)}. "
        f"Give the file instead with `--weights FILE` (torchvision's {Path(urlsplit(urls[0]).path).name}), or a "
        "reachable mirror with `--weights-url URL`."
    )


def download(url: str, *, attempts: int = ATTEMPTS, backoff_s: float = 1.0) -> Path:
    """Download `url` into the torch hub cache (or a temporary folder if the cache is read-only).

    OSError when it stays unreachable after `attempts`; WeightsHashMismatchError when every attempt
    delivered content whose sha256 does not match the name (a truncated body looks the same, so it
    is retried too).
    """
    name = Path(urlsplit(url).path).name
    match = WEIGHTS_NAME.match(name)
    if not match:
        check_weights_url(url)
    dst = _destination(name)
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            with _socket_timeout(SOCKET_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(dst), hash_prefix=match["hash"],
                                               progress=sys.stderr.isatty())
            log.info("Downloaded %s to %s", url, dst)
            return dst
        except RuntimeError as exc:  # torch.hub's hash check; the temporary file is already gone
            if "invalid hash value" not in str(exc):
                raise
            last = exc
        except (OSError, HTTPException, urllib.error.URLError) as exc:
            last = exc if isinstance(exc, OSError) else OSError(str(exc))
        log.warning("Download of %s failed (attempt %d of %d): %s", url, attempt, attempts, last)
        if attempt < attempts:
            time.sleep(backoff_s * attempt)
    if isinstance(last, RuntimeError):
        raise WeightsHashMismatchError(
            f"The file downloaded from {quote(url, 300)} does not have the sha256 its name promises "
            f"({match['hash']}...), {attempts} times: it is another or a damaged file. Nothing was written. Use "
            "torchvision's own file (same name and content) on the mirror, or give it with `--weights FILE`."
        )
    raise last if isinstance(last, OSError) else OSError(str(last))


def _destination(name: str) -> Path:
    """The hub cache entry for `name`, or a fresh temporary folder when the cache cannot be created."""
    dst = hub_cache_path(name)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dst.parent):
            pass
        return dst
    except OSError as exc:
        log.warning("Torch hub cache %s is not writable (%s): downloading to a temporary folder.",
                    dst.parent, exc.strerror or exc)
        return Path(tempfile.mkdtemp(prefix="weights-")) / name


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
