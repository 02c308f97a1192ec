"""Stage `prepare`: read the task's data, validate it with Great Expectations, split it.

    posttrain stage prepare          # or: dvc repro prepare

The task (data.task, posttrain/tasks/) owns the schema, the expectation suite and the split rule.
Invalid input stops the stage with the file, the line and the failed expectation; the output folder
is written to a temporary sibling and renamed only when everything passed. preferences.jsonl holds the
task's preference pairs (chat), and is empty for tasks without them.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import Params
from posttrain.io import atomic_path, write_json, write_jsonl
from posttrain.tasks import registry


def run(params: Params, out_dir: str | Path) -> dict[str, Path]:
    splits, reports = registry.get(params.data.task).prepare(params)
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, records in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", records)
        if "preferences" not in splits:  # the reward model and judge stages depend on it, whatever the task
            write_jsonl(tmp / "preferences.jsonl", [])
        write_json(tmp / "validation.json", {"task": params.data.task, "splits": {k: len(v) for k, v in splits.items()},
                                             "reports": reports})
    return {name: out_dir / f"{name}.jsonl" for name in splits} | {"report": out_dir / "validation.json"}


def metrics(out_dir: str | Path) -> dict[str, float]:
    from posttrain.io import read_json

    report = read_json(Path(out_dir) / "validation.json")
    skipped = {key: float(report["reports"][key]) for key in ("skipped_invalid", "skipped_invalid_pairs")
               if isinstance(report["reports"], dict) and report["reports"].get(key)}  # data.style.skip_invalid
    return {f"n_{name}": float(n) for name, n in report["splits"].items()} | skipped
