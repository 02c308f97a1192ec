"""Rule-based rewards: computed from the text alone (answer extraction, format, length, loops, overlap).

    rewards:
      exact_match: 1.0
      format: 0.2
      rouge_l: {weight: 0.3}                     # rouge-score; bleu is sacrebleu's sentence BLEU / 100
      overlong: {weight: 1.0, max_completion_len: 128}   # DAPO's soft overlong punishment (trl.rewards)
"""

from __future__ import annotations

from posttrain.rewards.common import completion_texts, named, references, registrar
from posttrain.tasks.gsm8k_answers import extract_flexible, extract_strict, numbers_match

FACTORIES: dict = {}  # name -> factory (**options) -> reward function
register = registrar(FACTORIES)


@register("exact_match")
def exact_match_factory():
    def exact_match(completions, answer, **_) -> list[float]:
        """1.0 when the extracted number equals the GSM8K reference numerically."""
        return [float(numbers_match(extract_flexible(t), gold)) for t, gold in zip(completion_texts(completions), answer)]

    return exact_match


@register("format")
def format_factory():
    def format_reward(completions, **_) -> list[float]:
        """1.0 when the completion ends its reasoning with a `#### <number>` line."""
        return [float(extract_strict(t) is not None) for t in completion_texts(completions)]

    return named(format_reward, "format")


@register("overlong")
def overlong_factory(max_completion_len: int = 128, soft_punish_cache: int = 48):
    """DAPO's soft overlong punishment (trl.rewards): 0 up to max_completion_len - soft_punish_cache tokens, then
    down to -1 at max_completion_len, where a sample that never wrote EOS ends. It sees what the evaluation
    fails: a reply cut off at the token limit. Set max_completion_len to rl.training.max_completion_length."""
    from trl.rewards import get_soft_overlong_punishment

    return named(get_soft_overlong_punishment(max_completion_len, soft_punish_cache), "overlong")


@register("repetition")
def repetition_factory(ngram_size: int = 4, max_penalty: float = -1.0):
    """trl.rewards' repetition penalty: max_penalty x the share of repeated token n-grams (a loop nears -1)."""
    from trl.rewards import get_repetition_penalty_reward

    return named(get_repetition_penalty_reward(ngram_size, max_penalty), "repetition")


@register("length_penalty")
def length_penalty_factory(target_chars: int = 200):
    def length_penalty(completions, **_) -> list[float]:
        """-1.0 for an empty completion rising to 0 at `target_chars`: discourages giving up early."""
        return [min(len(t), target_chars) / target_chars - 1.0 for t in completion_texts(completions)]

    return length_penalty

@register("bleu")
def bleu_factory(reference: str = "solution", tokenize: str = "13a", smooth_method: str = "exp",
                 lowercase: bool = False):
    """sacrebleu's sentence BLEU (`sacrebleu.sentence_bleu`: 13a tokens, exp smoothing, effective order) of
    the completion against the `reference` column, divided by 100 so that it lies in [0, 1]."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize=tokenize, smooth_method=smooth_method, lowercase=lowercase, effective_order=True)

    def bleu(completions, **columns) -> list[float]:
        refs = references(columns, reference, "bleu")
        return [metric.sentence_score(t, [ref]).score / 100.0 for t, ref in zip(completion_texts(completions), refs)]

    return bleu


@register("rouge_l")
def rouge_l_factory(reference: str = "solution", use_stemmer: bool = False, variant: str = "rougeL"):
    """rouge-score's ROUGE-L F1 (`variant: rougeLsum` for the summary-level one) against the `reference` column."""
    from rouge_score import rouge_scorer

    if variant not in ("rougeL", "rougeLsum"):
        raise ValueError(f"rl.rewards.rouge_l: variant must be rougeL or rougeLsum, got {variant!r}")
    scorer = rouge_scorer.RougeScorer([variant], use_stemmer=use_stemmer)

    def rouge_l(completions, **columns) -> list[float]:
        refs = references(columns, reference, "rouge_l")
        return [scorer.score(ref, t)[variant].fmeasure for t, ref in zip(completion_texts(completions), refs)]

    return rouge_l
