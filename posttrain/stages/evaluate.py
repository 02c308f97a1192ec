"""Stage `eval_<model>`: greedy evaluation of one model on the task's held-out items.

    posttrain stage eval_sft         # or: dvc repro eval_sft ; posttrain eval <model folder>

The task (data.task, posttrain/tasks/) scores each item pass/fail: GSM8K by the reference number
(strict and flexible), style by a held-out judge and a content check (judge_dir: the judge stage's
model). Writes metrics.json (accuracy per task metric, early-stop rate, length and speed stats, the
protocol and its hash, the question-set hash) and records.jsonl (one line per item).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import Params
from posttrain.evaluation.evaluator import evaluate_folder
from posttrain.io import read_json


def run(params: Params, model_dir: str | Path, test_path: str | Path, train_path: str | Path,
        out_dir: str | Path, judge_dir: str | Path | None = None, progress: bool = True) -> dict:
    return evaluate_folder(params, model_dir, test_path, train_path, out_dir, judge_dir, progress)


def metrics(out_dir: str | Path) -> dict[str, float]:
    data = read_json(Path(out_dir) / "metrics.json")
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
