"""`posttrain ui` stops its MLflow server and every worker under it on SIGTERM or Ctrl-C (SIGINT).

    .venv/bin/python -m pytest tests/test_ui_stop.py -q      # slow: starts the MLflow server twice
"""

from __future__ import annotations

import signal
import sys
import time

import pytest

from servers import background, free_port, project_env, wait_until

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_its_server_and_workers(tmp_path, signum):
    import psutil

    port = free_port()
    log = tmp_path / "ui.log"
    command = [sys.executable, "-m", "posttrain", "ui", "--port", str(port), "--workers", "2"]
    with background(command, log, env=project_env(), cwd=tmp_path) as proc:
        ui = psutil.Process(proc.pid)

        def serving():
            tree = [ui, *ui.children(recursive=True)]
            pids = {p.pid for p in tree}
            listening = [c for c in psutil.net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid in pids]
            return tree if listening and len(tree) >= 3 else None  # posttrain, the server, its workers

        tree = wait_until(serving, 180, "posttrain ui serving", proc, log)
        below = [p for p in tree if p.pid != proc.pid]
        proc.send_signal(signum)  # to posttrain only, as `kill PID` or a supervisor would
        assert proc.wait(timeout=30) == 128 + signum
        gone, alive = psutil.wait_procs(below, timeout=15)
        assert not alive, f"still running after posttrain ui stopped: {[(p.pid, p.cmdline()) for p in alive]}"
    text = log.read_text()
    assert "stopped the MLflow server" in text and "Traceback" not in text, text[-3000:]
    time.sleep(0.5)
    assert not [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
