"""Shared fixtures: tiny models built from a config, GSM8K from the in-repo data/gsm8k, temp workspaces.

Tiers (pyproject.toml [tool.pytest.ini_options] markers): `make test-fast` runs the tests not marked `slow`
and must train nothing. A test without the mark that takes an optimizer step (a Trainer run, a TRL trainer,
the RL loops, a stage that trains), in its setup or its body, fails with a message saying so.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "data" / "gsm8k"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs one pytest-xdist worker per core: each worker (and the stages it starts as subprocesses,
    # which inherit this) gets its share of the cores, so that two workers' torch thread pools do not fight
    # over the same cores. Set before anything imports torch.
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(_share))


# --------------------------------------------------------------------------- the fast tier trains nothing


class TrainingInFastTier(AssertionError):
    pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _no_training(item, "setup (a fixture)"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _no_training(item, "the test body"):
        return (yield)


class _no_training:
    """Any torch optimizer step during a test not marked `slow` raises TrainingInFastTier."""

    def __init__(self, item, phase: str):
        self.item, self.phase, self.handle = item, phase, None

    def __enter__(self):
        if self.item.get_closest_marker("slow") is None:
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            def refuse(optimizer, args, kwargs):
                raise TrainingInFastTier(
                    f"{self.item.nodeid}: {type(optimizer).__name__}.step() in {self.phase}, but the test is not "
                    "marked slow. Training belongs in the slow tier (@pytest.mark.slow): `make test-fast` trains nothing.")

            self.handle = register_optimizer_step_pre_hook(refuse)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
        return False


# --------------------------------------------------------------------------- one test's MLflow store stays its own


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_stays_in_its_test():
    """mlflow.set_tracking_uri() also sets MLFLOW_TRACKING_URI in os.environ, and every later subprocess (a
    `posttrain run`, a `dvc repro`) inherits it: without this, a test that reads one workspace's store sends
    the runs of later tests (in other workspaces) there. Restored after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(before)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def tiny_params(tmp_path: Path | None = None, **section_overrides):
    """params.yaml with the tiny profile and a small slice of GSM8K, as a Params object."""
    from posttrain.cli.command import update_params_file
    from posttrain.config.loader import load_params

    workdir = Path(tmp_path or ROOT)
    target = workdir / "params.tiny.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        update_params_file(target, "tiny", [f"data.gsm8k.source={GSM8K}", "data.max_train=120", "data.max_test=12"])
    finally:
        os.chdir(cwd)
    return load_params(target)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def params(session_dir):
    return tiny_params(session_dir)


@pytest.fixture(scope="session")
def prepared(params, session_dir) -> Path:
    from posttrain.stages import prepare

    out = session_dir / "prepared"
    prepare.run(params, out)
    return out


@pytest.fixture(scope="session")
def tiny_base(params, session_dir) -> Path:
    from posttrain.stages import base_model as base

    return base.run(params, session_dir / "base")


def task_sources() -> list[str]:
    """Every task's shipped data, by absolute path: `prepare` depends on all of them (whichever data.task
    picks), so a workspace outside the repository must point at each."""
    from posttrain.tasks.defaults import TASKS

    return [f"data.{task}.source={ROOT / 'data' / task}" for task in TASKS]


def make_workspace(path: Path, overrides: list[str] | None = None) -> Path:
    """A git+DVC workspace holding this project's pipeline files and the tiny profile."""
    from posttrain.cli.command import update_params_file

    path.mkdir(parents=True, exist_ok=True)
    for item in ("params.yaml", "dvc.yaml", "profiles", "posttrain"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, path / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, path / item)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=path, check=True)
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")  # the project's cache settings (links)
    cwd = os.getcwd()
    os.chdir(path)
    try:
        update_params_file(Path("params.yaml"), "tiny",
                           [*task_sources(), "data.max_train=120", "data.max_test=12"] + (overrides or []))
    finally:
        os.chdir(cwd)
    return path


def run_in(ws: Path, command: list[str], timeout: float = 900, **env) -> subprocess.CompletedProcess:
    """A command in a workspace, with this venv's bin first on PATH (dvc.yaml's `python -m posttrain`)."""
    full_env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), **env)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(command, cwd=ws, env=full_env, capture_output=True, text=True, timeout=timeout)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once for the whole test run: under pytest-xdist the first worker to ask builds the
    folder while the others wait on a file lock, then all share it (the pipeline and the reward model are the
    suite's most expensive fixtures); without xdist, once per session. A build that failed is not retried by
    the next worker: it fails with the first one's error."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's temp folder, which every worker's basetemp sits in
    folder, done, failed = root / name, root / f"{name}.done", root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"shared fixture {name} failed in another worker:\n{failed.read_text()}")
        if not done.exists():
            try:
                build(folder)
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}"[-6000:])
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def reproduced_workspace(tmp_path_factory) -> Path:
    """The tiny pipeline run once for the whole test run (shared by the xdist workers), as a user types it:
    `posttrain run` (the Prefect flow, each stage through `dvc repro`; progress bars on) in a fresh tiny
    workspace. What it printed is in `ws.parent / "run.stdout"` and `"run.stderr"` (test_user_view reads the
    console, test_pipeline the summary). Never change it: take a copy with `workspace_copy` or
    `copy_workspace`."""

    def build(folder: Path) -> None:
        ws = make_workspace(folder / "ws")
        for name in ("style", "chat"):  # every task's source is a dep of prepare
            if (ROOT / "data" / name).exists() and not (ws / "data" / name).exists():
                shutil.copytree(ROOT / "data" / name, ws / "data" / name)
        env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"))
        env.pop("TQDM_DISABLE", None)  # a user's environment: the bars are on, and must stay off the console
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        done = subprocess.run([sys.executable, "-m", "posttrain", "run"], cwd=ws, env=env, capture_output=True,
                              text=True, timeout=1800)
        (folder / "run.stdout").write_text(done.stdout)
        (folder / "run.stderr").write_text(done.stderr)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    return built_once(tmp_path_factory, "reproduced", build) / "ws"


def copy_workspace(source: Path, dest: Path) -> Path:
    """A private copy of a workspace (git, DVC cache and lock, models, reports, MLflow store, stage logs). The
    MLflow store keeps absolute paths (the experiment's artifact folder, run artifact URIs, model version
    sources, dataset sources, the workspace tag): they are moved to the copy, so that what runs in the copy
    never writes into the source."""
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("run.lock"))
    db = dest / "mlflow" / "mlflow.db"
    if db.exists():
        old, new = str(source.resolve()), str(dest.resolve())
        with sqlite3.connect(db) as connection:
            tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in connection.execute(f'PRAGMA table_info("{table}")').fetchall():
                    name, kind = column[1], (column[2] or "").upper()
                    if "CHAR" in kind or "TEXT" in kind:
                        connection.execute(f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                                           f'WHERE instr("{name}", ?) > 0', (old, new, old))
    return dest


@pytest.fixture
def workspace_copy(reproduced_workspace, tmp_path) -> Path:
    """A private copy of the reproduced tiny workspace (a tiny workspace copies in well under a second)."""
    return copy_workspace(reproduced_workspace, tmp_path / "ws")


# --------------------------------------------------------------------------- the classifier reward model


@dataclasses.dataclass(frozen=True)
class ClassifierRM:
    """The classifier reward model (the `verifier`) trained by the reward_model stage on verifier_case's task."""

    path: Path  # the stage's output folder (safetensors, tokenizer, eval.json)
    train: Path
    val: Path  # held-out questions (verifier_case.held_out_pairs)
    length: int  # tokens in every right text
    max_length: int  # reward_model.max_length it was trained with


@pytest.fixture(scope="session")
def classifier_rm(params, tmp_path_factory):
    """classifier_rm(max_length) -> ClassifierRM: the reward_model stage (kind classifier, tiny encoder) trained
    once per test run (shared by the xdist workers) and max_length on verifier_case's synthetic task (texts
    of `length` tokens; max_length None means whole texts). Every test that needs a trained verifier takes it
    from here; only tests marked slow may ask for one (it trains)."""
    from posttrain.stages import reward_model
    from verifier_case import verifier_params, write_splits

    folder = tmp_path_factory.mktemp("classifier_rm")
    train, val, length = write_splits(folder / "data")  # cheap and deterministic: every worker writes its own
    trained: dict[int, ClassifierRM] = {}

    def get(max_length: int | None = None) -> ClassifierRM:
        max_length = max_length or length

        def train_it(out: Path) -> None:
            reward_model.run(verifier_params(params, max_length), train, val, out / "rm",
                             checkpoint_dir=out / "checkpoints")

        if max_length not in trained:
            out = built_once(tmp_path_factory, f"classifier_rm_{max_length}", train_it) / "rm"
            trained[max_length] = ClassifierRM(out, train, val, length, max_length)
        return trained[max_length]

    return get
