"""Stage `reward_model`: a learned reward for the task, kind chosen by `reward_model.kind`.

    posttrain stage reward_model     # or: dvc repro reward_model

The kinds (classifier, pairwise, mlp_head) and what each trains on: posttrain/reward_models/training.py.
A reward model that no chosen method or reward reads is not trained: the stage writes `skipped.json`
with the reason. One that is used must beat chance on held-out data, or the stage says so loudly.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import Params
from posttrain.reward_models.training import (KINDS, metrics, run_classifier, run_pairwise, train_mlp_head,
                                              why_not_needed, write_skipped)

__all__ = ["run", "metrics"]


def run(params: Params, train_path: str | Path, val_path: str | Path, out_dir: str | Path,
        checkpoint_dir: str | Path = "checkpoints/reward_model", base_dir: str | Path = "models/base",
        preferences_path: str | Path | None = None) -> dict:
    kind = params.reward_model.kind
    if kind not in KINDS:
        raise ValueError(f"reward_model.kind: unknown kind {kind!r}; known: {list(KINDS)}")
    reason = why_not_needed(params)
    if reason:
        return write_skipped(out_dir, reason, note=f"rl.method {params.rl.method}")
    if kind == "pairwise":
        return run_pairwise(params, train_path, val_path, out_dir, checkpoint_dir, base_dir)
    if kind == "mlp_head":
        return train_mlp_head(params, "reward_model", train_path, val_path, preferences_path, base_dir, out_dir,
                              "mlp_head reward model")
    return run_classifier(params, train_path, val_path, out_dir, checkpoint_dir)
