"""The Prefect API a pipeline run reports to: the configured one (PREFECT_API_URL, a Prefect profile), else a
local Prefect server that posttrain starts in a session of its own.

Why not Prefect's temporary server: Prefect starts it as a child in posttrain's process group, so Ctrl-C (SIGINT
to the whole foreground group) or a supervisor's SIGTERM to the group stops it at once, while the flow still
has to report the stop to it. Every report then fails (pages of httpx `ConnectError` tracebacks, `--- Error
logging to API ---`) and the exit hangs for minutes on Prefect's log and event workers. A server in a session of
its own outlives the stop: the flow reports its end, the workers drain, and the server is stopped last, at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from posttrain.config.schema import ConfigError
from posttrain.pipeline import lifecycle

API_URL_ENV = "PREFECT_API_URL"
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # the wait Prefect gives its own server

_own: list[subprocess.Popen] = []  # the server this process started for its runs (one, reused by later runs)


def configured_url() -> str | None:
    """The API URL from the environment or the active Prefect profile; None means Prefect would start its own."""
    if os.environ.get(API_URL_ENV):
        return os.environ[API_URL_ENV]
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def _die_with_parent():
    """On Linux, a function for the server's process to run before exec: the kernel sends it SIGTERM when posttrain
    dies, even by SIGKILL, so a server outside posttrain's process group is never orphaned. (The death that
    counts is that of the thread that starts the server: the main thread here.)"""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child between fork and exec only calls it
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_local_server(home: Path, scheduler: bool) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free 127.0.0.1 port, in a session of its own, its state in `home` (PREFECT_HOME)
    and its output in home/server.log; returns (process, API URL) once it answers. Without `scheduler`: no
    scheduler, late-runs service or UI (what a single run needs)."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect if prefect.exists() else "prefect"), "server", "start", "--host", "127.0.0.1",
               "--port", str(port)] + ([] if scheduler else ["--no-scheduler", "--no-late-runs", "--no-ui"])
    with log.open("w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent())
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + float(os.environ.get(STARTUP_TIMEOUT_ENV, 120))
    try:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"could not start a local Prefect server (its log: {log}); start one with "
                                  "`prefect server start --host 127.0.0.1` and set PREFECT_API_URL="
                                  "http://127.0.0.1:4200/api")
            time.sleep(0.5)
    except BaseException:
        lifecycle.stop_group(proc)
        raise


def ensure_api(home: Path) -> str | None:
    """Before the flow's first use of Prefect: with no API configured, start a local server for this process's
    runs and point Prefect at it; return its URL (None when one is configured). The server stops when the
    process exits: Prefect's workers drain in threading's exit hooks, which run before atexit's."""
    if configured_url():
        return None
    if not _own:
        proc, url = start_local_server(home, scheduler=False)
        _own.append(proc)
        atexit.register(lifecycle.stop_group, proc)
        os.environ[API_URL_ENV] = url
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()  # Prefect read its settings at import, before the URL existed
    return os.environ[API_URL_ENV]
