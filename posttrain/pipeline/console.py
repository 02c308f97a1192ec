"""What a pipeline run prints: one line per stage, a live progress line while it runs, full logs in files.

    posttrain run            # one line per stage; each stage's whole output in .posttrain/logs/<run>/<stage>.log
    posttrain -v run         # everything, as the libraries print it

A stage runs as `dvc repro` -> `python -m posttrain stage <name>`. Its output (DVC, the libraries, the
trainer) goes to its log file; the console gets the stage's name, whether it ran or DVC reused it, its
time and its headline figure. Known library noise is silenced where it starts (`quiet_libraries`, run
by every `posttrain` command), so the log files are readable too. `-v` leaves the libraries alone and
streams every stage's output to the console as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

VERBOSE_ENV = "POSTTRAIN_VERBOSE"
# The runner writes the stage's values to this file when the stage actually runs (not when DVC reuses it).
STAGE_RESULT_ENV = "POSTTRAIN_STAGE_RESULT"
# A stage that refuses its input (params, data, a missing file) writes why to this file: the flow does not retry it.
STAGE_REFUSED_ENV = "POSTTRAIN_STAGE_REFUSED"
LOG_DIR = Path(".posttrain") / "logs"
ATTEMPT = "=== posttrain: stage started"  # heads each attempt in a stage's log (Prefect retries append)

# tqdm's counter: "  50%|█████     | 1/2 [00:05<00:05,  5.47s/it]"
PROGRESS = re.compile(r"(\d+)/(\d+) \[([0-9:]+)<([0-9:?]+)")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_libraries() -> None:
    """Silence the known noise at its source, in this process and the processes it starts (unless -v).

    Kept: training and evaluation progress (the trainer's and the evaluator's bars, the trainer's logs), warnings
    that are not on this list, every error.
    """
    # peft imports bitsandbytes, which warns on every import that the optional `kernels` package (a hub
    # download, left out on purpose) is missing; its CPU fallback is what runs.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if verbose():
        return
    for name, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),  # LOAD REPORT tables, "mtime may not be reliable", ...
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),  # transformers' "Loading weights" / "Writing model shards" bars
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),  # datasets' Map / Tokenizing / Truncating bars
        # "Beginning flow run", "Finished in state Completed()", ...: off the console, still in Prefect's UI
        ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING"),
        ("MLFLOW_LOGGING_LEVEL", "WARNING"),  # "Creating initial MLflow database tables..."
        ("GIT_PYTHON_REFRESH", "quiet"),
        ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),  # "Downloading artifacts" bars
    ):
        os.environ.setdefault(name, value)
    # transformers 5 renames gradient checkpointing; TRL still sets the old name on every run.
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6", category=FutureWarning)
    for name in ("mlflow", "alembic", "httpx", "great_expectations"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _NotRunFailures(logging.Filter):
    """Prefect logs a failed stage as two tracebacks of its own engine; our one-line error says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.name in ("prefect.task_runs", "prefect.flow_runs"))


def quiet_prefect() -> None:
    """Keep a failed stage's Prefect tracebacks off the console (Prefect's UI still gets them). After prefect's import."""
    if verbose():
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), logging.getLogger("prefect")):  # its console handler sits on the root
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                    isinstance(f, _NotRunFailures) for f in handler.filters):
                handler.addFilter(_NotRunFailures())


def say(line: str) -> None:
    """A line for the user: on the console, and in the Prefect run's log when there is one (its UI shows it).

    The log record is INFO: the console handler (WARNING unless -v) drops it, the API handler keeps it. With -v
    the console would show it twice, so it goes to stdout only."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if verbose():
        return
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger
    except ImportError:
        return
    if FlowRunContext.get() or TaskRunContext.get():
        get_run_logger().info(line)


def run_log_dir(root: str | Path, run_id: str) -> Path:
    """This pipeline run's log folder: one file per stage."""
    path = Path(root) / LOG_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id[:8]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_line(name: str, status: str, seconds: float, headline: str = "") -> str:
    """`sft          ran        8s  loss 6.224`: what the console shows for a finished stage."""
    return f"{name:<13}{status:<8}{seconds:>5.0f}s  {headline}".rstrip()


STAGE_LINE = re.compile(r"^(\S+)\s+(ran|reused|FAILED)\s+(\d+)s(?:\s+(.*))?$")


class LiveOutput:
    """The child's output -> its log file (and the console with -v); the last tqdm counter seen -> `progress`."""

    def __init__(self, log: Path, echo: bool):
        self.log, self.echo, self.progress = log, echo, None

    def pump(self, stream) -> None:
        tail = ""
        with self.log.open("ab") as handle:
            handle.write(f"{ATTEMPT} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
                handle.write(chunk)
                handle.flush()
                if self.echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                tail = (tail + chunk.decode("utf-8", "replace"))[-400:]
                found = PROGRESS.findall(tail)
                if found:
                    self.progress = found[-1]


def progress_bar(progress, width: int = 20) -> str:
    done, total, elapsed, eta = progress
    done, total = int(done), max(int(total), 1)
    filled = min(width, width * done // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} eta {eta}"


def run_stage_logged(name: str, command: list[str], log: Path, *, cwd, env, show_progress: bool, run_child) -> int:
    """Run a stage's command with its output in `log`; a live line on a terminal while it runs.

    `run_child` is lifecycle.run_child (a stop of this process stops the stage too)."""
    live = LiveOutput(log, echo=verbose())
    tty = show_progress and not verbose() and sys.stdout.isatty()
    started = time.monotonic()

    def watch(child: subprocess.Popen) -> None:
        reader = threading.Thread(target=live.pump, args=(child.stdout,), daemon=True)
        reader.start()
        while child.poll() is None:
            if tty:
                state = progress_bar(live.progress) if live.progress else "running"
                sys.stdout.write(f"\r\x1b[K{name:<13}{time.monotonic() - started:>5.0f}s  {state}")
                sys.stdout.flush()
            if reader.is_alive():
                reader.join(0.5)
            else:  # its output closed: it is exiting
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(0.5)
        reader.join(5)
        if tty:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()

    return run_child(command, watch=watch, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, progress-bar redraws collapsed."""
    if not path.exists():
        return ""
    text = path.read_bytes().decode("utf-8", "replace").rsplit(ATTEMPT, 1)[-1][-20000:]
    kept = [line.rsplit("\r", 1)[-1] for line in text.split("\n")[1:]]  # [0]: the rest of the attempt's header
    return "\n".join([line for line in kept if line.strip()][-lines:])
