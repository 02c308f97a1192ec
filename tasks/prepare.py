"""Stage `prepare`: load GSM8K, validate it with Great Expectations, split train/val by seed.

    posttrain stage prepare          # or: dvc repro prepare

Invalid input stops the stage with the file, the line and the failed expectation; the output
folder is written to a temporary sibling and renamed only when everything passed.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from posttrain.config import Params
from posttrain.io import DataError, atomic_path, read_jsonl, write_json, write_jsonl

ANSWER_PATTERN = r"####\s*-?\$?\s*[\d,]*\.?\d+(?:/\d+)?\s*$"


def load_split(source: str, split: str) -> tuple[list[dict], str]:
    """Records of one split and a label naming where they came from (file path or hub id)."""
    folder = Path(source)
    if folder.exists():
        path = folder / f"{split}.jsonl"
        records = read_jsonl(path, required={"question": str, "answer": str})
        return records, str(path)
    if "/" in source and not source.startswith((".", "/")):
        from datasets import load_dataset  # online users only: a hub dataset id such as openai/gsm8k

        dataset = load_dataset(source, "main", split=split)
        return [{"question": r["question"], "answer": r["answer"]} for r in dataset], f"{source}[{split}]"
    raise DataError(f"{source}: data source not found (expected a folder with train.jsonl and test.jsonl, or a hub id)")


def _line_numbers(records: list[dict]) -> list[int]:
    """The file line of each record: read_jsonl keeps them (it skips blank lines); a hub split has none,
    so record i is reported as line i + 1."""
    lines = getattr(records, "line_numbers", None)
    return list(lines) if lines and len(lines) == len(records) else [i + 1 for i in range(len(records))]


def validate(records: list[dict], label: str, other_questions: set[str] | None = None) -> dict:
    """Run the expectation suite; raise DataError naming file, line and expectation on failure."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    frame = pd.DataFrame(records)[["question", "answer"]]
    frame["line"] = _line_numbers(records)
    frame["in_other_split"] = frame["question"].isin(other_questions or set())
    context = gx.get_context(mode="ephemeral")
    suite = gx.ExpectationSuite(name=f"gsm8k:{label}")
    expectations = [
        gxe.ExpectColumnValuesToNotBeNull(column="question"),
        gxe.ExpectColumnValuesToNotBeNull(column="answer"),
        gxe.ExpectColumnValuesToMatchRegex(column="question", regex=r"\S"),
        gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=ANSWER_PATTERN),
        gxe.ExpectColumnValuesToBeUnique(column="question"),
        gxe.ExpectColumnValuesToBeInSet(column="in_other_split", value_set=[False]),
    ]
    for expectation in expectations:
        suite.add_expectation(expectation)
    batch = (
        context.data_sources.add_pandas("gsm8k")
        .add_dataframe_asset(name="records")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(
        suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]}
    )
    report = {"source": label, "records": len(frame), "success": bool(result.success), "expectations": []}
    first_failure = None
    for item in result.results:
        config = item.expectation_config
        # pandas hands back numpy integers: plain ints, so messages and the report say 8, not np.int64(8)
        lines = [int(row["line"]) for row in (item.result.get("unexpected_index_list") or [])]
        entry = {
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "success": bool(item.success),
            "unexpected_count": int(item.result.get("unexpected_count") or 0),
            "first_lines": lines[:10],
        }
        report["expectations"].append(entry)
        if not item.success and first_failure is None:
            first_failure = entry
    if first_failure is not None:
        line = first_failure["first_lines"][0] if first_failure["first_lines"] else "?"
        what = "question also in the other split" if first_failure["column"] == "in_other_split" else first_failure["column"]
        raise DataError(
            f"{label}:{line}: failed {first_failure['expectation']} on '{what}' "
            f"({first_failure['unexpected_count']} records, lines {first_failure['first_lines']})"
        )
    return report


def split_train_val(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * val_fraction))) if val_fraction > 0 else 0
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val


def run(params: Params, out_dir: str | Path) -> dict[str, Path]:
    cfg = params.data
    train_all, train_label = load_split(cfg.source, "train")
    test, test_label = load_split(cfg.source, "test")
    test_questions = {r["question"] for r in test}
    reports = {
        "train": validate(train_all, train_label, other_questions=test_questions),
        "test": validate(test, test_label, other_questions={r["question"] for r in train_all}),
    }
    if cfg.max_train:
        train_all = train_all[: cfg.max_train]
    if cfg.max_test:
        test = test[: cfg.max_test]
    train, val = split_train_val(train_all, cfg.val_fraction, params.seed)
    splits = {"train": train, "val": val, "test": test}
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, records in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", ({"question": r["question"], "answer": r["answer"]} for r in records))
        write_json(tmp / "validation.json", {"splits": {k: len(v) for k, v in splits.items()}, "reports": reports})
    return {name: out_dir / f"{name}.jsonl" for name in splits} | {"report": out_dir / "validation.json"}


def metrics(out_dir: str | Path) -> dict[str, float]:
    from posttrain.io import read_json

    report = read_json(Path(out_dir) / "validation.json")
    return {f"n_{name}": float(n) for name, n in report["splits"].items()}
