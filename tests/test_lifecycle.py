"""A run's life on a workspace: one run at a time, a failed stage stops the flow, SIGTERM stops cleanly,
SIGKILLed runs do not stay RUNNING in MLflow, a resumed stage says what it resumes.

    .venv/bin/python -m pytest tests/test_lifecycle.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_workspace
from posttrain.pipeline import lifecycle

HOLD_LOCK = ("import sys, time; sys.path.insert(0, {root!r}); from posttrain.pipeline import lifecycle\n"
             "with lifecycle.workspace_lock({ws!r}):\n    print('held', flush=True); time.sleep({seconds})")


def env_for(ws: Path) -> dict:
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), TQDM_DISABLE="1", MLFLOW_DISABLE_TELEMETRY="true")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def hold_lock(ws: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT), ws=str(ws), seconds=seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_is_refused_in_one_line_naming_the_holder(tmp_path):
    import shutil

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    before = (tmp_path / "params.yaml").read_text()
    holder = hold_lock(tmp_path, 60)
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "posttrain", "-q", "run", "-S", "eval.n_questions=3"],
                              cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
        assert f"pid {holder.pid}" in done.stderr and "--wait" in done.stderr
        assert time.monotonic() - started < 60  # refused at once, no retries
        # It was refused before it wrote params.yaml under the running holder.
        assert (tmp_path / "params.yaml").read_text() == before
    finally:
        holder.kill()
        holder.wait()


def test_wait_queues_behind_the_holder_then_takes_the_workspace(tmp_path):
    holder = hold_lock(tmp_path, 3)
    started = time.monotonic()
    with pytest.raises(lifecycle.WorkspaceBusy, match=r"still held after 0.5 s"):
        with lifecycle.workspace_lock(tmp_path, wait=0.5):
            pass
    with lifecycle.workspace_lock(tmp_path, wait=30):
        assert holder.wait(timeout=10) == 0  # we got it only as the holder finished
        assert time.monotonic() - started >= 2.5
    holder.wait()


def test_a_lock_dies_with_its_holder(tmp_path):
    holder = hold_lock(tmp_path, 600)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with lifecycle.workspace_lock(tmp_path, wait=0):  # no stale lock after a SIGKILL
        pass


def test_a_busy_dvc_lock_is_not_retried(tmp_path):
    """A `dvc repro` by hand holds DVC's lock: the stage is refused as busy, and Prefect's retry condition says no."""
    from posttrain.pipeline import flow as pipeline

    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".dvc/tmp/lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lifecycle.WorkspaceBusy, match="another DVC process holds"):
            pipeline.run_stage.fn("prepare", str(tmp_path))

        class State:
            def __init__(self, error):
                self.error = error

            def result(self):
                raise self.error

        assert pipeline.retry_transient_only(None, None, State(lifecycle.WorkspaceBusy("busy"))) is False
        assert pipeline.retry_transient_only(None, None, State(OSError("network"))) is True
        # a stage that refused its input (params, data, a missing file) fails the same way on every try
        assert pipeline.retry_transient_only(None, None, State(pipeline.StageInputError("bad data"))) is False
        assert pipeline.retry_transient_only(None, None, State(pipeline.StageFailed("exit 1"))) is True
    finally:
        holder.kill()
        holder.wait()
    assert not lifecycle.dvc_lock_held(tmp_path)


def test_orphaned_runs_of_this_workspace_are_marked_killed(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from posttrain.release import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.setup(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking.experiment_name("gsm8k")).experiment_id
    base_tags = {tracking.WORKSPACE_TAG: str(tmp_path.resolve()), "posttrain.host": lifecycle.identity()["posttrain.host"]}
    dead = client.create_run(experiment, tags=base_tags | {"posttrain.pid": str(gone.pid)}).info.run_id
    alive = client.create_run(experiment, tags=base_tags | lifecycle.identity()).info.run_id
    elsewhere = client.create_run(experiment, tags=base_tags | {tracking.WORKSPACE_TAG: "/other/workspace",
                                                                "posttrain.pid": str(gone.pid)}).info.run_id
    assert tracking.end_orphaned_runs(tmp_path) == [dead]
    status = {run_id: client.get_run(run_id).info.status for run_id in (dead, alive, elsewhere)}
    assert status == {dead: "KILLED", alive: "RUNNING", elsewhere: "RUNNING"}
    mlflow.set_tracking_uri(None)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _runs(ws: Path, besides: set[str] = frozenset()) -> list:
    """The workspace's MLflow runs, oldest first, leaving out the run ids in `besides`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain-gsm8k")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment else []
    return [r for r in runs if r.info.run_id not in besides]


def _start_run(ws: Path, log: Path) -> subprocess.Popen:
    # A session of its own: the test can SIGKILL the whole run (its process group) as a scheduler would.
    return subprocess.Popen([sys.executable, "-m", "posttrain", "-q", "run"], cwd=ws, env=env_for(ws),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(condition, proc, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended early:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.integration
def test_sigterm_stops_cleanly_and_a_sigkilled_run_leaves_no_zombies(workspace_copy, tmp_path):
    # The session's reproduced workspace (a copy): the stages before SFT are reused and the runs start at SFT.
    # Enough steps that SFT lasts several seconds on a quiet machine: the tiny model trains ~16 steps/s, and with
    # save_total_limit 1 each checkpoint replaces the last, so a test waiting for one exact checkpoint can miss it.
    from posttrain.cli.command import update_params_file

    ws = workspace_copy
    update_params_file(ws / "params.yaml", None, ["sft.training.max_steps=160", "sft.training.save_steps=4"])
    earlier = {r.info.run_id for r in _runs(ws)}  # the session's own run: only this test's runs are checked

    def latest_checkpoint() -> int:
        steps = [int(p.parent.name.split("-")[1]) for p in (ws / "checkpoints/sft").glob("checkpoint-*/trainer_state.json")]
        return max(steps, default=0)

    def checkpoint_after(step):
        return lambda: latest_checkpoint() > step

    # 1. SIGTERM to `posttrain run` alone: it stops the stage, marks its runs KILLED, exits within seconds.
    proc = _start_run(ws, tmp_path / "first.log")
    _wait_for(checkpoint_after(0), proc, tmp_path / "first.log")
    tree = {pid: _command_line(pid) for pid in lifecycle.descendants(proc.pid)}
    stage_tree = [pid for pid, command in tree.items() if "dvc" in command or "stage" in command]
    assert stage_tree, tree
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - sent < 20
    time.sleep(1)
    left = {pid: tree[pid] for pid in tree if lifecycle.process_start(pid) and _command_line(pid) == tree[pid]}
    assert not left, f"processes outlived the run: {left}"
    statuses = {(r.data.tags.get("posttrain.stage") or "pipeline"): r.info.status for r in _runs(ws, earlier)}
    assert statuses["pipeline"] == "KILLED" and statuses["sft"] == "KILLED", statuses
    assert "marked KILLED" in (tmp_path / "first.log").read_text()

    # 2. SIGKILL to the whole process group mid-SFT (once this run has written a checkpoint of its own):
    # nothing gets to end its MLflow runs.
    left_by_first = latest_checkpoint()
    proc = _start_run(ws, tmp_path / "second.log")
    _wait_for(checkpoint_after(left_by_first), proc, tmp_path / "second.log")
    tree = lifecycle.descendants(proc.pid)  # the stage, and the Prefect server the run started in a session of its own
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(lifecycle.process_start(pid) for pid in tree):
        time.sleep(0.2)
    assert not [pid for pid in tree if lifecycle.process_start(pid)], "a process outlived the SIGKILLed run"
    killed = [r for r in _runs(ws, earlier) if r.info.status == "RUNNING"]
    assert {r.data.tags.get("posttrain.stage", "pipeline") for r in killed} == {"pipeline", "sft"}

    # 3. The next run ends them as KILLED, resumes SFT from its checkpoint and says so in MLflow.
    done = subprocess.run([sys.executable, "-m", "posttrain", "-q", "run"], cwd=ws, env=env_for(ws),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {r.info.run_id: r for r in _runs(ws, earlier)}
    assert all(runs[r.info.run_id].info.status == "KILLED" for r in killed)
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    killed_sft = next(r.info.run_id for r in killed if r.data.tags.get("posttrain.stage") == "sft")
    resumed = [r for r in runs.values() if r.data.tags.get("posttrain.stage") == "sft" and r.info.status == "FINISHED"]
    assert len(resumed) == 1 and resumed[0].data.tags.get("posttrain.resumed_from_run") == killed_sft
    assert resumed[0].data.tags["posttrain.resumed_from_checkpoint"].startswith("checkpoint-")
    assert runs[killed_sft].data.tags.get("posttrain.resumed_by_run") == resumed[0].info.run_id


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm-to-the-group"])
def test_a_stop_prints_three_lines_and_leaves_no_server(workspace_copy, tmp_path, signum):
    """Ctrl-C reaches the terminal's whole process group, as does a supervisor's SIGTERM to the group: the run
    says what stopped, which runs are KILLED and how to resume, with no tracebacks from a Prefect server
    stopped under the flow, and exits within seconds."""
    import contextlib

    import psutil

    from posttrain.cli.command import update_params_file
    from posttrain.pipeline import console

    ws = workspace_copy
    update_params_file(ws / "params.yaml", None, ["sft.training.max_steps=160", "sft.training.save_steps=4"])
    earlier = {r.info.run_id for r in _runs(ws)}
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "run"], cwd=ws, env=env_for(ws), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # the group a terminal would signal
    _wait_for(lambda: any((ws / "checkpoints/sft").glob("checkpoint-*/trainer_state.json")), proc, log)
    below = psutil.Process(proc.pid).children(recursive=True)  # the stage, and the Prefect server the run started
    sent = time.monotonic()
    os.killpg(proc.pid, signum)
    try:
        assert proc.wait(timeout=60) == 128 + signum
    except BaseException:  # a hung run: take down it and what it started
        for process in below:
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert time.monotonic() - sent < 30
    text = log.read_text()
    said = [line for line in text.splitlines() if not line.startswith("stage logs:") and not console.STAGE_LINE.match(line)]
    assert len(said) <= 3, text[-6000:]
    assert said[0] == f"posttrain run: stopped by {signal.Signals(signum).name} during stage 'sft'", text[-3000:]
    assert said[1].startswith("marked KILLED: MLflow run ") and "'sft' stage run" in said[1]
    assert said[2].startswith("resume with `posttrain run`")
    statuses = {(r.data.tags.get("posttrain.stage") or "pipeline"): r.info.status for r in _runs(ws, earlier)}
    assert statuses == {"pipeline": "KILLED", "sft": "KILLED"}, statuses
    assert said[1].split()[4] == next(r.info.run_id for r in _runs(ws, earlier) if not r.data.tags.get("posttrain.stage"))
    gone, alive = psutil.wait_procs(below, timeout=15)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


@pytest.mark.slow
@pytest.mark.integration
def test_a_stage_that_refuses_its_data_fails_once_not_once_per_retry(tmp_path):
    """prepare has Prefect retries (its source may be a hub download), but a data error fails the same way every
    time: one FAILED block, one attempt in its log, exit 1 at once."""
    from posttrain.pipeline import console

    source = tmp_path / "source"
    source.mkdir()
    good = '{"question": "How much is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
    (source / "train.jsonl").write_text(good * 3 + '{"question": "How much?", "answer": \n')
    (source / "test.jsonl").write_text(good)
    ws = make_workspace(tmp_path / "ws", [f"data.gsm8k.source={source}", "data.max_train=0", "data.max_test=0"])
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "posttrain", "-q", "run"], cwd=ws, env=env_for(ws),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    failed = [line for line in done.stdout.splitlines() if console.STAGE_LINE.match(line)]
    assert len(failed) == 1 and failed[0].startswith("prepare") and " FAILED " in failed[0], done.stdout
    assert done.stdout.count("train.jsonl:4: malformed JSON") == 1, done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage 'prepare' failed") and "train.jsonl:4: malformed JSON" in last, last
    logs = list((ws / console.LOG_DIR).glob("*/prepare.log"))
    assert len(logs) == 1 and logs[0].read_text().count(console.ATTEMPT) == 1
    assert time.monotonic() - started < 300


@pytest.mark.slow
@pytest.mark.integration
def test_a_failing_stage_stops_the_flow_and_fails_the_parent_run(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    module = ws / "posttrain" / "stages" / "reward_model.py"
    module.write_text(module.read_text() + "\n\ndef run(*args, **kwargs):\n    raise RuntimeError('boom')\n")
    done = subprocess.run([sys.executable, "-m", "posttrain", "-q", "run"], cwd=ws, env=env_for(ws),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    import re

    assert re.match(r"error: stage 'reward_model' failed \(exit \d+\)", done.stderr.strip().splitlines()[-1])
    assert (ws / "reports/prepare.json").exists()
    for later in ("sft.json", "rl.json", "eval_rl.json", "promotion.json"):
        assert not (ws / "reports" / later).exists(), later
    statuses = {(r.data.tags.get("posttrain.stage") or "pipeline"): r.info.status for r in _runs(ws)}
    assert statuses == {"pipeline": "FAILED", "prepare": "FINISHED", "base": "FINISHED", "reward_model": "FAILED"}
