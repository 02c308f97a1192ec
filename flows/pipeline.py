"""The Prefect flow: one parent MLflow run, then every stage of posttrain.stages in order.

    posttrain run                    # or: python -m flows.pipeline

Each Prefect task asks DVC to reproduce one stage (`dvc repro --single-item <stage>`), so DVC's
lock file decides what is stale and an unchanged stage costs a hash check, and the stage graph has
one definition only. Stages that touch the network or the registry get Prefect retries.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, task

from posttrain import stages, summary, tracking


def _stage_env() -> dict:
    env = dict(os.environ)
    # dvc.yaml's `python -m posttrain` must find this interpreter, whatever PATH the caller had.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@task(name="dvc-stage", task_run_name="{name}")
def run_stage(name: str, root: str) -> str:
    dvc = Path(sys.executable).parent / "dvc"
    command = [str(dvc) if dvc.exists() else "dvc", "repro", "--single-item", name]
    completed = subprocess.run(command, cwd=root, env=_stage_env())
    if completed.returncode != 0:
        raise RuntimeError(f"stage '{name}' failed (exit {completed.returncode}); see its output above")
    return name


@flow(name="posttrain-pipeline", log_prints=True)
def pipeline(root: str = ".", run_name: str | None = None, overrides: list[str] | None = None) -> dict:
    """Run every stage; return the summary (accuracies, gate decision, MLflow ids).

    `overrides` (key=value, as `posttrain run -S`) are written into root's params.yaml first: how a
    deployment (`posttrain serve/deploy -S ...`) pins knobs; everything else comes from params.yaml.
    """
    import mlflow

    root = str(Path(root).resolve())
    if overrides:
        from posttrain.cli import update_params_file

        update_params_file(Path(root) / "params.yaml", None, list(overrides))
    with tracking.pipeline_run(root, run_name=run_name) as parent:
        mlflow.log_artifact(str(Path(root) / "params.yaml"))
        for stage in stages.STAGES:
            run_stage.with_options(retries=stage.retries, retry_delay_seconds=5)(stage.name, root)
        result = summary.collect(root)
        mlflow.log_metrics(summary.numeric(result))
        mlflow.set_tag("gate.decision", result.get("gate", {}).get("decision", "n/a"))
        result["mlflow"] = {"run_id": parent.info.run_id, "tracking_uri": tracking.tracking_uri(root),
                            "experiment_id": parent.info.experiment_id}
    return result


if __name__ == "__main__":
    print(summary.render(pipeline()))
