"""Is a reply well formed? Truncation, repetition and copying, measured per item for every task.

A metric that a looping, truncated or copied reply can pass is a bug in the metric: a judge that calls a
line repeated fourteen times a poem, or a cosine to the reference that a copied input clears. So the
evaluator records for every item

- `ended`: the reply ended by itself (EOS, or the task's stop rule) before the token limit;
- `repeated_ngrams`: rep-n, the share of the reply's word n-grams that repeat an earlier n-gram
  (Welleck et al. 2019, "Neural text generation with unlikelihood training"): 0 for text that never
  repeats itself, close to (k-1)/k for one line said k times;
- `length_ratio`: the reply's words over the reference's;
- `copied_input`: ROUGE-L F1 of the reply against the input at or above `eval.max_copy_overlap`;

and for the text tasks (style, chat) a reply that did not end, loops or copies its input does not pass.
The thresholds are params (eval.*), recorded in those tasks' protocol hash.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    ngram: int = 4  # rep-n's n (words)
    max_repeated_ngrams: float = 0.5  # above: the reply loops (more than half its n-grams are repeats;
    # a refrain line in a four-line poem stays well below, a line repeated to the token limit is near 0.9)
    max_copy_overlap: float = 0.9  # ROUGE-L F1 against the input at or above: the input copied

    @classmethod
    def of(cls, eval_cfg) -> "Thresholds":
        return cls(eval_cfg.repetition_ngram, eval_cfg.max_repeated_ngrams, eval_cfg.max_copy_overlap)

    def as_protocol(self) -> dict:
        return {"degenerate": f"not ended before the token limit, or rep-{self.ngram} > {self.max_repeated_ngrams}, "
                              f"or ROUGE-L F1 to the input >= {self.max_copy_overlap}"}


def words(text: str) -> list[str]:
    return text.lower().split()


def repeated_ngrams(text: str, n: int = 4) -> float:
    """rep-n: 1 - distinct n-grams / n-grams, over the reply's words. A reply shorter than n words has none: 0."""
    tokens = words(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@functools.cache
def rouge_l():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])  # built once: the evaluator calls it for every item


def copy_overlap(reply: str, source: str) -> float:
    """ROUGE-L F1 of the reply against the input (rouge-score's own tokenizer and LCS)."""
    if not reply.strip() or not source.strip():
        return 0.0
    return rouge_l().score(source, reply)["rougeL"].fmeasure


def item_checks(reply: str, source: str, reference: str | None, ended: bool, thresholds: Thresholds) -> dict:
    """The per-item record fields; `degenerate` is what fails a text task's reply."""
    repeated = repeated_ngrams(reply, thresholds.ngram)
    overlap = copy_overlap(reply, source)
    reference_words = len(words(reference)) if reference else 0
    loops = repeated > thresholds.max_repeated_ngrams
    copied = overlap >= thresholds.max_copy_overlap
    return {"ended": bool(ended), "repeated_ngrams": round(repeated, 4), "loops": loops,
            "copy_overlap": round(overlap, 4), "copied_input": copied,
            "length_ratio": round(len(words(reply)) / reference_words, 4) if reference_words else None,
            "degenerate": (not ended) or loops or copied}


def rates(per_item: list[dict]) -> dict:
    """Each model's rates, for its metrics.json, the summary, the MLflow run and the model card."""
    ratios = [r["length_ratio"] for r in per_item if r.get("length_ratio") is not None]
    return {"truncation_rate": statistics.fmean(not r["ended"] for r in per_item),
            "repetition_rate": statistics.fmean(r["loops"] for r in per_item),
            "repeated_ngrams_mean": statistics.fmean(r["repeated_ngrams"] for r in per_item),
            "copy_rate": statistics.fmean(r["copied_input"] for r in per_item),
            "degenerate_rate": statistics.fmean(r["degenerate"] for r in per_item),
            **({"length_ratio_median": float(statistics.median(ratios))} if ratios else {})}
