"""The pipeline under a real Prefect server on 127.0.0.1: a cron-scheduled `serve` deployment and a process work pool.

    .venv/bin/python -m pytest tests/test_ops_prefect.py -q

One server for both tests. Each registers the tiny pipeline, triggers one run through the server's API
and waits for the run to reach COMPLETED, then checks what the run wrote.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import copy_workspace, make_workspace
from servers import BIN, background, free_port, project_env, tail, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    import httpx

    home = tmp_path_factory.mktemp("prefect_server")
    port = free_port()
    env = project_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false",
                      # make the scheduler visit new deployments within seconds (defaults: 5 s / 60 s)
                      PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1",
                      PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with background([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    log, env=env) as proc:
        api = f"http://127.0.0.1:{port}/api"
        wait_until(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, 180, "prefect server", proc, log)
        yield api, log


@pytest.fixture(scope="module")
def workspace(reproduced_workspace, tmp_path_factory):
    """One tiny workspace for both tests, a copy of the session's reproduced one: each triggered run changes
    eval.n_questions, so DVC reruns the evaluations and the gate and finds the rest up to date (the flow from
    a fresh workspace is tests/test_pipeline.py's and test_bare_clone's)."""
    return copy_workspace(reproduced_workspace, tmp_path_factory.mktemp("prefect_ws") / "ws")


def client_env(api: str, home, **extra) -> dict:
    # PREFECT_HOME of its own, so nothing falls back to an ephemeral server or a profile elsewhere
    return project_env(PREFECT_API_URL=api, PREFECT_HOME=str(home), **extra)


def get_deployment(api: str, flow_and_name: str) -> dict | None:
    import httpx

    response = httpx.get(f"{api}/deployments/name/{flow_and_name}", timeout=10)
    return response.json() if response.status_code == 200 else None


def run_and_wait(api: str, deployment_id: str, timeout: float, proc, log) -> dict:
    """Create one flow run of the deployment now and wait for a final state."""
    import httpx

    # The SQLite-backed server can answer a write with an error while its scheduler holds the database
    # (CI once got a body with no run id back, under load): try again for a while, and show what it said.
    answers = []
    for _ in range(30):
        response = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={}, timeout=10)
        if response.is_success:
            break
        answers.append(f"{response.status_code} {response.text[:300]}")
        time.sleep(2)
    else:
        pytest.fail(f"the server never created a run of {deployment_id}: {answers[-3:]}\n{tail(log)}")
    flow_run = response.json()
    final = {}

    def finished():
        run = httpx.get(f"{api}/flow_runs/{flow_run['id']}", timeout=10).json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            final.update(run)
            return True

    wait_until(finished, timeout, f"flow run {flow_run['id']}", proc, log, interval=2)
    assert final["state"]["type"] == "COMPLETED", f"{final['state']}\n{tail(log, 6000)}"
    return final


def test_serve_registers_a_cron_deployment_and_a_triggered_run_completes(prefect_server, workspace, tmp_path):
    import httpx

    api, server_log = prefect_server
    ws = workspace
    log = tmp_path / "serve.log"
    env = client_env(api, tmp_path / "prefect_client", PREFECT_RUNNER_POLL_FREQUENCY="2")
    command = [sys.executable, "-m", "posttrain", "-q", "serve", "--cron", "0 2 * * *", "--name", "tiny-nightly",
               "-S", "eval.n_questions=4"]
    with background(command, log, env=env, cwd=ws) as proc:
        deployment = wait_until(lambda: get_deployment(api, "posttrain-pipeline/tiny-nightly"), 120,
                                "served deployment", proc, log)
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
        assert deployment["parameters"] == {"root": str(ws.resolve()), "overrides": ["eval.n_questions=4"]}
        # One run at a time: a run scheduled while another holds the workspace queues behind it.
        assert (deployment.get("global_concurrency_limit") or {}).get("limit") == 1  # Prefect 3.8 keeps it here
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"

        def scheduled_runs():
            body = {"deployments": {"id": {"any_": [deployment["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
            return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()

        # The server's scheduler turns the cron into future runs (SQLAlchemy 2.1 broke exactly this).
        upcoming = wait_until(scheduled_runs, 60, "runs created from the cron schedule", proc, server_log)
        assert all(run["expected_start_time"][11:16] == "02:00" for run in upcoming)

        started = time.time()
        run_and_wait(api, deployment["id"], 900, proc, log)
    print(f"served tiny pipeline run: {time.time() - started:.0f} s")
    # The run used params.yaml plus the deployment's override: the evaluations reran and the gate registered.
    assert "n_questions: 4" in (ws / "params.yaml").read_text()
    assert json.loads((ws / "reports/eval_rl.json").read_text())["n_questions"] == 4
    assert json.loads((ws / "reports/promotion.json").read_text())["model_version"] >= 1


def test_process_work_pool_worker_runs_the_deployment(prefect_server, workspace, tmp_path):
    import httpx

    api, _ = prefect_server
    ws = workspace
    previous = ws / "reports/promotion.json"
    versions_before = json.loads(previous.read_text())["model_version"] if previous.exists() else 0
    worker_log = tmp_path / "worker.log"
    env = client_env(api, tmp_path / "prefect_client", PREFECT_WORKER_QUERY_SECONDS="2",
                     PREFECT_WORKER_PREFETCH_SECONDS="2")
    worker_cmd = [str(BIN / "prefect"), "worker", "start", "--pool", "tiny-pool", "--type", "process"]
    with background(worker_cmd, worker_log, env=env, cwd=tmp_path) as worker:
        # `worker start` creates the pool (type process) when it does not exist yet.
        pool = wait_until(lambda: httpx.get(f"{api}/work_pools/tiny-pool", timeout=5).json().get("type"), 120,
                          "work pool created by the worker", worker, worker_log)
        assert pool == "process"
        deploy = subprocess.run(
            [sys.executable, "-m", "posttrain", "-q", "deploy", "--pool", "tiny-pool", "--name", "tiny",
             "-S", "eval.n_questions=3"], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-3000:]
        assert "on work pool 'tiny-pool'" in deploy.stdout
        deployment = get_deployment(api, "posttrain-pipeline/tiny")
        assert deployment["work_pool_name"] == "tiny-pool" and deployment["schedules"] == []
        assert (deployment.get("global_concurrency_limit") or {}).get("limit") == 1  # Prefect 3.8 keeps it here
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"

        final = run_and_wait(api, deployment["id"], 900, worker, worker_log)
    assert final["work_pool_name"] == "tiny-pool"
    # This worker ran it: the flow's subprocess writes to the worker's output. (Its own "submitting flow run"
    # INFO line is not always there: it was missing in one CI run where the run itself completed.)
    assert re.search(r"^eval_rl\s+ran\s", worker_log.read_text(), re.M)  # the flow's one line per stage
    # The worker's run rewrote params.yaml with its override and re-evaluated (DVC reran what changed).
    assert "n_questions: 3" in (ws / "params.yaml").read_text()
    assert json.loads((ws / "reports/eval_rl.json").read_text())["n_questions"] == 3
    assert json.loads((ws / "reports/promotion.json").read_text())["model_version"] == versions_before + 1


def test_deploy_refuses_a_bad_override_before_registering(tmp_path):
    """No server needed: the override is validated against params.yaml first, in one line."""
    ws = make_workspace(tmp_path / "ws")
    env = project_env(PREFECT_API_URL="http://127.0.0.1:9/api", PREFECT_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-m", "posttrain", "deploy", "--pool", "p", "-S", "eval.n_questions=many"],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "'eval.n_questions' must be int" in done.stderr
