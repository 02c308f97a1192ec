"""Real servers for the operations tests: background processes on 127.0.0.1 and a throwaway PostgreSQL.

Every server is started by the test that needs it and stopped (its whole process group) afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def project_env(**extra: str) -> dict:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def wait_until(check: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.5):
    """Poll `check` until it returns something truthy; fail with the log if the process died or time ran out."""
    deadline = time.time() + timeout
    while True:
        try:
            value = check()
        except Exception:  # not up yet: connection refused, 404, ...
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{tail(log) if log else ''}")
        if time.time() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s\n{tail(log) if log else ''}")
        time.sleep(interval)


@contextlib.contextmanager
def background(command: list[str], log: Path, env: dict | None = None, cwd: str | Path | None = None) -> Iterator[subprocess.Popen]:
    """Run a server in its own process group; stop the whole group on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    import httpx

    return httpx.get(url, auth=auth, timeout=5).status_code


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def require_postgres() -> Path:
    """The PostgreSQL binaries; skip only outside CI (.ci/run installs them, so in CI their absence fails)."""
    bindir = postgres_bindir()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries not found in CI: .ci/run installs the Debian package `postgresql`")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql); CI installs and runs them")
    return bindir


@contextlib.contextmanager
def postgres_server(databases: list[str]) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 in a temp folder; yields postgresql://postgres@127.0.0.1:PORT."""
    bindir = require_postgres()
    # PostgreSQL refuses to run as root: run its binaries as the `postgres` user then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="posttrain-pg-"))
    if as_user:
        shutil.chown(data, "postgres")
    port = free_port()
    log = data / "server.log"

    def run(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}\n{tail(log)}")

    cluster = data / "cluster"
    try:
        run(str(bindir / "initdb"), "-D", str(cluster), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(cluster), "-l", str(log), "-w", "-t", "60", "start",
            "-o", f"-h 127.0.0.1 -p {port} -k {data}")
        for name in databases:
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        if (cluster / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(cluster), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)
