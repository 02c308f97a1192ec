"""GSM8K answer extraction and scoring: pure functions, no I/O.

Order of precedence follows lm-evaluation-harness plus the usual solution tags:
  strict   -> only `#### <number>`
  flexible -> `#### <number>`, then a solution tag (<answer>..</answer>, \\boxed{..},
              "The answer is ..."), then the last number in the text.
Numbers are compared numerically (fractions, decimals, commas, `$`, trailing period)
with an absolute and a relative tolerance.

    python -m pytest tests/test_gsm8k.py
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

# A number as people write it in GSM8K: -1,234.50  $12  3/4  .5
_NUMBER_RE = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_TAG_RES = (
    re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S | re.I),
    re.compile(r"<solution>\s*(.*?)\s*</solution>", re.S | re.I),
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"[Tt]he (?:final )?answer is[:\s]*([^\n]*)"),
)
_CALCULATOR_NOTE_RE = re.compile(r"<<[^<>]*>>")

ABS_TOL = 1e-6
REL_TOL = 1e-6


def parse_number(text: str | None) -> float | None:
    """Turn '1,234.5', '$12', '3/4', '7.' or '-2' into a float; None when it is not a number."""
    if text is None:
        return None
    cleaned = _clean(text.strip().replace(" ", ""))
    if not cleaned:
        return None
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/", 1)
            return float(Fraction(num) / Fraction(den))
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _clean(number: str) -> str:
    """'$1,234.' -> '1234': the form stored in per-question records."""
    return number.replace("$", "").replace(",", "").rstrip(".")


def _first_number(text: str) -> str | None:
    match = _NUMBER_RE.search(text)
    return _clean(match.group(0)) if match else None


def extract_strict(generation: str) -> str | None:
    """The number after the first `####` (lm-eval-harness 'strict-match')."""
    match = _HASH_RE.search(generation)
    if not match:
        return None
    return _first_number(match.group(1))


def extract_flexible(generation: str) -> str | None:
    """`#### n`, then a solution tag, then the last number in the text."""
    strict = extract_strict(generation)
    if strict is not None:
        return strict
    for tag_re in _TAG_RES:
        match = tag_re.search(generation)
        if match:
            number = _first_number(match.group(1))
            if number is not None:
                return number
    # Calculator notes like <<3*4=12>> repeat numbers; drop them before taking the last one.
    numbers = _NUMBER_RE.findall(_CALCULATOR_NOTE_RE.sub(" ", generation))
    return _clean(numbers[-1]) if numbers else None


def gold_answer(answer_field: str) -> str:
    """The reference number of a GSM8K record's `answer` field (always ends in `#### n`)."""
    number = extract_strict(answer_field)
    if number is None:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer_field[-80:]!r}")
    return number


def numbers_match(prediction: str | None, gold: str | None, abs_tol: float = ABS_TOL, rel_tol: float = REL_TOL) -> bool:
    pred_value, gold_value = parse_number(prediction), parse_number(gold)
    if pred_value is None or gold_value is None:
        return False
    return math.isclose(pred_value, gold_value, rel_tol=rel_tol, abs_tol=abs_tol)


@dataclass(frozen=True)
class Score:
    strict_prediction: str | None
    flexible_prediction: str | None
    strict_correct: bool
    flexible_correct: bool


def score(generation: str, gold: str) -> Score:
    strict = extract_strict(generation)
    flexible = extract_flexible(generation)
    return Score(strict, flexible, numbers_match(strict, gold), numbers_match(flexible, gold))


_ANSWER_LINE_RE = re.compile(r"####[ \t]*-?\$?[ \t]*[\d.,/]*\d[^\n]*\n")


def has_final_answer_line(generation: str) -> bool:
    """True once the text holds a complete `#### n` line: generation can stop there."""
    return bool(_ANSWER_LINE_RE.search(generation))


def strip_calculator_notes(answer: str) -> str:
    """GSM8K answers carry `<<16-3-4=9>>` notes; the training target keeps the prose only."""
    return _CALCULATOR_NOTE_RE.sub("", answer)
