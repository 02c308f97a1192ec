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


def test_shortcut_negatives_are_built_from_the_record_and_the_check_is_loud(capsys):
    from posttrain.reward_models import shortcuts

    user, reference = "the train is late again and nobody knows why at all", "The train is late,\nthe platform cold"
    assert shortcuts.shortcut("copied_input", user, reference) == user
    assert shortcuts.shortcut("input_in_lines", user, reference).count("\n") == 1
    assert shortcuts.shortcut("repeated_line", user, reference) == "\n".join(["The train is late,"] * 8)
    assert shortcuts.shortcut("cut_off", user, reference) == "The train is"
    kinds = [kind for kind, _ in shortcuts.one_per_record([(user, reference)] * 5)]
    assert kinds == ["copied_input", "input_in_lines", "repeated_line", "cut_off", "copied_input"]
    out = shortcuts.check({"copied_input": [True, False], "cut_off": [False, False]}, 0.2, "judge")
    assert out["beats_shortcuts"] is False and out["shortcut_pass_rates"] == {"copied_input": 0.5, "cut_off": 0.0}
    assert "WARNING: the judge passes shortcuts" in capsys.readouterr().out
    assert shortcuts.check({"cut_off": [False]}, 0.2, "judge")["beats_shortcuts"] is True
