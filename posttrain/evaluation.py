"""Fast, exact GSM8K evaluation: batched greedy generation and scoring.

Generation is greedy continuous batching on a preallocated KV cache (posttrain/decoding.py): rows
leave the batch as soon as they are done (EOS, or their `#### n` line is written, after which the
answer cannot change), waiting prompts take their place, prompts enter shortest first, and the prompt
prefix every row shares is computed once. The stop check is a vocabulary lookup on the newest token;
only rows that just wrote a newline are decoded. On a CPU, two such batches decode side by side in
threads (`eval.streams`). `generate_straightforward` is the plain
transformers loop the benchmark and the tests hold it to.

    posttrain eval models/sft         # or: dvc repro eval_sft
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.config import EvalConfig
from posttrain.gsm8k import extract_strict, gold_answer, has_final_answer_line, score
from posttrain.io import DataError, require_safetensors, where
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
    """Stop rule: a row is done once its text holds the `#### n` line (its answer cannot change after).

    The newline test is a vocabulary lookup on each row's newest token, so only rows that just ended
    a line are decoded.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.newline_tokens = newline_token_mask(tokenizer)

    def __call__(self, newest: torch.LongTensor, generated_so_far) -> torch.BoolTensor:
        """`newest`: each row's latest token; `generated_so_far(row)`: that row's new tokens."""
        done = torch.zeros(newest.shape[0], dtype=torch.bool, device=newest.device)
        newline = self.newline_tokens[newest.cpu().clamp(max=len(self.newline_tokens) - 1)]
        for row in torch.nonzero(newline).flatten().tolist():
            done[row] = has_final_answer_line(self.tokenizer.decode(generated_so_far(row), skip_special_tokens=True))
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


def eos_token_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = {tokenizer.eos_token_id} | set(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return ids


def auto_streams(model, batch_size: int) -> int:
    """Decode streams for `eval.streams: 0`: one on a GPU; on a CPU one per 32 rows of the batch,
    at most one per torch thread."""
    if model.device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), batch_size // 32))


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             early_stop: bool = True, streams: int = 0, progress: bool = True) -> GenerationResult:
    """The evaluator's greedy generations for `prompts`, returned in the input order.

    Continuous batching (posttrain/decoding.py): rows leave the batch at EOS or, with `early_stop`,
    after their `#### n` line (the answer is fixed by then), and waiting prompts take their place.
    `streams` batches of batch_size / streams rows decode side by side (0: `auto_streams`).
    """
    from tqdm.auto import tqdm

    from posttrain import decoding

    if not decoding.supports(model):
        print(f"warning: {type(model).__name__} has sliding-window or recurrent cache layers: evaluating with "
              "transformers' generate instead of continuous batching (slower, same answers)", file=sys.stderr)
        return generate_straightforward(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_eos=True,
                                        progress=progress)
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="generating", unit="question", disable=not progress) as bar:
        tokens, lengths = decoding.parallel_greedy_generate(
            model, tokenizer, prompts, max_new_tokens, batch_size, eos_token_ids(model, tokenizer),
            stop_rule_for=lambda stream_tokenizer: AnswerLineStop(stream_tokenizer) if early_stop else None,
            streams=streams or auto_streams(model, batch_size), on_done=bar.update,
        )
    texts = [tokenizer.decode(row[:length], skip_special_tokens=True) for row, length in zip(tokens.tolist(), lengths)]
    stopped = [length < max_new_tokens or has_final_answer_line(text + "\n") for text, length in zip(texts, lengths)]
    return GenerationResult(texts, lengths, stopped, time.perf_counter() - start, _peak_rss_mb())


def generate_straightforward(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                             stop_at_eos: bool = False, progress: bool = True) -> GenerationResult:
    """The reference the evaluator is checked and timed against: transformers' `generate` on batches in
    dataset order, every batch running the full max_new_tokens (or, with `stop_at_eos`, until every row
    wrote EOS). Text is cut at the first EOS, so the answers are comparable with `generate`'s.
    """
    import copy

    from tqdm.auto import tqdm

    from posttrain.decoding import left_padding

    left_padding(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    generation_config = copy.deepcopy(model.generation_config)
    generation_config.eos_token_id = sorted(eos_ids) if stop_at_eos else None
    texts, n_tokens, stopped = [], [], []
    start = time.perf_counter()
    for first in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch", disable=not progress):
        encoded = tokenizer(prompts[first:first + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            output = model.generate(
                **encoded, generation_config=generation_config, max_new_tokens=max_new_tokens, do_sample=False,
                num_beams=1, pad_token_id=tokenizer.pad_token_id, use_cache=True, temperature=None, top_p=None, top_k=None,
            )
        for row in output[:, encoded.input_ids.shape[1]:].tolist():
            length = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
            texts.append(tokenizer.decode(row[:length], skip_special_tokens=True))
            n_tokens.append(length)
            stopped.append(length < max_new_tokens)
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


QUESTION_FIELDS = {"question": str, "answer": str}


def check_questions(records: list[dict]) -> None:
    """Refuse (DataError naming file:line, as read_jsonl keeps it) a record without a `question` string or
    an `answer` string that ends in `#### <number>`."""
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{where(records, index)}: expected a JSON object, got {type(record).__name__}")
        for key, kind in QUESTION_FIELDS.items():
            if key not in record:
                raise DataError(f"{where(records, index)}: missing field '{key}'")
            if not isinstance(record[key], kind):
                raise DataError(f"{where(records, index)}: field '{key}' must be {kind.__name__}, "
                                f"got {type(record[key]).__name__}")
        if extract_strict(record["answer"]) is None:
            raise DataError(f"{where(records, index)}: field 'answer' has no final '#### <number>' line "
                            f"(ends {record['answer'][-40:]!r})")


def evaluate(model, tokenizer, records: list[dict], cfg: EvalConfig, shots: list[dict] | None = None,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """Accuracy and speed metrics plus one record per question."""
    questions = question_set(records, cfg.n_questions)
    check_questions(questions)  # before any generation: bad input fails in one line, at once
    check_questions(shots or [])
    prompts = [prompt_text(r["question"], cfg, tokenizer, shots) for r in questions]
    result = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, streams=cfg.streams,
                      progress=progress)
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
