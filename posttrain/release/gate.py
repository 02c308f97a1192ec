"""The promotion gate: a decision on paired evidence, not on a noisy difference of two accuracies.

Candidate and baseline answer the SAME questions under the SAME protocol. From the paired
per-question outcomes we compute the accuracy difference, a seeded paired-bootstrap confidence
interval for it, and an exact McNemar test on the discordant pairs. The candidate is promoted only
when its accuracy >= threshold AND the interval's lower bound > min_effect.

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
        return out


def paired_counts(candidate: list[bool], baseline: list[bool]) -> PairedCounts:
    if len(candidate) != len(baseline):
        raise GateRefused(f"paired results differ in length: {len(candidate)} vs {len(baseline)}")
    c, b = np.asarray(candidate, bool), np.asarray(baseline, bool)
    return PairedCounts(int((c & b).sum()), int((c & ~b).sum()), int((~c & b).sum()), int((~c & ~b).sum()))


def bootstrap_interval(candidate: list[bool], baseline: list[bool], confidence: float, n_resamples: int,
                       seed: int) -> tuple[float, float]:
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


def decide(candidate: list[bool], baseline: list[bool], threshold: float = 0.0, min_effect: float = 0.0,
           confidence: float = 0.95, n_bootstrap: int = 2000, seed: int = 0) -> GateDecision:
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
        promote, reason = False, f"accuracy {cand_acc:.3f} is below the threshold {threshold:.3f}"
    elif not low > min_effect:
        promote, reason = False, (
            f"the {confidence:.0%} interval of the gain [{low:+.3f}, {high:+.3f}] does not clear "
            f"the minimum effect {min_effect:+.3f} (McNemar p={p_value:.3g}, n={counts.n})"
        )
    else:
        promote, reason = True, (
            f"gain {cand_acc - base_acc:+.3f}, {confidence:.0%} interval [{low:+.3f}, {high:+.3f}] > {min_effect:+.3f} "
            f"(McNemar p={p_value:.3g}, n={counts.n})"
        )
    return GateDecision(promote, reason, cand_acc, base_acc, cand_acc - base_acc, low, high, confidence,
                        p_value, counts, threshold, min_effect)


def pair_records(candidate: list[dict], baseline: list[dict], key: str) -> tuple[list[bool], list[bool]]:
    """Align two per-question record lists by question text; refuse when the sets differ."""
    base_by_question = {r["question"]: bool(r[key]) for r in baseline}
    missing = [r["question"] for r in candidate if r["question"] not in base_by_question]
    if missing or len(base_by_question) != len(candidate):
        raise GateRefused(
            f"candidate and baseline were evaluated on different questions "
            f"({len(candidate)} vs {len(base_by_question)}, {len(missing)} not shared)"
        )
    return [bool(r[key]) for r in candidate], [base_by_question[r["question"]] for r in candidate]


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
