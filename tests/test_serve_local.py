"""`posttrain serve` with no PREFECT_API_URL: a real local Prefect server whose scheduler fires the cron, stopped with serve.

    .venv/bin/python -m pytest tests/test_serve_local.py -q      # slow: waits for a minute boundary

Prefect's temporary server cannot schedule ("Cannot schedule flows on an ephemeral server"): with it a
cron never fired. Here the schedule is every minute and the test waits for a run the scheduler created
(auto_scheduled) to start, then stops serve with SIGTERM and checks the server went with it.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys

import pytest

from conftest import ROOT, make_workspace
from servers import background, project_env, tail, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_serve_starts_a_local_server_whose_cron_fires_and_stops_it(tmp_path):
    import httpx
    import psutil

    ws = make_workspace(tmp_path / "ws")
    for folder in ("style", "chat"):  # every task's source is a dep of prepare
        if (ROOT / "data" / folder).exists() and not (ws / "data" / folder).exists():
            shutil.copytree(ROOT / "data" / folder, ws / "data" / folder)
    env = project_env(PREFECT_RUNNER_POLL_FREQUENCY="5")
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)  # the default: the workspace's .prefect/
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "posttrain", "serve", "--cron", "* * * * *", "--name", "every-minute"]
    with background(command, log, env=env, cwd=ws) as proc:
        found = wait_until(lambda: re.search(r"local Prefect server with its scheduler at (http://127\.0\.0\.1:(\d+))",
                                             log.read_text()), 180, "local Prefect server", proc, log)
        api, port = f"{found.group(1)}/api", int(found.group(2))
        assert (ws / ".prefect" / "prefect.db").exists()  # its state lives in the workspace
        server = [c.pid for c in psutil.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert server and {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.laddr.port == port
                            and c.status == psutil.CONN_LISTEN} == {"127.0.0.1"}
        deployment = wait_until(lambda: httpx.get(f"{api}/deployments/name/posttrain-pipeline/every-minute",
                                                  timeout=5).json()["id"], 120, "served deployment", proc, log)

        def fired():
            body = {"deployments": {"id": {"any_": [deployment]}},
                    "flow_runs": {"state": {"type": {"any_": ["RUNNING", "COMPLETED", "FAILED", "CRASHED"]}}}}
            runs = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()
            return [r for r in runs if r["auto_scheduled"]]

        started = wait_until(fired, 240, "a run started by the cron schedule", proc, log, interval=3)
        assert started[0]["expected_start_time"][17:19] == "00"  # on a minute boundary: the cron's, not a manual run
        below = psutil.Process(proc.pid).children(recursive=True)  # the server, the flow run, its stage
        assert len(below) >= 2
        proc.send_signal(signal.SIGTERM)  # to serve alone, as a supervisor would
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM, tail(log)
        assert "stopped 1 flow-run process" in log.read_text() or "flow-run process(es)" in log.read_text()
    gone, alive = psutil.wait_procs(below, timeout=20)
    assert not alive, f"outlived serve: {[(p.pid, p.cmdline()[:4]) for p in alive]}"
    assert not [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
