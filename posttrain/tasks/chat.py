"""The persona chat task (the StrictBot notebook's): SFT on instructions, a reward model on preference pairs, PPO.

Data, in the folder `data.chat.source` (data/chat/README.md is the shipped persona's card):
  - `data.chat.instructions`: `[{"input": str, "output": str}, ...]` as one JSON list (StrictBot's), or the
    same objects as JSON Lines;
  - `data.chat.preferences` (optional, "" = none): JSON Lines `{"prompt": str, "chosen": str, "rejected": str}`.
Great Expectations checks, each failure at file:line: empty or missing fields, an input (or a preference
prompt) twice (compared case- and space-insensitively), chosen == rejected, and a preference prompt that
is also an evaluation item (it would teach the reward model and the judge the test).

Split, seeded: instructions -> train / val / test (`val_fraction`, `test_fraction`), an instruction whose
input has preference pairs never in test (refused only when every instruction has them); preference pairs ->
a judge part (`judge_fraction`) the reward model never sees and a reward-model part, each holding out
`pair_val_fraction` of its pairs for its pairwise accuracy. Without a preference file both models learn
reference output (chosen) over a base-model sample (rejected), on disjoint training records (even index:
reward model, odd index: judge).

Prompt: the tokenizer's chat template with the persona system prompt, or StrictBot's literal
`<|user|> {input} <|end|>\n<|assistant|>` (`data.chat.prompt_format`, recorded in the protocol).
Per held-out item: pass = the judge (an mlp_head reward model trained on the judge part) scores the
model's greedy reply above the reference output; the margin and the reply length are reported too.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from posttrain.tasks.defaults import TASKS
from posttrain.io import DataError, Records, read_jsonl, where

NAME = "chat"
DEFAULTS = TASKS[NAME]  # what params may say `task` for (posttrain/tasks/defaults.py: params load without task code)
METRICS, PRIMARY_METRIC, DEFAULT_REWARDS = DEFAULTS.metrics, DEFAULTS.primary_metric, DEFAULTS.rewards
SCORES = DEFAULTS.scores  # per-item numbers promote.metric may name
FAILS_DEGENERATE = DEFAULTS.text  # a reply that did not end, loops or copies its input fails
USES_JUDGE = True
JUDGE_KIND = "mlp_head"  # the judge stage trains a reward model of StrictBot's kind on the judge part
CLASSIFIER_LABELS = 1
INSTRUCTION_FIELDS = ("input", "output")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def normalised(text: str) -> str:
    """What counts as the same prompt: case and runs of whitespace ignored."""
    return " ".join(text.casefold().split())


# --------------------------------------------------------------------------- reading


def _read_json_list(path: Path) -> Records:
    """A JSON list of objects, each remembering the line it starts on."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None
    decoder, items, lines = json.JSONDecoder(), [], []
    line, cursor = 1, 0

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_at(pos: int) -> int:
        nonlocal line, cursor
        line += text.count("\n", cursor, pos)
        cursor = pos
        return line

    pos = skip(0) + 1  # past '['
    while True:
        pos = skip(pos)
        if pos < len(text) and text[pos] == "]":
            break
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        items.append(item)
        lines.append(line_at(pos))
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise DataError(f"{path}:{line_at(min(pos, len(text)))}: expected ',' or ']' after a list item")
    if skip(pos + 1) != len(text):
        raise DataError(f"{path}:{line_at(skip(pos + 1))}: text after the end of the JSON list")
    return Records(items, path, lines)


def read_records(path: str | Path) -> Records:
    """A JSON list (first character '[') or JSON Lines; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    records = _read_json_list(path) if head.startswith(b"[") else read_jsonl(path)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{where(records, index)}: expected a JSON object, got {type(record).__name__}")
    return records


def source_files(cfg) -> tuple[Path, Path | None]:
    folder = Path(cfg.source)
    if not folder.is_dir():
        raise DataError(f"{cfg.source}: data source not found (data.chat.source: a folder holding "
                        f"{cfg.instructions} and, optionally, {cfg.preferences or 'a preference file'})")
    preferences = folder / cfg.preferences if cfg.preferences else None
    if preferences is not None and not preferences.is_file():
        raise DataError(f"{preferences}: file not found (data.chat.preferences; set it to \"\" to train the reward "
                        "model and the judge on base-model samples instead)")
    return folder / cfg.instructions, preferences


# --------------------------------------------------------------------------- validation


def _frame(records: Records, fields: tuple[str, ...]):
    import pandas as pd

    from posttrain.tasks.validation import line_numbers

    frame = pd.DataFrame({f: [r.get(f) if isinstance(r.get(f), str) else None for r in records] for f in fields})
    frame["line"] = line_numbers(records)
    return frame


def _repeats(frame, column: str):
    """True where the text (normalised) appeared on an earlier line: the error names the repeat, not the first."""
    keys = frame[column].map(lambda text: normalised(text) if isinstance(text, str) else None)
    return keys.notna() & keys.duplicated(keep="first")


def _describe(column: str) -> str:
    return {"input_repeated": "input (the same input twice)", "prompt_repeated": "prompt (the same prompt twice)",
            "chosen_is_rejected": "chosen == rejected", "in_test": "prompt also an evaluation (test) input"}.get(
        column, column)


def _not_empty(fields: tuple[str, ...]) -> list:
    import great_expectations.expectations as gxe

    return [e for f in fields for e in (gxe.ExpectColumnValuesToNotBeNull(column=f),
                                        gxe.ExpectColumnValuesToMatchRegex(column=f, regex=r"\S"))]


def validate_instructions(records: Records) -> dict:
    import great_expectations.expectations as gxe

    from posttrain.tasks.validation import run_suite

    frame = _frame(records, INSTRUCTION_FIELDS)
    frame["input_repeated"] = _repeats(frame, "input")
    return run_suite(frame, "chat_instructions", str(records.path), [
        *_not_empty(INSTRUCTION_FIELDS), gxe.ExpectColumnValuesToBeInSet(column="input_repeated", value_set=[False])],
        describe=_describe)


def validate_preferences(records: Records, test_inputs: set[str]) -> dict:
    import great_expectations.expectations as gxe

    from posttrain.tasks.validation import run_suite

    frame = _frame(records, PREFERENCE_FIELDS)
    frame["prompt_repeated"] = _repeats(frame, "prompt")
    frame["chosen_is_rejected"] = [isinstance(c, str) and isinstance(r, str) and c.strip() == r.strip()
                                   for c, r in zip(frame["chosen"], frame["rejected"])]
    frame["in_test"] = frame["prompt"].map(lambda text: isinstance(text, str) and normalised(text) in test_inputs)
    return run_suite(frame, "chat_preferences", str(records.path), [
        *_not_empty(PREFERENCE_FIELDS), gxe.ExpectColumnValuesToBeInSet(column="prompt_repeated", value_set=[False]),
        gxe.ExpectColumnValuesToBeInSet(column="chosen_is_rejected", value_set=[False]),
        gxe.ExpectColumnValuesToBeInSet(column="in_test", value_set=[False])], describe=_describe)


# --------------------------------------------------------------------------- split


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def split_instructions(records: Records, val_fraction: float, test_fraction: float, seed: int,
                       keep_out_of_test: set[str] = frozenset()):
    """(train, val, test), seeded; each at least one record, each record keeping its file:line.

    Instructions whose input (normalised) is in `keep_out_of_test` (the preference prompts) never land in
    test: the reward model and the judge learn from those pairs, so an evaluation item among them would be
    seen in training. The test items are the first eligible ones of the seeded order, so data without such
    overlap splits exactly as it always did; with fewer eligible instructions than the test share, the test
    split is smaller. None eligible: refused, with how to fix it."""
    n = len(records)
    n_test, n_val = max(1, round(n * test_fraction)), max(1, round(n * val_fraction))
    if n_test + n_val >= n:
        raise DataError(f"{records.path}: {n} instructions are too few for a train, val and test split "
                        f"(test {n_test}, val {n_val})")
    order = _shuffled(n, seed)
    eligible = [i for i in order if normalised(records[i]["input"]) not in keep_out_of_test]
    if not eligible:
        raise DataError(f"{records.path}: every one of the {n} instructions has preference pairs on its input, so "
                        "none can be an evaluation item the reward model and the judge never saw; add instructions "
                        "without preference pairs (or remove some pairs from the preference file)")
    test_set = set(eligible[:n_test])
    rest = [i for i in order if i not in test_set]
    pick = lambda indices: [{"input": records[i]["input"].strip(), "output": records[i]["output"].strip(),  # noqa: E731
                             "source": where(records, i)} for i in sorted(indices)]
    return pick(rest[n_val:]), pick(rest[:n_val]), pick(test_set)


def split_preferences(records: Records, judge_fraction: float, pair_val_fraction: float, seed: int) -> list[dict]:
    """Every pair tagged with its part (judge | reward_model) and split (train | val), seeded."""
    order = _shuffled(len(records), seed + 1)  # a stream of its own: the instruction split does not move it
    n_judge = round(len(records) * judge_fraction)
    out = []
    for part, indices in (("judge", order[:n_judge]), ("reward_model", order[n_judge:])):
        n_val = round(len(indices) * pair_val_fraction)
        for k, i in enumerate(indices):
            r = records[i]
            out.append({"prompt": r["prompt"].strip(), "chosen": r["chosen"].strip(), "rejected": r["rejected"].strip(),
                        "part": part, "split": "val" if k < n_val else "train", "source": where(records, i)})
    return sorted(out, key=lambda r: (r["part"], r["split"], int(r["source"].rsplit(":", 1)[1])))


def prepare(params) -> tuple[dict[str, list[dict]], dict]:
    cfg, data = params.data.chat, params.data
    instructions_path, preferences_path = source_files(cfg)
    instructions = read_records(instructions_path)
    report = {"instructions": validate_instructions(instructions)}
    preferences = read_records(preferences_path) if preferences_path is not None else None
    # Preference pairs are usually collected on the instructions' own prompts: those instructions train or
    # validate, never test (their pairs teach the reward model and the judge).
    paired = {normalised(r["prompt"]) for r in preferences or [] if isinstance(r.get("prompt"), str)}
    train, val, test = split_instructions(instructions, cfg.val_fraction, cfg.test_fraction, params.seed, paired)
    inputs = {normalised(r["input"]) for r in instructions}
    report["split"] = {"instructions_with_preference_pairs": len(inputs & paired), "test": len(test),
                       "test_wanted": max(1, round(len(instructions) * cfg.test_fraction))}
    if report["split"]["test"] < report["split"]["test_wanted"]:
        print(f"prepare: {len(test)} test items instead of {report['split']['test_wanted']}: "
              f"{report['split']['instructions_with_preference_pairs']} of {len(instructions)} instructions have "
              "preference pairs and stay out of the test split")
    splits = {"train": train[: data.max_train] if data.max_train else train, "val": val,
              "test": test[: data.max_test] if data.max_test else test}
    if preferences is not None:
        report["preferences"] = validate_preferences(preferences, {normalised(r["input"]) for r in test})
        splits["preferences"] = split_preferences(preferences, cfg.judge_fraction, cfg.pair_val_fraction, params.seed)
        for part in ("reward_model", "judge"):
            rows = [r for r in splits["preferences"] if r["part"] == part]
            if not any(r["split"] == "train" for r in rows) or not any(r["split"] == "val" for r in rows):
                raise DataError(f"{preferences_path}: {len(preferences)} preference pairs leave the {part} without "
                                "training or held-out pairs (data.chat.judge_fraction, pair_val_fraction)")
    else:
        report["preferences"] = "none: reward model and judge learn the reference output over a base-model sample"
    return splits, report


# --------------------------------------------------------------------------- prompts and rewards


def prompt_and_reference(record: dict) -> tuple[str, str]:
    return record["input"], record["output"]


def reward_columns(record: dict) -> dict:
    return {}


def reward_model_records(records: list[dict]) -> list[dict]:
    """Without a preference file: the even-index training records (the judge takes the odd ones)."""
    return records[0::2]


def judge_records(records: list[dict]) -> list[dict]:
    return records[1::2]


def pair_sets(role: str, train: list[dict], val: list[dict], preferences: list[dict], n: int, seed: int):
    """(train pairs, held-out pairs, where they come from) for the reward model (role `reward_model`) or the
    judge (`judge`): dicts {user, chosen, rejected}; rejected None = a base-model sample is drawn for it.
    From the preference file every pair of the role's part is used; without it n // 2 instructions."""
    if preferences:
        rows = [r for r in preferences if r["part"] == role]
        as_pair = lambda r: {"user": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}  # noqa: E731
        return ([as_pair(r) for r in rows if r["split"] == "train"], [as_pair(r) for r in rows if r["split"] == "val"],
                f"the {role} part of the preference file")
    pick = reward_model_records if role == "reward_model" else judge_records
    as_pair = lambda r: {"user": r["input"], "chosen": r["output"], "rejected": None}  # noqa: E731
    return ([as_pair(r) for r in pick(train)[: max(1, n // 2)]], [as_pair(r) for r in pick(val)],
            "reference outputs over base-model samples")


def preference_pairs(records: list[dict], n: int, seed: int) -> list[tuple[str, str, str]]:
    """Pairs for reward_model.kind pairwise: preference records as they are."""
    if records and "chosen" not in records[0]:
        raise ValueError("the chat task's pairwise reward model needs data.chat.preferences "
                         "(or reward_model.kind: mlp_head, which samples rejected replies from the base model)")
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in records[: max(1, n // 2)]]


def classifier_examples(records: list[dict], n: int, seed: int) -> list[dict]:
    raise ValueError("the chat task has no classifier data: use reward_model.kind mlp_head (StrictBot's) or pairwise")


# --------------------------------------------------------------------------- evaluation


def check_eval_records(records: list[dict]) -> None:
    for index, record in enumerate(records):
        for key in INSTRUCTION_FIELDS:
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DataError(f"{where(records, index)}: field '{key}' must be a non-empty string")


def stop_rule(tokenizer):
    return None  # a reply ends at EOS


class Judge:
    """The held-out mlp_head judge: scores (prompt, reply) in the evaluation protocol."""

    def __init__(self, judge_dir: str | Path, params, batch_size: int = 16):
        from posttrain.reward_models import mlp_head

        judge_dir = Path(judge_dir)
        if not mlp_head.is_mlp_head(judge_dir):
            raise FileNotFoundError(f"chat judge: no mlp_head model at '{judge_dir}' (run the judge stage first)")
        self.model, self.tokenizer, self.pointer = mlp_head.load(judge_dir)
        self.params, self.batch_size = params, batch_size

    def scores(self, users: list[str], replies: list[str]) -> list[float]:
        from posttrain.reward_models import mlp_head
        from posttrain.evaluation.prompts import prompt_text, reply_text

        cfg, max_length = self.params.eval, self.pointer["max_length"]  # as the judge was trained
        rows = [mlp_head.encode(self.tokenizer, prompt_text(u, cfg, self.tokenizer), reply_text(r, cfg), max_length)
                for u, r in zip(users, replies)]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return mlp_head.scores_of(self.model, rows, pad_id, self.batch_size)


def make_context(params, judge_dir):
    return Judge(judge_dir, params)


def score(records: list[dict], generations: list[str], context: Judge, params=None) -> list[dict]:
    users = [r["input"] for r in records]
    replies = context.scores(users, generations)
    references = context.scores(users, [r["output"] for r in records])
    out = []
    for record, text, s_reply, s_reference in zip(records, generations, replies, references):
        out.append({"question": record["input"], "generation": text, "reference": record["output"],
                    "judge_reply": round(s_reply, 6), "judge_reference": round(s_reference, 6),
                    "judge_margin": round(s_reply - s_reference, 6), "reply_words": len(text.split()),
                    "correct_pass": s_reply > s_reference})
    return out


def summary(per_item: list[dict]) -> dict:
    return {"judge_margin_mean": statistics.fmean(r["judge_margin"] for r in per_item),
            "reply_words_mean": statistics.fmean(r["reply_words"] for r in per_item)}


def protocol(params) -> dict:
    from posttrain.evaluation.prompts import STRICTBOT_TEMPLATE, protocol_name

    cfg = params.data.chat
    data = (f"the judge part of {cfg.preferences} (judge_fraction {cfg.judge_fraction}, seed {params.seed}), which "
            "the reward model never sees") if cfg.preferences else (
        f"reference outputs over base-model samples of the odd-index training instructions (seed {params.seed})")
    return {"task": NAME, "prompt_format": protocol_name(cfg.prompt_format),
            **({"prompt_template": STRICTBOT_TEMPLATE} if cfg.prompt_format == "strictbot" else {}),
            "judge": f"mlp_head reward model (frozen {params.base.source} + MLP 512-256-1, Bradley-Terry) on {data}, "
                     "with shortcut negatives (posttrain/reward_models/shortcuts.py)",
            "pass": "judge score(greedy reply) > judge score(reference output)"}
