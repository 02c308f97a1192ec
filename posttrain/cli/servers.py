"""The servers the `posttrain` command starts, and their supervision: `posttrain ui` (an MLflow server) and
`posttrain serve` (the schedule, with a local Prefect server when PREFECT_API_URL names none).

A server runs in a process group of its own, so a stop reaches its workers too: SIGINT/SIGTERM to posttrain
stop the whole group (SIGTERM, then SIGKILL after a grace period), and a server that dies on its own does
not leave its workers behind. `serve` runs Prefect's runner in a thread and, on a stop, ends the flow runs it
started before the local server goes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from posttrain.config.schema import ConfigError
from posttrain.pipeline import prefect_api
from posttrain.pipeline.lifecycle import Stopped, descendants, process_start, signal_all, stop_group, stop_on_signals

# --------------------------------------------------------------------------- the MLflow server (posttrain ui)


def mlflow_server_command(uri: str, host: str, port: int, workers: int, artifacts_destination: str | None = None,
                          auth: bool = False) -> list[str]:
    """`mlflow server` on the tracking store `uri`; ConfigError when --auth lacks the secret it needs."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", str(workers)]
    if artifacts_destination:  # clients then log artifacts through this server (proxied)
        command += ["--artifacts-destination", artifacts_destination]
    if auth:  # users from MLFLOW_AUTH_CONFIG_PATH's database; clients send MLFLOW_TRACKING_USERNAME/PASSWORD
        if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            raise ConfigError("--auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (a random secret, the same for every "
                              "server process) and MLFLOW_AUTH_CONFIG_PATH (users database, admin account)")
        command += ["--app-name", "basic-auth"]
    return command


def runs_url(host: str, port: int, backend_store_uri: str | None = None) -> str:
    """The address of the experiment's runs table. MLflow 3.17's UI opens on its GenAI view (traces) whatever the
    experiment's kind tag says, unless the address asks for workflowType=machine_learning."""
    url = f"http://{host}:{port}"
    if backend_store_uri:  # another store: which experiment is not ours to say
        return url
    from posttrain.release.tracking import setup

    try:
        experiment_id = setup(".")  # the workspace's experiment (created and tagged as model training if new)
    except Exception:  # noqa: BLE001 - an unreadable store: the server will say why
        return url
    return f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


# --------------------------------------------------------------------------- one server in its process group


def serve_until_stopped(command: list[str], what: str) -> int:
    """Run a server in a process group of its own; SIGINT/SIGTERM here stop that whole group (its workers too)."""
    proc = subprocess.Popen(command, start_new_session=True)  # Ctrl-C reaches us, we stop the group

    def handler(signum, _frame):
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    except Stopped as stop:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        stop_group(proc)
        proc.wait()
        print(f"posttrain: {stop}: stopped the {what} (process group {proc.pid}) and its workers", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    stop_group(proc, grace=2.0)  # the server died on its own: take its orphaned workers along
    return code


# --------------------------------------------------------------------------- the schedule (posttrain serve)

_LOCAL_SERVER: list[subprocess.Popen] = []  # the local Prefect server's process while serve runs


@contextlib.contextmanager
def local_prefect_server() -> Iterator[str]:
    """A real Prefect server (API + scheduler) on 127.0.0.1, its state in $PREFECT_HOME (the workspace's .prefect/):
    Prefect's temporary server cannot run schedules. Yields its API URL and stops it on exit."""
    home = Path(os.environ["PREFECT_HOME"])
    proc, url = prefect_api.start_local_server(home, scheduler=True)
    log = home / "server.log"
    try:
        print(f"started a local Prefect server with its scheduler at {url.removesuffix('/api')} (state in {home}, "
              f"log {log}); it stops with serve. PREFECT_API_URL picks another server", flush=True)
        _LOCAL_SERVER.append(proc)
        yield url
    finally:
        if proc in _LOCAL_SERVER:
            _LOCAL_SERVER.remove(proc)
        stop_group(proc)


def _server_pids() -> set[int]:
    return {pid for proc in _LOCAL_SERVER for pid in (proc.pid, *descendants(proc.pid))}


def _stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM these processes, SIGKILL the ones left after `grace` seconds."""
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(process_start(pid) for pid in pids):
        time.sleep(0.2)
    signal_all([pid for pid in pids if process_start(pid)], signal.SIGKILL)


def serve_until_signalled(serve: Callable[[], None]) -> int:
    """Run `serve` (Prefect's runner) until it ends or SIGTERM/SIGINT arrives; on a signal, stop the flow runs it
    started (their stages end their MLflow runs KILLED) and return 128 + the signal. Its error is raised here.

    Prefect's runner, in the main thread, answers SIGTERM with sys.exit and leaves its flow runs running
    (3.8: "coroutine 'Runner.astop' was never awaited"). In a thread it installs no handler, so this one decides."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            serve()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failure.append(err)

    thread = threading.Thread(target=target, name="prefect-serve", daemon=True)
    thread.start()
    try:
        with stop_on_signals(forward_to_children=False):
            while thread.is_alive():
                thread.join(0.5)
    except Stopped as stop:
        server_pids = _server_pids()
        runs = [pid for pid in descendants(os.getpid()) if pid not in server_pids]
        _stop_pids(runs)
        print(f"posttrain serve: {stop}: stopped {len(runs)} flow-run process(es) and the schedule", file=sys.stderr)
        return 128 + stop.signum
    if failure:
        raise failure[0]
    return 0
