import random

import pytest

from posttrain.gate import GateRefused, check_same_protocol, decide, mcnemar_exact, pair_records


def outcomes(n_both, n_cand, n_base, n_none):
    cand = [True] * n_both + [True] * n_cand + [False] * n_base + [False] * n_none
    base = [True] * n_both + [False] * n_cand + [True] * n_base + [False] * n_none
    return cand, base


def test_clear_win_is_promoted():
    d = decide(*outcomes(100, 60, 5, 135), threshold=0.2, n_bootstrap=1000)
    assert d.promote and d.ci_low > 0 and d.mcnemar_p < 1e-6
    assert (d.counts.only_candidate, d.counts.only_baseline) == (60, 5)


def test_clear_loss_is_rejected():
    d = decide(*outcomes(100, 5, 60, 135), n_bootstrap=1000)
    assert not d.promote and d.difference < 0 and d.ci_high < 0


def test_tie_is_rejected():
    d = decide(*outcomes(50, 10, 10, 30), n_bootstrap=1000)
    assert not d.promote and d.difference == 0 and d.mcnemar_p == pytest.approx(1.0)


def test_tiny_sample_gain_is_noise():
    # +2 questions out of 10 looks like +20 points but is not evidence.
    d = decide(*outcomes(2, 2, 0, 6), n_bootstrap=2000)
    assert d.difference == pytest.approx(0.2) and not d.promote and d.ci_low <= 0


def test_threshold_blocks_a_significant_gain():
    d = decide(*outcomes(0, 30, 0, 270), threshold=0.5, n_bootstrap=500)
    assert not d.promote and "threshold" in d.reason


def test_min_effect_is_respected():
    cand, base = outcomes(100, 40, 10, 150)
    assert decide(cand, base, min_effect=0.0, n_bootstrap=1000).promote
    assert not decide(cand, base, min_effect=0.2, n_bootstrap=1000).promote


def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 * 0.5 ** 10)


def test_bootstrap_is_seeded():
    cand, base = outcomes(20, 8, 3, 19)
    assert decide(cand, base, seed=3).ci_low == decide(cand, base, seed=3).ci_low


def test_never_promotes_a_lower_paired_accuracy():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 60)
        cand = [rng.random() < rng.random() for _ in range(n)]
        base = [rng.random() < rng.random() for _ in range(n)]
        d = decide(cand, base, threshold=0.0, min_effect=rng.choice([-0.5, -0.1, 0.0]), n_bootstrap=200,
                   seed=rng.randint(0, 99))
        if sum(cand) <= sum(base):
            assert not d.promote or d.min_effect < 0 and d.ci_low > d.min_effect
        if d.promote and d.min_effect >= 0:
            assert sum(cand) > sum(base)


def test_pairing_refuses_different_questions():
    cand = [{"question": "a", "correct_flexible": True}, {"question": "b", "correct_flexible": False}]
    with pytest.raises(GateRefused, match="different questions"):
        pair_records(cand, [{"question": "a", "correct_flexible": True}], "correct_flexible")
    c, b = pair_records(cand, list(reversed(cand)), "correct_flexible")
    assert c == b == [True, False]


def test_refuses_different_protocols():
    with pytest.raises(GateRefused, match="protocol"):
        check_same_protocol({"protocol_hash": "a", "question_set_hash": "q"}, {"protocol_hash": "b", "question_set_hash": "q"})
    with pytest.raises(GateRefused, match="question set"):
        check_same_protocol({"protocol_hash": "a", "question_set_hash": "q"}, {"protocol_hash": "a", "question_set_hash": "r"})
