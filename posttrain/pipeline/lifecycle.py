"""A run's life on one workspace: one run at a time, clean stops on SIGTERM/Ctrl-C, who owns which process.

    posttrain run --wait 600        # queue behind a run that holds this workspace, for up to 10 minutes

`posttrain run` holds an exclusive `flock` on .posttrain/run.lock for its whole life, so a second
run on the same workspace is refused in one line that names the holder (or waits with --wait).
The kernel drops the lock when the holder dies, even by SIGKILL: a lock is never stale.

On SIGTERM or SIGINT the running stage and everything under it get SIGTERM (so the stage marks its
MLflow run KILLED), then `Stopped` unwinds the flow, which marks the parent run KILLED.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = Path(".posttrain") / "run.lock"
STOP_GRACE_SECONDS = 10.0  # a stage gets this long to mark its run KILLED before SIGKILL


class WorkspaceBusy(RuntimeError):
    """Another run holds the workspace: not a transient error, never retried."""


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: unwind everything (a BaseException, so no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# --------------------------------------------------------------------------- process identity


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), or None if it is gone.

    A pid alone can be reused by an unrelated process; pid + start time cannot.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): existence is all we can tell
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ')' may hold spaces


def identity() -> dict[str, str]:
    """Tags that tie an MLflow run to the process that writes it."""
    pid = os.getpid()
    return {"posttrain.host": socket.gethostname(), "posttrain.pid": str(pid),
            "posttrain.pid_start": process_start(pid) or "unknown"}


def is_alive(tags: dict[str, str]) -> bool:
    """Whether the process named by identity() tags still runs (True when it cannot be told: other host)."""
    if tags.get("posttrain.host") != socket.gethostname() or not tags.get("posttrain.pid", "").isdigit():
        return True
    start = process_start(int(tags["posttrain.pid"]))
    if start is None:
        return False
    recorded = tags.get("posttrain.pid_start", "unknown")
    return "unknown" in (start, recorded) or start == recorded


# --------------------------------------------------------------------------- the workspace lock

_held: dict[str, object] = {}  # resolved lock path -> open file: the lock is re-entrant within a process


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    parts = [f"pid {info['pid']}" if "pid" in info else None,
             f"MLflow run {info['run_id']}" if info.get("run_id") else None,
             f"started {info['started']}" if "started" in info else None]
    return ", ".join(p for p in parts if p) or "unknown holder"


@contextlib.contextmanager
def workspace_lock(root: str | Path = ".", wait: float | None = 0.0) -> Iterator[Path]:
    """Hold the workspace for one run. wait: 0 = refuse at once, None = wait forever, else seconds."""
    path = (Path(root) / LOCK_FILE).resolve()
    key = str(path)
    if key in _held:  # this process already holds it (the CLI took it before writing params.yaml)
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    deadline = None if wait is None else time.monotonic() + wait
    announced = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                holder = _holder(path)
                handle.close()
                hint = "wait for it with `posttrain run --wait [SECONDS]`" if not wait else f"still held after {wait:g} s"
                raise WorkspaceBusy(f"workspace {path.parents[1]} is busy: another run ({holder}) holds "
                                    f"{LOCK_FILE}; {hint}") from None
            if not announced:
                print(f"waiting for the run that holds this workspace ({_holder(path)})", flush=True)
                announced = True
            time.sleep(1.0)
    _held[key] = handle
    try:
        record_holder(root)
        yield path
    finally:
        del _held[key]
        handle.truncate(0)
        handle.close()  # closing the file releases the flock


def record_holder(root: str | Path = ".", run_id: str | None = None) -> None:
    """Write who holds the lock (what a refused second run prints)."""
    handle = _held.get(str((Path(root) / LOCK_FILE).resolve()))
    if handle is None:
        return
    handle.seek(0)
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "run_id": run_id,
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()


def dvc_lock_held(root: str | Path) -> bool:
    """Whether another process holds DVC's repository lock (a hand-run `dvc repro`, or an orphaned stage)."""
    path = Path(root) / ".dvc" / "tmp" / "lock"
    if not path.exists():
        return False
    with path.open("a") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # zc.lockfile, DVC's lock, uses lockf
        except OSError:
            return True
        fcntl.lockf(handle, fcntl.LOCK_UN)
    return False


# --------------------------------------------------------------------------- stopping cleanly

_children: list[subprocess.Popen] = []


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc; [] where there is no /proc.

    Stages run as `dvc repro` -> `python -m posttrain stage`: a stop must reach the grandchild too. They
    stay in this process's group, so a SIGKILL to the group still takes the whole run down at once.
    """
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def stop_children(grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every running stage and what it started, then SIGKILL what is left after `grace` seconds."""
    tree = [pid for child in list(_children) for pid in (child.pid, *descendants(child.pid))]
    signal_all(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in list(_children):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
    while time.monotonic() < deadline and any(process_start(pid) for pid in tree):
        time.sleep(0.1)  # the stage (a grandchild) may outlive dvc by the moment it takes to end its run
    signal_all([pid for pid in tree if process_start(pid)], signal.SIGKILL)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a process group (a server started with start_new_session, and the workers it forked), SIGKILL
    what is left after `grace` seconds."""
    pgid = proc.pid  # started with start_new_session: its pid is its group's id

    def alive() -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    if alive():
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        proc.poll()  # reap the leader, so the group can empty
        time.sleep(0.1)
    if alive():
        os.killpg(pgid, signal.SIGKILL)


def run_child(command: list[str], watch=None, **kwargs) -> int:
    """Run a command (a stage) and return its exit code; a stop of this process stops it too.

    `watch(child)`, if given, runs while the child does (say, reading its output)."""
    child = subprocess.Popen(command, **kwargs)
    _children.append(child)
    try:
        if watch is not None:
            watch(child)
        return child.wait()
    finally:
        _children.remove(child)


_progress: dict[str, str | None] = {}  # what a stop report names: the parent MLflow run, the running stage


def note_progress(**items: str | None) -> None:
    """Record how far the run got (run_id=<parent MLflow run>, stage=<running stage or None>) for the stop report."""
    _progress.update(items)


def progress() -> dict[str, str | None]:
    return dict(_progress)


@contextlib.contextmanager
def stop_on_signals(forward_to_children: bool = True) -> Iterator[None]:
    """Turn SIGTERM and SIGINT into `Stopped` (after stopping the children), for the block's duration."""
    def handler(signum, _frame):
        # One stop is enough: a second signal (Ctrl-C also reaches the stages) must not cut the clean-up short.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if forward_to_children:
            stop_children()
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
