import json

import pytest

from posttrain.io import DataError
from posttrain.stages import prepare


def test_split_is_reproducible_and_disjoint(params, prepared, tmp_path):
    again = tmp_path / "again"
    prepare.run(params, again)
    for name in ("train", "val", "test"):
        assert (prepared / f"{name}.jsonl").read_text() == (again / f"{name}.jsonl").read_text()
    read = lambda name: [json.loads(l)["question"] for l in (prepared / f"{name}.jsonl").open()]
    train, val, test = read("train"), read("val"), read("test")
    assert len(train) + len(val) == 120 and len(test) == 12
    assert not set(train) & set(val) and not set(train) & set(test)
    report = json.loads((prepared / "validation.json").read_text())
    assert report["reports"]["train"]["success"] and len(report["reports"]["train"]["expectations"]) == 6


def make_source(tmp_path, train_lines, test_lines=None):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.jsonl").write_text("".join(train_lines))
    (src / "test.jsonl").write_text("".join(test_lines or [json.dumps({"question": "t?", "answer": "#### 1"}) + "\n"]))
    return src


GOOD = [json.dumps({"question": f"q{i}?", "answer": f"so {i}\n#### {i}"}) + "\n" for i in range(5)]


@pytest.mark.parametrize("bad_line,message", [
    (json.dumps({"question": "q9?", "answer": "no final line"}) + "\n", r"train.jsonl:4: failed expect_column_values_to_match_regex on 'answer'"),
    (json.dumps({"question": "q0?", "answer": "#### 3"}) + "\n", r"train.jsonl:\d: failed expect_column_values_to_be_unique on 'question'"),
    (json.dumps({"question": "t?", "answer": "#### 3"}) + "\n", r"train.jsonl:4: failed expect_column_values_to_be_in_set on 'question also in the other split'"),
    (json.dumps({"question": "  ", "answer": "#### 3"}) + "\n", r"train.jsonl:4: failed expect_column_values_to_match_regex on 'question'"),
    ('{"question": "q", "answer": \n', r"train.jsonl:4: malformed JSON"),
    (json.dumps({"question": "q"}) + "\n", r"train.jsonl:4: missing field 'answer'"),
    (json.dumps({"question": 3, "answer": "#### 3"}) + "\n", r"train.jsonl:4: field 'question' must be str, got int"),
])
def test_invalid_data_is_rejected_with_file_line_and_nothing_written(params, tmp_path, bad_line, message):
    import dataclasses

    src = make_source(tmp_path, GOOD[:3] + [bad_line] + GOOD[3:])
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("previous output\n")
    p = dataclasses.replace(params, data=dataclasses.replace(params.data, gsm8k=dataclasses.replace(params.data.gsm8k, source=str(src)), max_train=0, max_test=0))
    with pytest.raises(DataError, match=message):
        prepare.run(p, out)
    assert (out / "train.jsonl").read_text() == "previous output\n"  # previous outputs intact
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out", "src"]  # no temp leftovers


def test_empty_file_and_missing_source(params, tmp_path):
    import dataclasses

    src = make_source(tmp_path, [])
    p = dataclasses.replace(params, data=dataclasses.replace(params.data, gsm8k=dataclasses.replace(params.data.gsm8k, source=str(src))))
    with pytest.raises(DataError, match="train.jsonl: file is empty"):
        prepare.run(p, tmp_path / "out")
    p = dataclasses.replace(params, data=dataclasses.replace(params.data, gsm8k=dataclasses.replace(params.data.gsm8k, source=str(tmp_path / "missing"))))
    with pytest.raises(DataError, match="data source not found"):
        prepare.run(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()
