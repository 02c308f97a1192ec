"""Stage `eval_<model>`: greedy GSM8K accuracy of one model on the configured test questions.

    posttrain stage eval_sft         # or: dvc repro eval_sft ; posttrain eval <model folder>

Writes metrics.json (strict/flexible accuracy, early-stop rate, length and speed stats, the
protocol and its hash, the question-set hash) and records.jsonl (one line per question).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import Params
from posttrain.evaluation import QUESTION_FIELDS, evaluate, load_model
from posttrain.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl


def run(params: Params, model_dir: str | Path, test_path: str | Path, train_path: str | Path,
        out_dir: str | Path, progress: bool = True) -> dict:
    cfg = params.eval
    # Malformed questions fail here in one line naming the file and line, before the model is loaded.
    questions = read_jsonl(test_path, required=QUESTION_FIELDS)
    shots = read_jsonl(train_path, required=QUESTION_FIELDS)[: cfg.shots] if cfg.shots else None
    model, tokenizer = load_model(model_dir, cfg.dtype)
    metrics, records = evaluate(model, tokenizer, questions, cfg, shots, progress=progress)
    metrics["model"] = str(model_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_jsonl(tmp / "records.jsonl", records)
        write_json(tmp / "metrics.json", metrics)
    return {"metrics": Path(out_dir) / "metrics.json", "records": Path(out_dir) / "records.jsonl"}


def metrics(out_dir: str | Path) -> dict[str, float]:
    data = read_json(Path(out_dir) / "metrics.json")
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
