"""A verifier task the tiny encoder can learn in seconds, for the reward-model tests.

On 120 GSM8K questions the tiny encoder (hidden 32, 2 layers) memorises its training texts and stays at
chance on held-out ones (train loss 0.17, val accuracy 0.33 after 60 epochs), so a held-out accuracy
test on GSM8K could only assert `0 <= acc <= 1`. Here every right answer ends in `#### 3` or `#### 7`
and `reward_model.corrupt` never produces either, so the verifier must read the final line to tell
right from wrong; held-out questions differ from the training ones. All texts have the same length in
tokens, so the final line sits at the same positions in every right text, with or without padding:
the tiny encoder's learned position embeddings then transfer from training to scoring. Measured: at
max_length 40 (every text cut from the left) or exactly the text length it learns in 120 steps; at
64 (texts padded) it stays on its loss plateau at ln 2.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

NAMES = ["Tom", "Ann", "Raj", "Mia", "Leo", "Zoe", "Sam", "Eva", "Max", "Kim"]
THINGS = ["apples", "cookies", "pens", "cards", "books", "hats"]


def record(name: str, thing: str, a: int, b: int) -> dict:
    return {"question": f"{name} has {a} {thing} and gets {b} more. How many {thing} now?",
            "answer": f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"}


def text_length(row: dict, tokenizer) -> int:
    from posttrain.evaluation.prompts import target_text

    return len(tokenizer(f"{row['question']}\n{target_text(row['answer'])}").input_ids)


def write_splits(folder: Path, n_train: int = 96, n_val: int = 32) -> tuple[Path, Path, int]:
    """train.jsonl and val.jsonl with disjoint questions, and the length in tiny-tokenizer tokens that
    every right text has."""
    from collections import defaultdict

    from posttrain.training.base_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    by_length = defaultdict(list)
    for combo in [(n, t, a, total - a) for n in NAMES for t in THINGS for total in (3, 7) for a in range(1, total)]:
        by_length[text_length(record(*combo), tokenizer)].append(combo)
    length, combos = max(by_length.items(), key=lambda item: len(item[1]))  # 160 questions of 57 tokens
    assert len(combos) >= n_train + n_val
    random.Random(0).shuffle(combos)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "val.jsonl"
    for path, rows in zip(paths, (combos[:n_train], combos[n_train:n_train + n_val])):
        path.write_text("".join(json.dumps(record(*row)) + "\n" for row in rows))
    return paths[0], paths[1], length


def verifier_params(params, max_length: int):
    """The tiny profile with enough steps and learning rate for this task (about 120 steps)."""
    cfg = params.reward_model
    training = cfg.training | {"num_train_epochs": 10, "learning_rate": 5e-3, "per_device_train_batch_size": 16,
                               "logging_steps": 10}
    return dataclasses.replace(params, rl=dataclasses.replace(params.rl, method="draft"),  # a method that reads it
                               reward_model=dataclasses.replace(cfg, kind="classifier", encoder="tiny", n_examples=192,
                                                                max_length=max_length, training=training))


def held_out_pairs(val_path: Path, seed: int = 5) -> tuple[list[str], list[str], list[str]]:
    """Questions, right worked answers and the same answers with a wrong final number."""
    from posttrain.io import read_jsonl
    from posttrain.evaluation.prompts import target_text
    from posttrain.tasks.gsm8k import corrupt

    rng = random.Random(seed)
    rows = read_jsonl(val_path)
    return ([r["question"] for r in rows], [target_text(r["answer"]) for r in rows],
            [corrupt(r["answer"], rng) for r in rows])
