import pytest

from posttrain.tasks.gsm8k_answers import (extract_flexible, extract_strict, gold_answer, has_final_answer_line, numbers_match,
                             parse_number, score, strip_calculator_notes)


@pytest.mark.parametrize("text,expected", [
    ("so 3+4=7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### $18.", "18"),
    ("####-5", "-5"),
    ("#### 3/4", "3/4"),
    ("#### 0.50", "0.50"),
    ("answer 12, then #### 13\nmore 99", "13"),
    ("no hash line 42", None),
    ("#### \n", None),
])
def test_strict(text, expected):
    assert extract_strict(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("#### 7 and later 9", "7"),
    ("<answer> 1,000 </answer> then 5", "1000"),
    ("we get \\boxed{42} so 3", "42"),
    ("The answer is $15.\nI hope 2", "15"),
    ("First 3 apples then 4 apples, total 7.", "7"),
    ("She has <<3*4=12>>12 cookies", "12"),
    ("<<5*6=30>>", None),
    ("nothing here", None),
    ("It costs -3 dollars", "-3"),
    ("half is .5", ".5"),
])
def test_flexible(text, expected):
    assert extract_flexible(text) == expected


@pytest.mark.parametrize("text,value", [
    ("1,234", 1234.0), ("$18", 18.0), ("7.", 7.0), ("3/4", 0.75), ("-2.5", -2.5), ("abc", None), ("", None),
    ("1/0", None), (None, None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("pred,gold,same", [
    ("18", "18", True), ("18.0", "18", True), ("1,000", "1000", True), ("$5", "5", True), ("0.75", "3/4", True),
    ("18.01", "18", False), ("17", "18", False), (None, "18", False), ("1e400", "1", False),
])
def test_numbers_match(pred, gold, same):
    assert numbers_match(pred, gold) is same


def test_score_strict_vs_flexible():
    s = score("3 + 4 = 7 so the total is 7", "7")
    assert (s.strict_correct, s.flexible_correct) == (False, True)
    s = score("#### 8\nwait, 7", "7")
    assert (s.strict_correct, s.flexible_correct) == (False, False)


def test_gold_answer_and_missing_line():
    assert gold_answer("She has <<2*3=6>>6.\n#### 6") == "6"
    with pytest.raises(ValueError, match="####"):
        gold_answer("no final line")


def test_answer_line_detection_needs_complete_line():
    assert not has_final_answer_line("so #### 1")
    assert has_final_answer_line("so\n#### 12\n")
    assert not has_final_answer_line("####\n")


def test_strip_calculator_notes():
    assert strip_calculator_notes("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"


def test_every_real_gsm8k_answer_has_a_gold_number():
    from conftest import GSM8K
    from posttrain.io import read_jsonl

    records = read_jsonl(GSM8K / "test.jsonl")
    golds = [parse_number(gold_answer(r["answer"])) for r in records]
    assert all(g is not None for g in golds) and len(golds) == 1319
