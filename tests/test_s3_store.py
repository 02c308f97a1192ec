"""An S3-compatible object store (moto's server mode on 127.0.0.1) as DVC remote and MLflow artifact store.

    .venv/bin/python -m pytest tests/test_s3_store.py -q

The tiny pipeline runs with `dvc repro` while MLflow writes every artifact (training logs, eval
records, the registered model) to s3://posttrain/mlflow; then `dvc push`, the cache and the outputs
are deleted, and `dvc pull` brings back byte-identical outputs from s3://posttrain/dvc.
"""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_workspace

BUCKET = "posttrain"
DVC = str(Path(sys.executable).parent / "dvc")
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A fresh S3-compatible server with one bucket; yields (endpoint URL, boto3 client, AWS_* environment)."""
    import boto3
    from moto.server import ThreadedMotoServer

    # Dummy credentials only: a developer's ~/.aws profile must not leak in (empty files, not /dev/null,
    # which aiobotocore refuses).
    credentials = dict(DUMMY_CREDENTIALS)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        (tmp_path / name).write_text("")
        credentials[name] = str(tmp_path / name)
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    try:
        yield endpoint, client, credentials
    finally:
        server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd, ws, env):
    result = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_against_s3_dvc_remote_and_mlflow_artifact_store(tmp_path, s3):
    import mlflow
    from mlflow import MlflowClient

    endpoint, client, credentials = s3
    ws = make_workspace(tmp_path / "ws")
    env = dict(os.environ, **credentials, MLFLOW_S3_ENDPOINT_URL=endpoint, TQDM_DISABLE="1",
               POSTTRAIN_ARTIFACT_LOCATION=f"s3://{BUCKET}/mlflow", PREFECT_HOME=str(ws / ".prefect"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in ("MLFLOW_TRACKING_URI", "POSTTRAIN_PARENT_RUN_ID", "POSTTRAIN_LAUNCHER"):
        env.pop(name, None)
    _run([DVC, "remote", "add", "-d", "store", f"s3://{BUCKET}/dvc"], ws, env)
    _run([DVC, "remote", "modify", "store", "endpointurl", endpoint], ws, env)

    _run([DVC, "repro"], ws, env)

    # MLflow: artifacts went to the bucket, none to the local folder; the registry points into the bucket.
    keys = _keys(client, "mlflow/")
    assert any(k.endswith("/artifacts/sft/train_log.json") for k in keys), keys
    assert any(k.endswith("/artifacts/eval/records.jsonl") for k in keys)
    assert any(k.endswith("/artifacts/model/MODEL_CARD.md") for k in keys)
    local = ws / "mlflow" / "artifacts"
    assert not local.exists() or not any(p.is_file() for p in local.rglob("*"))
    tracking = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    version = tracking.get_model_version("gsm8k-policy", "1")
    assert version.source.startswith(f"s3://{BUCKET}/mlflow/") and version.source.endswith("/model")
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint  # download below runs in this process
    try:
        mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{version.source}/adapter_model.safetensors",
                                                           dst_path=str(tmp_path / "fetched")))
    finally:
        os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)
    assert _sha(fetched) == _sha(ws / "models" / "rl" / "adapter_model.safetensors")  # the registered adapter is the rl output

    # DVC: push every stage output, lose cache and outputs, pull them back byte for byte.
    outputs = [ws / "models" / "rl" / "adapter_model.safetensors", ws / "models" / "sft_adapter" / "adapter_model.safetensors",
               ws / "models" / "base" / "model.safetensors", ws / "data" / "prepared" / "train.jsonl",
               ws / "reports" / "eval" / "rl" / "records.jsonl"]
    before = {path: _sha(path) for path in outputs}
    _run([DVC, "push"], ws, env)
    pushed = _keys(client, "dvc/")
    assert any("/files/md5/" in k for k in pushed) and len(pushed) >= len(outputs)
    for folder in (ws / ".dvc" / "cache", ws / "models", ws / "data" / "prepared", ws / "reports" / "eval"):
        shutil.rmtree(folder)
    assert "deleted" in _run([DVC, "status"], ws, env)
    _run([DVC, "pull"], ws, env)
    assert {path: _sha(path) for path in outputs} == before
    assert "up to date" in _run([DVC, "status"], ws, env)


def test_artifact_location_applies_to_new_experiments_and_warns_for_existing_ones(tmp_path, monkeypatch, capsys):
    import mlflow

    from posttrain.release import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.ARTIFACTS_ENV, raising=False)
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "local-first")
    previous_uri = mlflow.get_tracking_uri()
    try:
        local_id = tracking.setup(tmp_path)
        assert mlflow.get_experiment(local_id).artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()

        monkeypatch.setenv(tracking.ARTIFACTS_ENV, f"s3://{BUCKET}/mlflow/")
        assert tracking.setup(tmp_path) == local_id  # an existing experiment keeps its artifacts where they are
        assert f"{tracking.ARTIFACTS_ENV}=s3://{BUCKET}/mlflow ignored" in capsys.readouterr().err
        monkeypatch.setenv(tracking.EXPERIMENT_ENV, "in-the-bucket")
        bucket_id = tracking.setup(tmp_path)
        assert mlflow.get_experiment(bucket_id).artifact_location == f"s3://{BUCKET}/mlflow"
        assert "ignored" not in capsys.readouterr().err
    finally:
        mlflow.set_tracking_uri(previous_uri)
