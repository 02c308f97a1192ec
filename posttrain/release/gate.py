"""The promotion gate: a decision on paired evidence, not on a noisy difference of two accuracies.

Candidate and baseline answer the SAME questions under the SAME protocol. On a pass/fail metric, from
the paired per-question outcomes we compute the accuracy difference, a seeded paired-bootstrap
confidence interval for it, and an exact McNemar test on the discordant pairs; the candidate is
promoted only when its accuracy >= threshold AND the interval's lower bound > min_effect. On a per-item
score (a judge margin, P(poem)) the same interval is taken over the paired score differences and the
test is the Wilcoxon signed-rank test: a score has room to move where a pass rate sits at zero.
And whatever the metric says, a candidate that degenerates (truncates, loops, copies its input) more
than its baseline beyond the noise is refused (`harm`).

Pure functions; posttrain/release/registry.py does the registry I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


class GateRefused(ValueError):
    """The two results cannot be compared (different protocol or question set)."""


@dataclass(frozen=True)
class PairedCounts:
    both_right: int
    only_candidate: int
    only_baseline: int
    both_wrong: int

    @property
    def n(self) -> int:
        return self.both_right + self.only_candidate + self.only_baseline + self.both_wrong


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_accuracy: float
    baseline_accuracy: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    mcnemar_p: float
    counts: PairedCounts
    threshold: float
    min_effect: float

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update({f"count_{k}": v for k, v in asdict(self.counts).items()})
        out.pop("counts")
        return out | {"test": "McNemar", "p_value": self.mcnemar_p}


@dataclass(frozen=True)
class ScoreDecision:
    """The gate on a per-item score: paired bootstrap interval of the mean difference, Wilcoxon signed-rank."""

    promote: bool
    reason: str
    candidate_mean: float
    baseline_mean: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    wilcoxon_p: float
    n: int
    n_better: int
    n_worse: int
    min_effect: float

    def as_dict(self) -> dict:
        return asdict(self) | {"test": "Wilcoxon signed-rank", "p_value": self.wilcoxon_p}


def paired_counts(candidate: list[bool], baseline: list[bool]) -> PairedCounts:
    if len(candidate) != len(baseline):
        raise GateRefused(f"paired results differ in length: {len(candidate)} vs {len(baseline)}")
    c, b = np.asarray(candidate, bool), np.asarray(baseline, bool)
    return PairedCounts(int((c & b).sum()), int((c & ~b).sum()), int((~c & b).sum()), int((~c & ~b).sum()))


def bootstrap_interval(candidate: list[bool] | list[float], baseline: list[bool] | list[float], confidence: float,
                       n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile CI of mean(candidate - baseline), resampling questions (pairs stay together)."""
    diffs = np.asarray(candidate, float) - np.asarray(baseline, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(n_resamples, len(diffs)))
    means = diffs[idx].mean(axis=1)
    alpha = 1.0 - confidence
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def mcnemar_exact(only_candidate: int, only_baseline: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the discordant pairs."""
    from scipy.stats import binomtest

    discordant = only_candidate + only_baseline
    if discordant == 0:
        return 1.0
    return float(binomtest(only_candidate, discordant, 0.5, alternative="two-sided").pvalue)


def wilcoxon_p(candidate: list[float], baseline: list[float]) -> float:
    """Two-sided Wilcoxon signed-rank p on the paired differences (zero differences dropped); 1 when all tie."""
    from scipy.stats import wilcoxon

    diffs = np.asarray(candidate, float) - np.asarray(baseline, float)
    if not np.any(diffs):
        return 1.0
    return float(wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)


def decide_scores(candidate: list[float], baseline: list[float], min_effect: float = 0.0, confidence: float = 0.95,
                  n_bootstrap: int = 2000, seed: int = 0, metric: str = "score") -> ScoreDecision:
    if len(candidate) != len(baseline):
        raise GateRefused(f"paired results differ in length: {len(candidate)} vs {len(baseline)}")
    if not candidate:
        raise GateRefused("no paired results to compare")
    c, b = np.asarray(candidate, float), np.asarray(baseline, float)
    difference = float(c.mean() - b.mean())
    low, high = bootstrap_interval(c, b, confidence, n_bootstrap, seed)
    low = min(low, difference)  # never promote a candidate that is not better on these very items
    p_value = wilcoxon_p(c, b)
    evidence = (f"{confidence:.0%} paired bootstrap interval [{low:+.3f}, {high:+.3f}], Wilcoxon signed-rank "
                f"p={p_value:.3g}, n={len(c)}")
    promote = low > min_effect
    reason = (f"{metric} mean gain {difference:+.3f}, {evidence} > {min_effect:+.3f}" if promote else
              f"{metric}: the {confidence:.0%} interval of the mean gain [{low:+.3f}, {high:+.3f}] does not clear the "
              f"minimum effect {min_effect:+.3f} (Wilcoxon signed-rank p={p_value:.3g}, n={len(c)})")
    return ScoreDecision(promote, reason, float(c.mean()), float(b.mean()), difference, low, high, confidence,
                         p_value, len(c), int((c > b).sum()), int((c < b).sum()), min_effect)


def harm(candidate: list[bool], baseline: list[bool], what: str, confidence: float = 0.95, n_bootstrap: int = 2000,
         seed: int = 0) -> str | None:
    """The reason to refuse when the candidate shows a failure (`what`: truncated, loops, ...) on more items
    than its baseline beyond the noise (the paired interval of the increase excludes zero), else None."""
    low, high = bootstrap_interval(candidate, baseline, confidence, n_bootstrap, seed)
    rate_c, rate_b = float(np.mean(candidate)), float(np.mean(baseline))
    if low > 0:
        return (f"it {what} more often than its baseline: {rate_c:.3f} vs {rate_b:.3f} of items, {confidence:.0%} "
                f"interval of the increase [{low:+.3f}, {high:+.3f}]")
    return None


def decide(candidate: list[bool], baseline: list[bool], threshold: float = 0.0, min_effect: float = 0.0,
           confidence: float = 0.95, n_bootstrap: int = 2000, seed: int = 0, metric: str = "accuracy") -> GateDecision:
    counts = paired_counts(candidate, baseline)
    if counts.n == 0:
        raise GateRefused("no paired results to compare")
    cand_acc = (counts.both_right + counts.only_candidate) / counts.n
    base_acc = (counts.both_right + counts.only_baseline) / counts.n
    low, high = bootstrap_interval(candidate, baseline, confidence, n_bootstrap, seed)
    # Never promote a candidate that is not better on these very questions, whatever the resampling says.
    low = min(low, cand_acc - base_acc)
    p_value = mcnemar_exact(counts.only_candidate, counts.only_baseline)
    if cand_acc < threshold:
        promote, reason = False, f"{metric} {cand_acc:.3f} is below the threshold {threshold:.3f}"
    elif not low > min_effect:
        promote, reason = False, (
            f"{metric}: the {confidence:.0%} interval of the gain [{low:+.3f}, {high:+.3f}] does not clear "
            f"the minimum effect {min_effect:+.3f} (McNemar p={p_value:.3g}, n={counts.n})"
        )
    else:
        promote, reason = True, (
            f"{metric} gain {cand_acc - base_acc:+.3f}, {confidence:.0%} interval [{low:+.3f}, {high:+.3f}] > "
            f"{min_effect:+.3f} (McNemar p={p_value:.3g}, n={counts.n})"
        )
    return GateDecision(promote, reason, cand_acc, base_acc, cand_acc - base_acc, low, high, confidence,
                        p_value, counts, threshold, min_effect)


def pair_records(candidate: list[dict], baseline: list[dict], key: str, cast=bool) -> tuple[list, list]:
    """Align two per-question record lists by question text; refuse when the sets differ."""
    base_by_question = {r["question"]: cast(r[key]) for r in baseline}
    missing = [r["question"] for r in candidate if r["question"] not in base_by_question]
    if missing or len(base_by_question) != len(candidate):
        raise GateRefused(
            f"candidate and baseline were evaluated on different questions "
            f"({len(candidate)} vs {len(base_by_question)}, {len(missing)} not shared)"
        )
    return [cast(r[key]) for r in candidate], [base_by_question[r["question"]] for r in candidate]


def check_same_protocol(candidate_metrics: dict, baseline_metrics: dict) -> None:
    for key in ("protocol_hash", "question_set_hash"):
        if candidate_metrics.get(key) != baseline_metrics.get(key):
            what = "protocol" if key == "protocol_hash" else "question set"
            raise GateRefused(
                f"refusing to compare results under a different {what}: "
                f"candidate {key}={candidate_metrics.get(key)} vs baseline {baseline_metrics.get(key)}"
                + (f" (candidate {candidate_metrics.get('protocol')} vs baseline {baseline_metrics.get('protocol')})"
                   if key == "protocol_hash" else "")
            )


def is_score(metrics: dict, metric: str) -> bool:
    """A pass/fail metric has accuracy_<metric> in metrics.json; a per-item score has <metric>_mean."""
    return f"accuracy_{metric}" not in metrics and f"{metric}_mean" in metrics


def summary_key(metrics: dict, metric: str) -> str:
    return f"{metric}_mean" if is_score(metrics, metric) else f"accuracy_{metric}"


def record_key(metrics: dict, metric: str) -> tuple[str, type]:
    """The per-item field the gate pairs and its type: correct_<metric> (bool) or the score itself (float)."""
    return (metric, float) if is_score(metrics, metric) else (f"correct_{metric}", bool)


def paired_decision(candidate: tuple[dict, list[dict]], baseline: tuple[dict, list[dict]], metric: str,
                    threshold: float = 0.0, min_effect: float = 0.0, confidence: float = 0.95,
                    n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """The gate on (metrics, records) pairs: McNemar for a pass/fail metric, Wilcoxon for a score."""
    (candidate_metrics, candidate_records), (baseline_metrics, baseline_records) = candidate, baseline
    check_same_protocol(candidate_metrics, baseline_metrics)
    key, kind = record_key(candidate_metrics, metric)
    values_c, values_b = pair_records(candidate_records, baseline_records, key, kind)
    if kind is bool:
        return decide(values_c, values_b, threshold, min_effect, confidence, n_bootstrap, seed, metric).as_dict()
    return decide_scores(values_c, values_b, min_effect, confidence, n_bootstrap, seed, metric).as_dict()


HARM_FLAGS = {"truncated": "is cut off at the token limit", "loops": "loops", "copied_input": "copies its input"}


def harm_reasons(candidate_records: list[dict], baseline_records: list[dict], confidence: float = 0.95,
                 n_bootstrap: int = 2000, seed: int = 0) -> list[str]:
    """Do no harm: each well-formedness failure the candidate shows more often than its baseline, beyond the
    noise. Records without the per-item checks (older eval reports) give none."""
    if not candidate_records or "ended" not in candidate_records[0] or "ended" not in baseline_records[0]:
        return []
    reasons = []
    for flag, what in HARM_FLAGS.items():
        if flag == "truncated":  # recorded as its opposite, `ended`
            ended_c, ended_b = pair_records(candidate_records, baseline_records, "ended")
            values_c, values_b = [not e for e in ended_c], [not e for e in ended_b]
        else:
            values_c, values_b = pair_records(candidate_records, baseline_records, flag)
        reason = harm(values_c, values_b, what, confidence, n_bootstrap, seed)
        if reason:
            reasons.append(reason)
    return reasons
