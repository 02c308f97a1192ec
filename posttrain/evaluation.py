"""Fast, exact GSM8K evaluation: batched greedy generation and scoring.

Speed comes from: batches of similar prompt length (sorted, so little padding), left padding,
the KV cache, and a stopping rule that ends a sequence as soon as it has written its
`#### n` line or EOS (whole batch ends when every sequence did). The stop check is a vocabulary
lookup on the newest token; only sequences that just wrote a newline are decoded.

    posttrain eval models/sft         # or: dvc repro eval_sft
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.config import EvalConfig
from posttrain.gsm8k import gold_answer, has_final_answer_line, score
from posttrain.io import require_safetensors
from posttrain.prompts import digest, prompt_text, protocol


def newline_token_mask(tokenizer) -> torch.Tensor:
    """Bool over the vocabulary: does this token's text contain a newline? Built once per tokenizer."""
    cached = getattr(tokenizer, "_posttrain_newline_mask", None)
    if cached is None:
        pieces = tokenizer.batch_decode([[token_id] for token_id in range(len(tokenizer))])
        cached = torch.tensor(["\n" in piece for piece in pieces], dtype=torch.bool)
        tokenizer._posttrain_newline_mask = cached
    return cached


class AnswerLineStop:
    """transformers StoppingCriteria: per-sequence 'done' once `#### n\\n` has been written."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.newline_tokens = newline_token_mask(tokenizer)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].clamp(max=len(self.newline_tokens) - 1)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in torch.nonzero(self.newline_tokens[last.cpu()]).flatten().tolist():
            text = self.tokenizer.decode(input_ids[row, self.prompt_length:], skip_special_tokens=True)
            done[row] = has_final_answer_line(text)
        return done


@dataclass
class GenerationResult:
    texts: list[str]
    n_tokens: list[int]
    stopped_early: list[bool]
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             sort_by_length: bool = True, early_stop: bool = True, stop_at_eos: bool = True,
             progress: bool = True) -> GenerationResult:
    """Greedy generations for `prompts`, returned in the input order.

    sort_by_length/early_stop/stop_at_eos off gives the straightforward loop the benchmark compares
    against; the text is always cut at the first EOS, so both score the same answers.
    """
    import copy

    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i]) if sort_by_length else list(range(len(prompts)))
    texts, n_tokens, stopped = [""] * len(prompts), [0] * len(prompts), [False] * len(prompts)
    eos_ids = {tokenizer.eos_token_id} | set(
        model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    eos_ids.discard(None)
    generation_config = copy.deepcopy(model.generation_config)
    generation_config.eos_token_id = list(eos_ids) if stop_at_eos else None
    start = time.perf_counter()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = encoded.to(model.device)
        prompt_length = encoded.input_ids.shape[1]
        stopping = StoppingCriteriaList([AnswerLineStop(tokenizer, prompt_length)]) if early_stop else None
        with torch.inference_mode():
            output = model.generate(
                **encoded, generation_config=generation_config, max_new_tokens=max_new_tokens, do_sample=False,
                num_beams=1, stopping_criteria=stopping, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                temperature=None, top_p=None, top_k=None,
            )
        new_tokens = output[:, prompt_length:]
        for row, index in enumerate(batch):
            tokens = new_tokens[row].tolist()
            # Count up to (and including) the first EOS; after it the row holds padding.
            length = next((k + 1 for k, t in enumerate(tokens) if t in eos_ids), len(tokens))
            texts[index] = tokenizer.decode(tokens[:length], skip_special_tokens=True)
            n_tokens[index] = length
            stopped[index] = length < max_new_tokens or has_final_answer_line(texts[index] + "\n")
    return GenerationResult(texts, n_tokens, stopped, time.perf_counter() - start, _peak_rss_mb())


def load_model(model_dir: str | Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"model folder '{model_dir}' not found (or it has no config.json)")
    require_safetensors(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def question_set(records: list[dict], n: int) -> list[dict]:
    return records[:n] if n else records


def evaluate(model, tokenizer, records: list[dict], cfg: EvalConfig, shots: list[dict] | None = None,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """Accuracy and speed metrics plus one record per question."""
    questions = question_set(records, cfg.n_questions)
    prompts = [prompt_text(r["question"], cfg, tokenizer, shots) for r in questions]
    result = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, progress=progress)
    per_question = []
    for record, text, n_tok, stopped in zip(questions, result.texts, result.n_tokens, result.stopped_early):
        gold = gold_answer(record["answer"])
        s = score(text, gold)
        per_question.append({
            "question": record["question"], "generation": text, "gold": gold,
            "prediction_strict": s.strict_prediction, "prediction_flexible": s.flexible_prediction,
            "correct_strict": s.strict_correct, "correct_flexible": s.flexible_correct,
            "n_tokens": n_tok, "stopped_early": stopped,
        })
    return summarize(per_question, result.seconds, cfg, [r["question"] for r in questions]), per_question


def summarize(per_question: list[dict], seconds: float, cfg: EvalConfig, questions: list[str]) -> dict:
    n = len(per_question)
    lengths = [r["n_tokens"] for r in per_question]
    return {
        "n_questions": n,
        "accuracy_strict": sum(r["correct_strict"] for r in per_question) / n,
        "accuracy_flexible": sum(r["correct_flexible"] for r in per_question) / n,
        "early_stop_rate": sum(r["stopped_early"] for r in per_question) / n,
        "gen_length_mean": statistics.fmean(lengths),
        "gen_length_median": float(statistics.median(lengths)),
        "questions_per_s": n / seconds if seconds else 0.0,
        "tokens_per_s": sum(lengths) / seconds if seconds else 0.0,
        "seconds": seconds,
        "protocol": protocol(cfg),
        "protocol_hash": digest(protocol(cfg)),
        "question_set_hash": digest(questions),
    }
