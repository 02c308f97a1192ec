"""Per-item well-formedness (posttrain/evaluation/degeneration.py): loops, truncation and copies are caught."""

import pytest

from posttrain.evaluation.degeneration import Thresholds, copy_overlap, item_checks, rates, repeated_ngrams

LOOP = "The train's delayed again, and nobody knows why;\n" * 14
POEM = "The train is late, the platform cold,\nwe wait as stories long since told;\nno word of why, no word of when,\nwe'll catch the next, and wait again."
PLAIN = "The train is delayed again and nobody knows why."


def test_rep_n_separates_a_loop_from_a_poem_with_a_refrain():
    refrain = "Rain on the roof tonight,\nsoft and slow,\nrain on the roof tonight,\nand off we go."
    assert repeated_ngrams(LOOP) > 0.9
    assert repeated_ngrams(POEM) == 0.0
    assert repeated_ngrams(refrain) < Thresholds().max_repeated_ngrams
    assert repeated_ngrams("too short") == 0.0


def test_a_copied_input_is_caught_and_a_rewrite_is_not():
    assert copy_overlap(PLAIN, PLAIN) == pytest.approx(1.0)
    assert copy_overlap(PLAIN.replace(" and", ",\nand"), PLAIN) >= Thresholds().max_copy_overlap  # broken into lines
    assert copy_overlap(POEM, PLAIN) < 0.5


@pytest.mark.parametrize("reply, ended, why", [
    (LOOP, False, "loops"), (LOOP, True, "loops"), (POEM[:40], False, "truncated"), (PLAIN, True, "copied_input")])
def test_looping_truncated_and_copied_replies_are_degenerate(reply, ended, why):
    checks = item_checks(reply, PLAIN, POEM, ended, Thresholds())
    assert checks["degenerate"], checks
    assert {"loops": checks["loops"], "truncated": not checks["ended"], "copied_input": checks["copied_input"]}[why]


def test_a_well_formed_reply_is_not_degenerate_and_the_rates_count_each_kind():
    good = item_checks(POEM, PLAIN, POEM, True, Thresholds())
    assert not good["degenerate"] and good["length_ratio"] == 1.0
    items = [good, item_checks(LOOP, PLAIN, POEM, False, Thresholds()), item_checks(PLAIN, PLAIN, POEM, True, Thresholds())]
    out = rates(items)
    assert out["truncation_rate"] == pytest.approx(1 / 3) and out["repetition_rate"] == pytest.approx(1 / 3)
    assert out["copy_rate"] == pytest.approx(1 / 3) and out["degenerate_rate"] == pytest.approx(2 / 3)
