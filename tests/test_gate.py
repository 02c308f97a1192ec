import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.release.gate import GateRefused, bootstrap_interval, check_same_protocol, decide, mcnemar_exact, pair_records


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


@st.composite
def paired_outcomes(draw, max_n=60):
    """Paired per-question outcomes: any lists, plus ties and near-ties on few questions, where a
    bootstrap from a handful of resamples can put its lower bound above zero on its own."""
    n = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(["any", "tie", "one_behind"]))
    cand = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if kind == "any":
        base = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    else:  # the baseline holds the same number of right answers (or one more), on shuffled questions
        base = draw(st.permutations(cand))
        if kind == "one_behind" and not all(base):
            base = list(base)
            base[base.index(False)] = True
    return list(cand), list(base)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(pair=paired_outcomes(), min_effect=st.floats(0.0, 0.5), threshold=st.floats(0.0, 1.0),
       confidence=st.floats(0.5, 0.99), n_bootstrap=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_never_promotes_a_lower_or_equal_paired_accuracy(pair, min_effect, threshold, confidence, n_bootstrap, seed):
    cand, base = pair
    d = decide(cand, base, threshold=threshold, min_effect=min_effect, confidence=confidence,
               n_bootstrap=n_bootstrap, seed=seed)
    if sum(cand) <= sum(base):
        assert not d.promote, (sum(cand), sum(base), d.reason)
    if d.promote:
        assert d.ci_low > min_effect >= 0 and d.candidate_accuracy >= threshold


@pytest.mark.parametrize("cand,base,n_bootstrap,seed", [
    ([True, False], [False, True], 1, 11), ([True, False], [False, True], 2, 2), ([True, False], [False, True], 3, 30),
    ([True, False, False], [False, True, False], 3, 3),
])
def test_a_tie_is_not_promoted_even_when_the_bootstrap_says_so(cand, base, n_bootstrap, seed):
    # One question each way, so the observed gain is 0; these few resamples all drew the candidate's win.
    assert bootstrap_interval(cand, base, 0.95, n_bootstrap, seed)[0] > 0  # the interval alone would promote
    d = decide(cand, base, n_bootstrap=n_bootstrap, seed=seed)
    assert not d.promote and d.ci_low <= 0 and d.difference == 0


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
