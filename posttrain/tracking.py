"""MLflow setup: the embedded default is a sqlite store under mlflow/, any other by MLFLOW_TRACKING_URI.

A pipeline run is one parent MLflow run; each stage opens a nested run under the parent whose id
arrives in POSTTRAIN_PARENT_RUN_ID (stages run as `dvc repro` subprocesses). A stage run by hand
with no parent gets a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

PARENT_ENV = "POSTTRAIN_PARENT_RUN_ID"
EXPERIMENT_ENV = "POSTTRAIN_EXPERIMENT"
# Where a NEW experiment keeps its artifacts, e.g. s3://bucket/mlflow (with MLFLOW_S3_ENDPOINT_URL and
# AWS_* credentials for an S3-compatible store). An existing experiment keeps the location it was created with.
ARTIFACTS_ENV = "POSTTRAIN_ARTIFACT_LOCATION"
DEFAULT_EXPERIMENT = "posttrain-gsm8k"


def tracking_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow' / 'mlflow.db'}"


def setup(root: str | Path = ".") -> str:
    """Point MLflow at the configured store and return the experiment id (created if new)."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    wanted = os.environ.get(ARTIFACTS_ENV, "").rstrip("/") or None
    if experiment is None:
        artifact_location = wanted
        if artifact_location is None and uri.startswith("sqlite:"):
            # A sqlite store has no artifact root of its own: keep artifacts beside it.
            artifacts = Path(root).resolve() / "mlflow" / "artifacts"
            artifacts.mkdir(parents=True, exist_ok=True)
            artifact_location = artifacts.as_uri()
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
        if wanted and experiment.artifact_location.rstrip("/") != wanted:
            print(f"warning: {ARTIFACTS_ENV}={wanted} ignored: experiment '{name}' already stores artifacts at "
                  f"{experiment.artifact_location} (set {EXPERIMENT_ENV} to start a new experiment)", file=sys.stderr)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextlib.contextmanager
def stage_run(stage_name: str, root: str | Path = ".") -> Iterator:
    import mlflow

    setup(root)
    parent = os.environ.get(PARENT_ENV)
    with mlflow.start_run(run_name=stage_name, parent_run_id=parent or None, nested=bool(parent),
                          tags={"posttrain.stage": stage_name}) as run:
        yield run


@contextlib.contextmanager
def pipeline_run(root: str | Path = ".", run_name: str | None = None, tags: dict | None = None) -> Iterator:
    """The parent run; exports its id so stage subprocesses nest under it."""
    import mlflow

    setup(root)
    with mlflow.start_run(run_name=run_name, tags={"posttrain.pipeline": "true", **(tags or {})}) as run:
        previous = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def log_flat_params(values: dict) -> None:
    import mlflow

    # MLflow caps a param value at 6000 characters and a batch at 100 params.
    items = [(k, str(v)[:6000]) for k, v in values.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start:start + 100]))
