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

from posttrain.pipeline import console

PARENT_ENV = "POSTTRAIN_PARENT_RUN_ID"
EXPERIMENT_ENV = "POSTTRAIN_EXPERIMENT"
# Where a NEW experiment keeps its artifacts, e.g. s3://bucket/mlflow (with MLFLOW_S3_ENDPOINT_URL and
# AWS_* credentials for an S3-compatible store). An existing experiment keeps the location it was created with.
ARTIFACTS_ENV = "POSTTRAIN_ARTIFACT_LOCATION"
# One experiment per task, `posttrain-<data.task>` (gsm8k's is the name every run had before, so older stores
# keep their history in it); POSTTRAIN_EXPERIMENT names another.
EXPERIMENT_PREFIX = "posttrain-"
DEFAULT_TASK = "gsm8k"
# MLflow 3's UI opens a GenAI experiment on its Traces overview; a "Machine learning" one on its runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


class RegistryError(RuntimeError):
    """The tracking server or model registry answered with an error other than "not found"."""


def tracking_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow' / 'mlflow.db'}"


def workspace_task(root: str | Path = ".") -> str:
    """data.task of root's params.yaml (the default task where there is none)."""
    import yaml

    try:
        data = (yaml.safe_load((Path(root) / "params.yaml").read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return DEFAULT_TASK
    return str(data.get("task") or DEFAULT_TASK)


def experiment_name(task: str | None = None, root: str | Path = ".") -> str:
    """The experiment a run of `task` (default: the workspace's) goes to: POSTTRAIN_EXPERIMENT or posttrain-<task>."""
    return os.environ.get(EXPERIMENT_ENV) or f"{EXPERIMENT_PREFIX}{task or workspace_task(root)}"


def setup(root: str | Path = ".", task: str | None = None) -> str:
    """Point MLflow at the configured store and return the id of the task's experiment (created if new);
    `task` defaults to data.task of root's params.yaml."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    name = experiment_name(task, root)
    experiment = mlflow.get_experiment_by_name(name)
    wanted = os.environ.get(ARTIFACTS_ENV, "").rstrip("/") or None
    if experiment is None:
        artifact_location = wanted
        if artifact_location is None and uri.startswith("sqlite:"):
            # A sqlite store has no artifact root of its own: keep artifacts beside it.
            artifacts = Path(root).resolve() / "mlflow" / "artifacts"
            artifacts.mkdir(parents=True, exist_ok=True)
            artifact_location = artifacts.as_uri()
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag existed: mark it, keep a user's choice
            mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        if wanted and experiment.artifact_location.rstrip("/") != wanted:
            print(f"warning: {ARTIFACTS_ENV}={wanted} ignored: experiment '{name}' already stores artifacts at "
                  f"{experiment.artifact_location} (set {EXPERIMENT_ENV} to start a new experiment)", file=sys.stderr)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


WORKSPACE_TAG = "posttrain.workspace"


def _run_tags(root: str | Path) -> dict[str, str]:
    """Tags that let a later run find this one if its process dies without ending it."""
    from posttrain.pipeline.lifecycle import identity

    return {WORKSPACE_TAG: str(Path(root).resolve()), **identity()}


@contextlib.contextmanager
def _active_run(**start_kwargs) -> Iterator:
    """mlflow.start_run as a context that ends the run KILLED on a stop (SIGTERM, Ctrl-C), FAILED on an
    error and FINISHED otherwise (MLflow's own context says FAILED for a stop too)."""
    import mlflow

    from posttrain.pipeline.lifecycle import Stopped

    run = mlflow.start_run(**start_kwargs)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except (Stopped, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


@contextlib.contextmanager
def stage_run(stage_name: str, root: str | Path = ".", task: str | None = None) -> Iterator:
    setup(root, task)
    parent = os.environ.get(PARENT_ENV)
    with _active_run(run_name=stage_name, parent_run_id=parent or None, nested=bool(parent),
                     tags={"posttrain.stage": stage_name, **_run_tags(root)}) as run:
        yield run


def end_orphaned_runs(root: str | Path = ".") -> list[str]:
    """Mark this workspace's RUNNING runs whose process is gone (SIGKILL, power loss) as KILLED.

    Called by a new pipeline run while it holds the workspace lock. Runs of a live process (a stage
    run by hand) and runs from another host are left alone. Returns the ids it ended.
    """
    from mlflow import MlflowClient

    from posttrain.pipeline.lifecycle import is_alive

    client = MlflowClient()
    # Every experiment: a workspace that switched tasks may have left a run in another task's experiment.
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    workspace = str(Path(root).resolve()).replace("'", "\\'")
    runs = client.search_runs(experiments, max_results=1000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{WORKSPACE_TAG}` = '{workspace}'")
    ended = []
    for run in runs:
        if not is_alive(run.data.tags):
            client.set_tag(run.info.run_id, "posttrain.ended_by", "a later run: its process was gone")
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


@contextlib.contextmanager
def pipeline_run(root: str | Path = ".", run_name: str | None = None, tags: dict | None = None,
                 task: str | None = None) -> Iterator:
    """The parent run, in the task's experiment; exports its id so stage subprocesses nest under it."""
    setup(root, task)
    for run_id in end_orphaned_runs(root):
        console.say(f"marked MLflow run {run_id} KILLED: the process that ran it is gone")
    with _active_run(run_name=run_name, tags={"posttrain.pipeline": "true", **_run_tags(root), **(tags or {})}) as run:
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


def params_hash(flat: dict) -> str:
    """8 hex digits over every param value: two runs with the same hash ran the same params.yaml."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_name(params, flat: dict) -> str:
    """What the parent run's name says: the task, the RL method and the params hash (`gsm8k-grpo-1a2b3c4d`)."""
    return f"{params.data.task}-{params.rl.method}-{params_hash(flat)}"


def prepared_data_md5(root: str | Path = ".") -> str | None:
    """DVC's md5 of data/prepared as dvc.lock records it (`<md5>.dir`): the data version a run used."""
    import yaml

    from posttrain.pipeline import graph

    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    prepare = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("prepare", {})
    return next((out.get("md5") for out in prepare.get("outs", []) if out.get("path") == graph.PREPARED), None)


def file_md5(path: Path) -> str:
    """The md5 of a file's bytes: what DVC 3 records for it inside data/prepared's .dir listing."""
    import hashlib

    digest = hashlib.md5()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# the split files a stage reads -> MLflow's dataset context for them
DATA_CONTEXTS = {"train.jsonl": "training", "val.jsonl": "validation", "test.jsonl": "evaluation"}


def log_data_inputs(paths: list[Path], task: str, root: str | Path = ".", versioned: bool = True) -> list[str]:
    """Log the prepared splits a stage reads as MLflow datasets of its run (the runs table's Dataset column).

    name `<task>-<split>`, digest the file's md5 (DVC's), source its path; tagged with the md5 of the whole
    data/prepared from dvc.lock, which `dvc checkout` / `dvc pull` restores (README: Lineage). `versioned=False`
    for the stage that writes data/prepared (DVC records its new md5 only after the stage)."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    version = prepared_data_md5(root) if versioned else None
    logged = []
    for path in paths:
        path = Path(path)
        if path.name not in DATA_CONTEXTS or not path.is_file():
            continue
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local sources, the same one
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(path.resolve()))
        dataset = MetaDataset(source, name=f"{task}-{path.stem}", digest=file_md5(path))
        mlflow.log_input(dataset, context=DATA_CONTEXTS[path.name],
                         tags={"dvc.data_prepared_md5": version} if version else None)
        logged.append(dataset.name)
    return logged
