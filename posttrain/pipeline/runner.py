"""Run one stage: load params, open its MLflow run, call the task, write and log its metrics.

    python -m posttrain stage sft    # what dvc.yaml's cmd runs
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import ModuleType

from posttrain.pipeline import console

from posttrain.training import distributed

from posttrain.pipeline import graph

from posttrain.release import tracking
from posttrain.config.loader import flatten, load_params, to_dict
from posttrain.io import write_json


def _section_params(params_dict: dict, keys: tuple[str, ...]) -> dict:
    out = {}
    for key in keys:
        node = params_dict
        for part in key.split("."):
            node = node[part]
        out.update(flatten({key: node}) if isinstance(node, dict) else {key: node})
    return out


def _log_training_curve(out_dir: Path) -> None:
    import mlflow

    from posttrain.io import read_json
    from posttrain.training.trainer import history_metrics

    log = out_dir / "train_log.json"
    if log.exists():
        for step, values in history_metrics(read_json(log)):
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)


def log_records_table(records_path: Path, artifact_file: str) -> None:
    """An eval's per-item records as an MLflow table (the run's Artifacts tab shows it as a table): the input,
    the reply, the verdict and the well-formedness checks, one row per item."""
    import mlflow
    import pandas as pd

    from posttrain.io import read_jsonl

    frame = pd.DataFrame(list(read_jsonl(records_path)))
    for column in frame.columns:  # the table takes scalars: anything nested is shown as its JSON text
        if frame[column].map(lambda value: isinstance(value, (list, dict))).any():
            frame[column] = frame[column].map(lambda value: value if not isinstance(value, (list, dict))
                                              else json.dumps(value))
    mlflow.log_table(data=frame, artifact_file=artifact_file)


def run_stage(name: str, module: ModuleType, params_path: str | Path = "params.yaml", root: str | Path = ".") -> dict:
    """Run stage `name` through its module (posttrain/stages/<module>.py, imported by the caller: the
    pipeline library never imports a stage)."""
    import mlflow

    stage = graph.get(name)
    root = Path(root)
    params = load_params(root / params_path)
    paths = {k: root / v for k, v in {**stage.inputs, **stage.outputs}.items()}
    dist = distributed.state()  # None in a single process
    if dist is not None and not dist.is_main_process:
        # Another rank of a launched stage: train alongside rank 0 (data-parallel stages only), then wait
        # while rank 0 writes the outputs, reports and MLflow run.
        if stage.data_parallel:
            module.run(params, **paths)
        print(f"stage {stage.name}: rank {dist.process_index}/{dist.num_processes} done; rank 0 writes the outputs")
        dist.wait_for_everyone()
        return {}
    with tracking.stage_run(stage.name, root, task=params.data.task):
        tracking.log_flat_params(_section_params(to_dict(params), stage.params))
        if dist is not None:
            mlflow.set_tag("posttrain.world_size", dist.num_processes)
        started = time.perf_counter()
        result = module.run(params, **paths) or {}
        seconds = time.perf_counter() - started
        if "out_dir" in stage.outputs and hasattr(module, "metrics"):
            values = module.metrics(paths["out_dir"])
        else:
            values = dict(result.get("metrics", {}))
        numeric = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(numeric | {"stage_seconds": seconds})
        # Lineage: the prepared splits this stage read (prepare: wrote) as MLflow datasets of its run.
        splits = [p for p in paths.values() if p.is_file()] + [
            p / split for p in paths.values() if p == root / graph.PREPARED for split in tracking.DATA_CONTEXTS]
        tracking.log_data_inputs(splits, params.data.task, root, versioned=stage.name != "prepare")
        if "out_dir" in stage.outputs:
            _log_training_curve(paths["out_dir"])
            small = ("metrics.json", "records.jsonl", "validation.json", "train_log.json")
            for path in sorted(paths["out_dir"].iterdir()):
                if path.name in small or path.suffix == ".png":
                    mlflow.log_artifact(str(path), artifact_path=stage.name)
            if (paths["out_dir"] / "records.jsonl").exists():  # the replies, readable beside the run in the UI
                log_records_table(paths["out_dir"] / "records.jsonl", f"{stage.name}/replies.json")
        if stage.metrics:
            write_json(root / stage.metrics, values | {"stage_seconds": seconds})
        if os.environ.get(console.STAGE_RESULT_ENV):  # the flow's way to tell "ran" from "reused by DVC"
            write_json(Path(os.environ[console.STAGE_RESULT_ENV]), values | {"stage_seconds": seconds})
    if dist is not None:
        dist.wait_for_everyone()
    return values
