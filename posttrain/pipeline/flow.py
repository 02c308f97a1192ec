"""The Prefect flow: one parent MLflow run, then every stage of posttrain.pipeline.graph in order.

    posttrain run                    # or: python -m posttrain.pipeline.flow

Each Prefect task asks DVC to reproduce one stage (`dvc repro --single-item <stage>`), so DVC's
lock file decides what is stale and an unchanged stage costs a hash check, and the stage graph has
one definition only. Stages that touch the network or the registry get Prefect retries; a stage
that failed because another process holds the workspace, because it refused its input (params, data, a
missing file: the same on every try), or because the run was stopped, is not retried.
A failed stage stops the flow: later stages and `promote` do not run and the parent MLflow run is FAILED.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from prefect import flow, task

from posttrain.pipeline import console

from posttrain.pipeline import lifecycle

from posttrain.pipeline import graph

from posttrain.pipeline import summary

from posttrain.release import tracking
from posttrain.io import read_json


class StageFailed(RuntimeError):
    """A stage exited non-zero; its own output (above) says why."""


class StageInputError(StageFailed):
    """A stage refused its input (a ConfigError, DataError or missing file): retrying cannot help."""


def _stage_env() -> dict:
    env = dict(os.environ)
    # dvc.yaml's `python -m posttrain` must find this interpreter, whatever PATH the caller had.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _busy(name: str, root: str) -> lifecycle.WorkspaceBusy:
    return lifecycle.WorkspaceBusy(f"stage '{name}': another DVC process holds {root}/.dvc/tmp/lock "
                                   "(a `dvc repro` or `dvc exp run` by hand?); let it finish first")


def retry_transient_only(task, task_run, state) -> bool:
    """Prefect retry condition: a busy workspace or a refused input is not transient."""
    try:
        state.result()
    except (lifecycle.WorkspaceBusy, StageInputError):
        return False
    except Exception:
        return True
    return False


@task(name="dvc-stage", task_run_name="{name}", retry_condition_fn=retry_transient_only)
def run_stage(name: str, root: str, log_dir: str | None = None) -> dict:
    """`dvc repro --single-item <name>`, its output in <log_dir>/<name>.log; prints the stage's one line."""
    dvc = Path(sys.executable).parent / "dvc"
    command = [str(dvc) if dvc.exists() else "dvc", "repro", "--single-item", name]
    if lifecycle.dvc_lock_held(root):
        raise _busy(name, root)
    logs = Path(log_dir or Path(root) / console.LOG_DIR / "adhoc")
    logs.mkdir(parents=True, exist_ok=True)
    log, result, refused = logs / f"{name}.log", logs / f"{name}.result.json", logs / f"{name}.refused.json"
    result.unlink(missing_ok=True)
    refused.unlink(missing_ok=True)
    env = _stage_env() | {console.STAGE_RESULT_ENV: str(result), console.STAGE_REFUSED_ENV: str(refused)}
    started = time.monotonic()
    lifecycle.note_progress(stage=name)  # a stop now names this stage
    code = console.run_stage_logged(name, command, log, cwd=root, env=env, run_child=lifecycle.run_child,
                                    show_progress=not os.environ.get("TQDM_DISABLE"))
    lifecycle.note_progress(stage=None)
    seconds = time.monotonic() - started
    if code != 0:
        if lifecycle.dvc_lock_held(root):
            raise _busy(name, root)
        console.say(console.stage_line(name, "FAILED", seconds, f"exit {code}; last lines of {log}:"))
        if not console.verbose():  # with -v the whole log is on the console already
            console.say(console.tail(log))
        if refused.exists():
            raise StageInputError(f"stage '{name}' failed (exit {code}): {read_json(refused)['message']}; "
                                  f"its log: {log}")
        raise StageFailed(f"stage '{name}' failed (exit {code}); its log: {log}")
    ran = result.exists()
    stage = graph.get(name)
    values = read_json(result) if ran else (
        read_json(Path(root) / stage.metrics) if stage.metrics and (Path(root) / stage.metrics).exists() else {})
    console.say(console.stage_line(name, "ran" if ran else "reused", seconds, summary.headline(values)))
    return {"ran": ran, "seconds": seconds}


@flow(name="posttrain-pipeline", log_prints=True)
def pipeline(root: str = ".", run_name: str | None = None, overrides: list[str] | None = None,
             wait: float | None = 0.0) -> dict:
    """Run every stage; return the summary (accuracies, gate decision, MLflow ids).

    `overrides` (key=value, as `posttrain run -S`) are written into root's params.yaml first: how a
    deployment (`posttrain serve/deploy -S ...`) pins knobs; everything else comes from params.yaml.
    The run holds the workspace lock throughout; `wait` is how long to queue behind another holder
    (0: refuse at once, None: forever).
    """
    import mlflow

    from posttrain.config.loader import flatten, load_params, to_dict
    from posttrain.pipeline.preflight import update_params_file, validate_workspace

    root = str(Path(root).resolve())
    lifecycle.note_progress(run_id=None, stage=None)
    with lifecycle.workspace_lock(root, wait=wait), lifecycle.stop_on_signals():
        update_params_file(Path(root) / "params.yaml", None, list(overrides or []))
        validate_workspace(root)  # every param, before anything runs
        console.quiet_prefect()
        # The parent run carries every param (params.yaml after overrides), so two runs compared in the UI show
        # what differs; its default name says what it ran: task, RL method, params hash.
        params = load_params(Path(root) / "params.yaml")
        flat = flatten(to_dict(params))
        with tracking.pipeline_run(root, run_name=run_name or tracking.default_run_name(params, flat),
                                   tags={"posttrain.params_hash": tracking.params_hash(flat)},
                                   task=params.data.task) as parent:
            lifecycle.record_holder(root, parent.info.run_id)
            lifecycle.note_progress(run_id=parent.info.run_id)
            mlflow.log_artifact(str(Path(root) / "params.yaml"))
            tracking.log_flat_params(flat)
            logs = console.run_log_dir(root, parent.info.run_id)
            console.say(f"stage logs: {os.path.relpath(logs, os.getcwd())}/ (-v prints them here too)")
            try:
                for stage in graph.STAGES:
                    run_stage.with_options(retries=stage.retries, retry_delay_seconds=5)(stage.name, root, str(logs))
            finally:  # a failed run's logs and data version are what its MLflow run most needs
                mlflow.log_artifacts(str(logs), artifact_path="logs")
                data_md5 = tracking.prepared_data_md5(root)
                if data_md5:  # lineage: `dvc checkout` with this run's dvc.lock restores exactly this data
                    mlflow.log_param("data.prepared_md5", data_md5)
                    mlflow.log_artifact(str(Path(root) / "dvc.lock"))
                    # the runs table's Dataset column shows the data version on the parent row too
                    tracking.log_data_inputs([Path(root) / graph.PREPARED / name for name in tracking.DATA_CONTEXTS],
                                             params.data.task, root)
            result = summary.collect(root)
            mlflow.log_metrics(summary.numeric(result))
            mlflow.set_tag("gate.decision", result.get("gate", {}).get("decision", "n/a"))
            table = summary.render(result).strip("\n")
            mlflow.log_text(table + "\n", "summary.txt")
            mlflow.log_dict(result, "summary.json")
            mlflow.set_tag("mlflow.note.content", f"```\n{table}\n```")  # the run's description in the UI
            result["mlflow"] = {"run_id": parent.info.run_id, "tracking_uri": tracking.tracking_uri(root),
                                "experiment_id": parent.info.experiment_id,
                                "experiment_name": tracking.experiment_name(params.data.task)}
        lifecycle.note_progress(run_id=None)  # ended FINISHED: a later stop has no run to mark
    return result


if __name__ == "__main__":
    print(summary.render(pipeline()))
