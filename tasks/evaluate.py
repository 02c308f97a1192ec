"""Stage `eval_<model>`: greedy evaluation of one model on the task's held-out items.

    posttrain stage eval_sft         # or: dvc repro eval_sft ; posttrain eval <model folder>

The task (data.task, posttrain/tasks/) scores each item pass/fail: GSM8K by the reference number
(strict and flexible), style by a held-out judge and a content check (judge_dir: the judge stage's
model). Writes metrics.json (accuracy per task metric, early-stop rate, length and speed stats, the
protocol and its hash, the question-set hash) and records.jsonl (one line per item).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import Params
from posttrain.evaluation import evaluate, load_model
from posttrain.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from posttrain.tasks import registry


def run(params: Params, model_dir: str | Path, test_path: str | Path, train_path: str | Path,
        out_dir: str | Path, judge_dir: str | Path | None = None, progress: bool = True) -> dict:
    cfg = params.eval
    task = registry.get(params.data.task)
    # Malformed items fail here in one line naming the file and line, before the model is loaded.
    questions = read_jsonl(test_path)
    task.check_eval_records(questions)
    shots = read_jsonl(train_path)[: cfg.shots] if cfg.shots else None
    context = task.make_context(params, judge_dir)
    model, tokenizer = load_model(model_dir, cfg.dtype)
    metrics, records = evaluate(model, tokenizer, questions, cfg, shots, progress=progress, task=task,
                                context=context, params=params)
    metrics["model"] = str(model_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_jsonl(tmp / "records.jsonl", records)
        write_json(tmp / "metrics.json", metrics)
    return {"metrics": Path(out_dir) / "metrics.json", "records": Path(out_dir) / "records.jsonl"}


def metrics(out_dir: str | Path) -> dict[str, float]:
    data = read_json(Path(out_dir) / "metrics.json")
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
