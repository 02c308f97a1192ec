"""The tiny pipeline logging and promoting through a real MLflow server: PostgreSQL backend, proxied artifacts, basic auth.

    .venv/bin/python -m pytest tests/test_ops_mlflow_server.py -q

The server is `posttrain ui --backend-store-uri postgresql://... --artifacts-destination ... --auth` on
127.0.0.1. Skipped (with the reason) only where the PostgreSQL binaries are missing outside CI.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import make_workspace
from servers import background, free_port, postgres_server, project_env, tail, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ADMIN = ("admin", "admin-password-for-tests")
USER = ("pipeline", "pipeline-password-for-tests")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    import httpx

    tmp = tmp_path_factory.mktemp("mlflow_server")
    with postgres_server(["mlflow", "mlflow_auth"]) as pg:
        auth_ini = tmp / "auth.ini"
        auth_ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {pg}/mlflow_auth\n"
            f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        artifacts = tmp / "artifacts"
        log = tmp / "server.log"
        command = [sys.executable, "-m", "posttrain", "ui", "--port", str(port),
                   "--backend-store-uri", f"{pg}/mlflow", "--artifacts-destination", str(artifacts), "--auth"]
        env = project_env(MLFLOW_AUTH_CONFIG_PATH=str(auth_ini), MLFLOW_FLASK_SERVER_SECRET_KEY="csrf-secret-for-tests")
        with background(command, log, env=env, cwd=tmp) as proc:
            wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 240, "mlflow server", proc, log)
            created = httpx.post(f"{url}/api/2.0/mlflow/users/create", json={"username": USER[0], "password": USER[1]},
                                 auth=ADMIN, timeout=30)
            assert created.status_code == 200, created.text
            yield {"url": url, "pg": pg, "artifacts": artifacts, "log": log}


def test_unauthenticated_client_is_refused_and_a_configured_user_is_let_in(mlflow_server):
    import httpx

    url = mlflow_server["url"]
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert httpx.get(search, timeout=10).status_code == 401
    assert httpx.get(search, auth=(USER[0], "wrong"), timeout=10).status_code == 401
    assert httpx.get(search, auth=USER, timeout=10).status_code == 200


def test_tiny_pipeline_logs_and_promotes_through_the_postgres_server(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    import psycopg2
    from mlflow import MlflowClient

    url = mlflow_server["url"]
    ws = make_workspace(tmp_path / "ws")
    env = project_env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=USER[0], MLFLOW_TRACKING_PASSWORD=USER[1],
                      PREFECT_HOME=str(ws / ".prefect"))
    run = subprocess.run([sys.executable, "-m", "posttrain", "-q", "run", "--run-name", "pg"], cwd=ws, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + tail(mlflow_server["log"])
    assert not (ws / "mlflow" / "mlflow.db").exists()  # nothing went to the embedded store

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
    mlflow.set_tracking_uri(url)
    try:
        client = MlflowClient()
        experiment = client.get_experiment_by_name("posttrain-gsm8k")
        runs = client.search_runs(experiment.experiment_id)
        parent = [r for r in runs if r.data.tags.get("posttrain.pipeline") == "true"]
        assert len(parent) == 1 and parent[0].info.run_name == "pg"
        stages = {r.data.tags.get("posttrain.stage") for r in runs} - {None}
        assert {"prepare", "sft", "rl", "eval_rl", "promote"} <= stages
        version = client.get_model_version("gsm8k-policy", "1")
        decision = json.loads((ws / "reports/promotion.json").read_text())
        assert version.tags["gate.decision"] == ("promoted" if decision["promote"] else "rejected")
        # Artifacts went through the server (proxied) into its artifact destination, and come back through it.
        promote_run = next(r for r in runs if r.data.tags.get("posttrain.stage") == "promote")
        assert promote_run.info.artifact_uri.startswith("mlflow-artifacts:")
        card = mlflow.artifacts.download_artifacts(run_id=promote_run.info.run_id, artifact_path="model/MODEL_CARD.md",
                                                   dst_path=str(tmp_path / "download"))
        assert "# gsm8k-policy" in open(card).read()
        stored = list(mlflow_server["artifacts"].rglob("MODEL_CARD.md"))
        assert len(stored) == 1 and stored[0].read_text() == open(card).read()
    finally:
        mlflow.set_tracking_uri(None)

    # ... and the runs are rows in the PostgreSQL database, not in a file store.
    with psycopg2.connect(f"{mlflow_server['pg']}/mlflow") as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == len(runs)
        cursor.execute("SELECT count(*) FROM model_versions WHERE name = 'gsm8k-policy'")
        assert cursor.fetchone()[0] == 1
