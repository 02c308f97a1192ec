"""Stage `reward_model`: a learned reward for the task, kind chosen by `reward_model.kind`.

    posttrain stage reward_model     # or: dvc repro reward_model

The task (posttrain/tasks/) gives the data. GSM8K: "is this worked answer correct?", positives are
reference solutions, negatives the same solutions with a wrong final number, so the model must read the
numbers, not the style. Style: poem (1) against the plain side of the pairs (0).

classifier: an encoder (default all-MiniLM-L6-v2) with a classification head, trained with the HF
            Trainer: one logit and BCE for a GSM8K verifier, two classes and cross-entropy for the style
            classifier (the DRaFT notebook's). Used by DRaFT and the `verifier` / `style` rewards.
pairwise:   the base LM with a scalar head (AutoModelForSequenceClassification, num_labels=1), trained
            with TRL's RewardTrainer (Bradley-Terry loss) on (prompt, chosen, rejected) pairs in the
            evaluation prompt protocol. It shares the policy's tokenizer, so PPO scores token ids directly.
mlp_head:   the StrictBot notebook's: the frozen base LM with an MLP head (hidden -> 512 -> 256 -> 1) on the last
            non-padding token, Bradley-Terry on the task's pairs (chat: the reward-model part of the
            preference file; without one, reference output over a base-model sample drawn with the seed
            recorded). Saves the head only (head.safetensors) and a pointer to its base (posttrain/reward_models/mlp_head.py).
All save safetensors, train_log.json and eval.json (val accuracy; for pairwise and mlp_head P(chosen > rejected)).
A reward model that no chosen method or reward reads is not trained: the stage writes `skipped.json`
with the reason. One that is used must beat chance on held-out data, or the stage says so loudly.
The training code: posttrain/reward_models/training.py.
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
