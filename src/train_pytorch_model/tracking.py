"""MLflow logging of parameters, per-epoch metrics and artifacts.

Uses the active run when there is one (an Azure ML job sets MLFLOW_TRACKING_URI and
MLFLOW_RUN_ID, so `start_run()` attaches to the job's run); otherwise MLflow's default store,
a local `sqlite:///mlflow.db`, or `--mlflow-tracking-uri`. Tracking is a side channel: a
tracking-server failure is warned about once and never fails a training run. An HTTP tracking
server that does not answer within seconds is not retried for minutes (MLflow's own retries):
the run logs to a local sqlite store instead, with a warning.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

EXPERIMENT = "train_pytorch_model"
PROBE_TIMEOUT_S = 3.0
FALLBACK_URI = "sqlite:///mlflow.db"  # in the working directory, like MLflow's own default
_USERINFO = re.compile(r"://[^/@\s]+@")  # https://user:token@host/
_QUERY_SECRET = re.compile(r"([?&](?:sig|token|key|password|code)=)[^&\s]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Credentials that tracking URIs and their error messages may carry never reach the log."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub("://***@", text)) if text else text


def _default_experiment_id(mlflow) -> str | None:
    """Our experiment, unless the environment names a run or experiment (an Azure ML job does).

    Passed to start_run rather than set with set_experiment, which would cache the id process-wide."""
    if any(os.environ.get(name) for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")):
        return None
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment:
        return experiment.experiment_id
    return client.create_experiment(EXPERIMENT, artifact_location=_local_artifact_root(mlflow.get_tracking_uri()))


def unreachable(tracking_uri: str) -> str | None:
    """Why an http(s) tracking server cannot be reached (one TCP connect, a few seconds at most); None when it
    can, or when the URI is not http(s) (a local store, or a plugin's scheme such as azureml://)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_TIMEOUT_S):
            return None
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _local_artifact_root(tracking_uri: str) -> str | None:
    """`mlruns/` beside a local sqlite database; MLflow's default is ./mlruns of whatever the working
    directory is (the component's code folder under run-component). None: the server decides."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix):]).resolve().parent / "mlruns").as_uri()


class Tracker:
    def __init__(self, enabled: bool, tracking_uri: str | None = None, run_name: str | None = None):
        self.enabled = enabled
        self.run = None
        self._owns_run = False
        self._warned = False
        import mlflow

        self.mlflow = mlflow  # set even when disabled: the log_* calls name it before _call sees run is None
        if not enabled:
            return
        try:
            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)
            problem = unreachable(mlflow.get_tracking_uri())
            if problem:
                log.warning("MLflow tracking failed: server %s is unreachable (%s); logging to the local store %s "
                            "instead.",
                            redact(mlflow.get_tracking_uri()), redact(problem)[:300], FALLBACK_URI)
                mlflow.set_tracking_uri(FALLBACK_URI)
            self.run = mlflow.active_run()
            if self.run is None:
                self.run = mlflow.start_run(experiment_id=_default_experiment_id(mlflow), run_name=run_name)
                self._owns_run = True
            log.info("MLflow: logging to run %s at %s", self.run.info.run_id, redact(mlflow.get_tracking_uri()))
        except Exception as exc:  # tracking must never fail training
            self._warn(exc)

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            log.warning("MLflow tracking failed, training continues without it: %s: %s", type(exc).__name__,
                        redact(str(exc))[:500])
            self._warned = True
        self.run = None

    def _call(self, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            self._warn(exc)

    def log_params(self, params: dict) -> None:
        self._call(self.mlflow.log_params, {k: ("" if v is None else v) for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._call(self.mlflow.log_metrics, finite, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call(self.mlflow.log_artifact, path, artifact_path)

    def set_tags(self, tags: dict) -> None:
        self._call(self.mlflow.set_tags, tags)

    def tag_run(self, run_id: str, tags: dict) -> None:
        """Tag another run of the same store (the training run an evaluation belongs to). That run may live in
        another store (trained elsewhere): then only this is logged, and this run's logging goes on."""
        if self.run is None:
            return
        try:
            client = self.mlflow.MlflowClient()
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
        except Exception as exc:  # the run is not in this store, or the server refused
            log.info("MLflow: run %s not tagged (%s: %s)", run_id, type(exc).__name__, redact(str(exc))[:200])

    def close(self, failed: bool = False) -> None:
        if self.run is not None and self._owns_run:
            self._call(self.mlflow.end_run, "FAILED" if failed else "FINISHED")
        self.run = None
