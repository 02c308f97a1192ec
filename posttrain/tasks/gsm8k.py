"""The GSM8K task (the default): question -> worked answer ending in `#### n`, scored by the number.

Records are `{question, answer}` (OpenAI's GSM8K, shipped in data/gsm8k). Train/val are split by seed
from train.jsonl, test.jsonl is the test split. A reply passes `strict` when its `#### n` number equals
the reference number and `flexible` when the number found by the fallbacks of posttrain/tasks/gsm8k_answers.py does.
Its prompts, results and protocol hash are pinned by a test: the task layer must not change them.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from posttrain.tasks.defaults import TASKS
from posttrain.tasks.gsm8k_answers import extract_strict, gold_answer, has_final_answer_line, parse_number, strip_calculator_notes
from posttrain.tasks.gsm8k_answers import score as score_answer
from posttrain.io import DataError, read_jsonl, where

NAME = "gsm8k"
DEFAULTS = TASKS[NAME]  # what params may say `task` for (posttrain/tasks/defaults.py: params load without task code)
METRICS, PRIMARY_METRIC, DEFAULT_REWARDS = DEFAULTS.metrics, DEFAULTS.primary_metric, DEFAULTS.rewards
SCORES = DEFAULTS.scores  # per-item numbers promote.metric may name
FAILS_DEGENERATE = DEFAULTS.text  # a reply that did not end, loops or copies its input fails
USES_JUDGE = False  # scored by the reference number: no learned judge
CLASSIFIER_LABELS = 1  # the classifier reward model is an outcome verifier: one logit, P(correct)
ANSWER_PATTERN = r"####\s*-?\$?\s*[\d,]*\.?\d+(?:/\d+)?\s*$"
FIELDS = {"question": str, "answer": str}


def target_text(answer: str) -> str:
    """The worked answer a model is trained to write: prose and `#### n`, no calculator notes."""
    return strip_calculator_notes(answer).strip()


# --------------------------------------------------------------------------- data


def load_split(source: str, split: str) -> tuple[list[dict], str]:
    """Records of one split and a label naming where they came from (file path or hub id)."""
    folder = Path(source)
    if folder.exists():
        path = folder / f"{split}.jsonl"
        return read_jsonl(path, required=FIELDS), str(path)
    if "/" in source and not source.startswith((".", "/")):
        from datasets import load_dataset  # online users only: a hub dataset id such as openai/gsm8k

        dataset = load_dataset(source, "main", split=split)
        return [{"question": r["question"], "answer": r["answer"]} for r in dataset], f"{source}[{split}]"
    raise DataError(f"{source}: data source not found (expected a folder with train.jsonl and test.jsonl, or a hub id)")


def validate(records: list[dict], label: str, other_questions: set[str] | None = None) -> dict:
    """The expectation suite; DataError naming file, line and expectation on failure."""
    import great_expectations.expectations as gxe
    import pandas as pd

    from posttrain.tasks.validation import line_numbers, run_suite

    frame = pd.DataFrame(records)[["question", "answer"]]
    frame["line"] = line_numbers(records)
    frame["in_other_split"] = frame["question"].isin(other_questions or set())
    expectations = [
        gxe.ExpectColumnValuesToNotBeNull(column="question"),
        gxe.ExpectColumnValuesToNotBeNull(column="answer"),
        gxe.ExpectColumnValuesToMatchRegex(column="question", regex=r"\S"),
        gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=ANSWER_PATTERN),
        gxe.ExpectColumnValuesToBeUnique(column="question"),
        gxe.ExpectColumnValuesToBeInSet(column="in_other_split", value_set=[False]),
    ]
    return run_suite(frame, "gsm8k", label, expectations,
                     describe=lambda column: "question also in the other split" if column == "in_other_split" else column)


def split_train_val(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * val_fraction))) if val_fraction > 0 else 0
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val


def prepare(params) -> tuple[dict[str, list[dict]], dict]:
    cfg = params.data
    train_all, train_label = load_split(cfg.gsm8k.source, "train")
    test, test_label = load_split(cfg.gsm8k.source, "test")
    reports = {
        "train": validate(train_all, train_label, other_questions={r["question"] for r in test}),
        "test": validate(test, test_label, other_questions={r["question"] for r in train_all}),
    }
    if cfg.max_train:
        train_all = train_all[: cfg.max_train]
    if cfg.max_test:
        test = test[: cfg.max_test]
    train, val = split_train_val(train_all, cfg.val_fraction, params.seed)
    keep = lambda records: [{"question": r["question"], "answer": r["answer"]} for r in records]  # noqa: E731
    return {"train": keep(train), "val": keep(val), "test": keep(test)}, reports


# --------------------------------------------------------------------------- prompts and rewards


def prompt_and_reference(record: dict) -> tuple[str, str]:
    return record["question"], target_text(record["answer"])


def reward_columns(record: dict) -> dict:
    return {"answer": gold_answer(record["answer"])}  # exact_match reads it


def corrupt(answer: str, rng: random.Random) -> str:
    """The same worked answer with a wrong final number."""
    gold = parse_number(gold_answer(answer)) or 0.0
    wrong = gold + rng.choice([-3, -2, -1, 1, 2, 5, 10]) if rng.random() < 0.7 else gold * rng.choice([2, 3, 0.5])
    wrong_text = str(int(wrong)) if float(wrong).is_integer() else f"{wrong:.2f}"
    return re.sub(r"####.*$", f"#### {wrong_text}", target_text(answer))


def classifier_examples(records: list[dict], n: int, seed: int) -> list[dict]:
    """An outcome verifier's data: reference solutions (1) and the same with a wrong final number (0),
    so the model must read the numbers, not the style."""
    rng = random.Random(seed)
    examples = []
    for record in records[: max(1, n // 2)]:
        examples.append({"text": f"{record['question']}\n{target_text(record['answer'])}", "label": 1.0})
        examples.append({"text": f"{record['question']}\n{corrupt(record['answer'], rng)}", "label": 0.0})
    rng.shuffle(examples)
    return examples


def reward_model_records(records: list[dict]) -> list[dict]:
    return records


def judge_records(records: list[dict]) -> list[dict]:
    return []  # no judge: the reference number decides


def preference_pairs(records: list[dict], n: int, seed: int) -> list[tuple[str, str, str]]:
    """(question, reference answer, the same answer with a wrong final number); n counts sequences."""
    rng = random.Random(seed)
    return [(r["question"], target_text(r["answer"]), corrupt(r["answer"], rng)) for r in records[: max(1, n // 2)]]


# --------------------------------------------------------------------------- evaluation


def check_eval_records(records: list[dict]) -> None:
    """Refuse (DataError naming file:line, as read_jsonl keeps it) a record without a `question` string or
    an `answer` string that ends in `#### <number>`."""
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{where(records, index)}: expected a JSON object, got {type(record).__name__}")
        for key, kind in FIELDS.items():
            if key not in record:
                raise DataError(f"{where(records, index)}: missing field '{key}'")
            if not isinstance(record[key], kind):
                raise DataError(f"{where(records, index)}: field '{key}' must be {kind.__name__}, "
                                f"got {type(record[key]).__name__}")
        if extract_strict(record["answer"]) is None:
            raise DataError(f"{where(records, index)}: field 'answer' has no final '#### <number>' line "
                            f"(ends {record['answer'][-40:]!r})")


def newline_token_mask(tokenizer):
    """Bool over the vocabulary: does this token's text contain a newline? Built once per tokenizer."""
    cached = getattr(tokenizer, "_posttrain_newline_mask", None)
    if cached is None:
        import torch

        pieces = tokenizer.batch_decode([[token_id] for token_id in range(len(tokenizer))])
        cached = torch.tensor(["\n" in piece for piece in pieces], dtype=torch.bool)
        tokenizer._posttrain_newline_mask = cached
    return cached


class AnswerLineStop:
    """Stop rule: a row is done once its text holds the `#### n` line (its answer cannot change after).

    The newline test is a vocabulary lookup on each row's newest token, so only rows that just ended
    a line are decoded.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.newline_tokens = newline_token_mask(tokenizer)

    def __call__(self, newest, generated_so_far):
        """`newest`: each row's latest token; `generated_so_far(row)`: that row's new tokens."""
        import torch

        done = torch.zeros(newest.shape[0], dtype=torch.bool, device=newest.device)
        newline = self.newline_tokens[newest.cpu().clamp(max=len(self.newline_tokens) - 1)]
        for row in torch.nonzero(newline).flatten().tolist():
            done[row] = has_final_answer_line(self.tokenizer.decode(generated_so_far(row), skip_special_tokens=True))
        return done


def stop_rule(tokenizer):
    """A row is done once its `#### n` line is written: the answer cannot change after it."""
    return AnswerLineStop(tokenizer)


def make_context(params, judge_dir):
    return None  # nothing to load: the reference number decides


def score(records: list[dict], generations: list[str], context=None, params=None) -> list[dict]:
    out = []
    for record, text in zip(records, generations):
        gold = gold_answer(record["answer"])
        s = score_answer(text, gold)
        out.append({
            "question": record["question"], "generation": text, "gold": gold,
            "prediction_strict": s.strict_prediction, "prediction_flexible": s.flexible_prediction,
            "correct_strict": s.strict_correct, "correct_flexible": s.flexible_correct,
        })
    return out


def summary(per_item: list[dict]) -> dict:
    return {}


def protocol(params) -> dict:
    return {}  # GSM8K's protocol predates tasks; adding keys would change every recorded hash
