"""Stage `judge`: the held-out judge that scores evaluations of tasks judged by a model (style).

    posttrain stage judge            # or: dvc repro judge

An evaluation is never scored by the reward model the policy was optimised against: the judge is a
model of the task's JUDGE_KIND trained on data the reward model never saw. style: a classifier on the
encoder `data.style.judge_encoder`, on the odd-index training records (the reward model takes the even
ones). chat: an mlp_head reward model on the base LM, on the judge part of the preference pairs (or,
without a preference file, the odd-index instructions). Tasks scored without a model (GSM8K: the
reference number) skip this stage with a one-line reason.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import Params
from posttrain.io import read_jsonl
from posttrain.tasks import registry
from posttrain.reward_models.training import metrics as classifier_metrics
from posttrain.reward_models.training import train_classifier, train_mlp_head, write_skipped


def run(params: Params, train_path: str | Path, val_path: str | Path, out_dir: str | Path,
        checkpoint_dir: str | Path = "checkpoints/judge", base_dir: str | Path = "models/base",
        preferences_path: str | Path | None = None) -> dict:
    task = registry.get(params.data.task)
    if not task.USES_JUDGE:
        return write_skipped(out_dir, f"not needed: the {task.NAME} task is scored without a judge model",
                             "judge")
    if getattr(task, "JUDGE_KIND", "classifier") == "mlp_head":
        return train_mlp_head(params, "judge", train_path, val_path, preferences_path, base_dir, out_dir, "judge")
    records = task.judge_records(read_jsonl(train_path))
    encoder = getattr(params.data, task.NAME).judge_encoder
    return train_classifier(params, records, read_jsonl(val_path), encoder, out_dir, checkpoint_dir, "judge")


def metrics(out_dir: str | Path) -> dict[str, float]:
    return classifier_metrics(out_dir)
