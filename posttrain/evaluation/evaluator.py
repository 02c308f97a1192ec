"""Fast, exact evaluation: batched greedy generation, scored per item by the task (posttrain/tasks/).

Generation is greedy continuous batching on a preallocated KV cache (posttrain/evaluation/decoding.py): rows
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

from posttrain.config.schema import EvalConfig
from posttrain.tasks.gsm8k_answers import has_final_answer_line
from posttrain.evaluation import degeneration
from posttrain.evaluation.prompts import digest, prompt_text, protocol
from posttrain.tasks.gsm8k import AnswerLineStop  # the default stop rule (GSM8K's)


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
             early_stop: bool = True, streams: int = 0, progress: bool = True,
             stop_rule_for=AnswerLineStop) -> GenerationResult:
    """The evaluator's greedy generations for `prompts`, returned in the input order.

    Continuous batching (posttrain/evaluation/decoding.py): rows leave the batch at EOS or, with `early_stop`,
    after their `#### n` line (the answer is fixed by then), and waiting prompts take their place.
    `streams` batches of batch_size / streams rows decode side by side (0: `auto_streams`).
    """
    from tqdm.auto import tqdm

    from posttrain.evaluation import decoding

    if not decoding.supports(model):
        print(f"warning: {type(model).__name__} has sliding-window or recurrent cache layers: evaluating with "
              "transformers' generate instead of continuous batching (slower, same answers)", file=sys.stderr)
        return generate_straightforward(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_eos=True,
                                        progress=progress)
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="generating", unit="question", disable=not progress) as bar:
        tokens, lengths = decoding.parallel_greedy_generate(
            model, tokenizer, prompts, max_new_tokens, batch_size, eos_token_ids(model, tokenizer),
            stop_rule_for=lambda stream_tokenizer: stop_rule_for(stream_tokenizer) if early_stop else None,
            streams=streams or auto_streams(model, batch_size), on_done=bar.update,
        )
    texts = [tokenizer.decode(row[:length], skip_special_tokens=True) for row, length in zip(tokens.tolist(), lengths)]
    # A row that used every token still counts as stopped when the stop rule would have ended it there.
    answer_line_rule = isinstance(stop_rule_for(tokenizer), AnswerLineStop)
    stopped = [length < max_new_tokens or (answer_line_rule and has_final_answer_line(text + "\n"))
               for text, length in zip(texts, lengths)]
    return GenerationResult(texts, lengths, stopped, time.perf_counter() - start, _peak_rss_mb())


def generate_straightforward(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                             stop_at_eos: bool = False, progress: bool = True) -> GenerationResult:
    """The reference the evaluator is checked and timed against: transformers' `generate` on batches in
    dataset order, every batch running the full max_new_tokens (or, with `stop_at_eos`, until every row
    wrote EOS). Text is cut at the first EOS, so the answers are comparable with `generate`'s.
    """
    import copy

    from tqdm.auto import tqdm

    from posttrain.evaluation.decoding import left_padding

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
    """A model folder (plain, or an adapter rebuilt on the model it adapts) or a registered version
    (models:/<name>/<version>, models:/<name>@<alias>: downloaded once, rebuilt the same way)."""
    from transformers import AutoTokenizer

    from posttrain.release import modelstore

    if str(model_dir).startswith("models:/"):
        model_dir = modelstore.fetch_registered(str(model_dir))
    if not modelstore.is_model_folder(model_dir):
        raise FileNotFoundError(f"model folder '{model_dir}' not found (or it has no config.json)")
    model = modelstore.load_causal_lm(model_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def question_set(records: list[dict], n: int) -> list[dict]:
    return records[:n] if n else records


def evaluate(model, tokenizer, records: list[dict], cfg: EvalConfig, shots: list[dict] | None = None,
             progress: bool = True, task=None, context=None, params=None) -> tuple[dict, list[dict]]:
    """Per-item pass/fail (the task's METRICS), speed metrics, and one record per item.

    `task` is a posttrain/tasks module (default GSM8K); `context` what its score() needs loaded (the
    style judge), from task.make_context."""
    from posttrain.tasks import gsm8k

    task = task or gsm8k
    items = question_set(records, cfg.n_questions)
    task.check_eval_records(items)  # before any generation: bad input fails in one line, at once
    task.check_eval_records(shots or [])
    shot_pairs = [task.prompt_and_reference(shot) for shot in shots or []]
    users = [task.prompt_and_reference(r)[0] for r in items]
    prompts = [prompt_text(user, cfg, tokenizer, shot_pairs) for user in users]
    result = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, streams=cfg.streams,
                      progress=progress, stop_rule_for=task.stop_rule)
    per_item = task.score(items, result.texts, context, params)
    for record, n_tok, stopped in zip(per_item, result.n_tokens, result.stopped_early):
        record |= {"n_tokens": n_tok, "stopped_early": stopped}
    check_well_formed(per_item, items, task, cfg)
    metrics = (summarize(per_item, result.seconds, cfg, users, task.METRICS, task_protocol(task, params, cfg))
               | task.summary(per_item)
               | degeneration.rates(per_item))
    return metrics, per_item


def task_protocol(task, params, cfg: EvalConfig) -> dict:
    """What the task adds to the protocol: its judge and thresholds, and for a free-text task the
    well-formedness thresholds that fail a reply (GSM8K adds nothing: its hash stays the one pinned)."""
    added = task.protocol(params) if params is not None else {}
    if task.FAILS_DEGENERATE:
        added |= degeneration.Thresholds.of(cfg).as_protocol()
    return added


def check_well_formed(per_item: list[dict], items: list[dict], task, cfg: EvalConfig) -> list[dict]:
    """Add the per-item well-formedness checks (posttrain/evaluation/degeneration.py) to the task's records;
    on a free-text task a reply that did not end, loops or copies its input fails every metric."""
    thresholds = degeneration.Thresholds.of(cfg)
    for record, item in zip(per_item, items):
        user, reference = task.prompt_and_reference(item)
        record |= degeneration.item_checks(record["generation"], user, reference, record["stopped_early"], thresholds)
        if task.FAILS_DEGENERATE and record["degenerate"]:  # whatever the judge said
            record |= {f"correct_{m}": False for m in task.METRICS}
    return per_item


def summarize(per_question: list[dict], seconds: float, cfg: EvalConfig, questions: list[str],
              metrics: tuple[str, ...] = ("strict", "flexible"), task_protocol: dict | None = None) -> dict:
    n = len(per_question)
    lengths = [r["n_tokens"] for r in per_question]
    return {
        "n_questions": n,
        **{f"accuracy_{m}": sum(r[f"correct_{m}"] for r in per_question) / n for m in metrics},
        "early_stop_rate": sum(r["stopped_early"] for r in per_question) / n,
        "gen_length_mean": statistics.fmean(lengths),
        "gen_length_median": float(statistics.median(lengths)),
        "questions_per_s": n / seconds if seconds else 0.0,
        "tokens_per_s": sum(lengths) / seconds if seconds else 0.0,
        "seconds": seconds,
        "protocol": protocol(cfg, task_protocol),
        "protocol_hash": digest(protocol(cfg, task_protocol)),
        "question_set_hash": digest(questions),
    }


def evaluate_folder(params, model_dir: str | Path, test_path: str | Path, train_path: str | Path,
                    out_dir: str | Path, judge_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Greedy evaluation of one model folder on the task's held-out items; writes out_dir/metrics.json and
    records.jsonl (one line per item) atomically. What the eval stages and `posttrain compare` run."""
    from posttrain.io import atomic_path, read_jsonl, write_json, write_jsonl
    from posttrain.tasks import registry

    cfg = params.eval
    task = registry.get(params.data.task)
    # Malformed items fail here in one line naming the file and line, before the model is loaded.
    questions = read_jsonl(test_path)
    task.check_eval_records(questions)
    shots = read_jsonl(train_path)[: cfg.shots] if cfg.shots else None
    context = task.make_context(params, judge_dir)
    model, tokenizer = load_model(model_dir, cfg.dtype)
    metrics, records = evaluate(model, tokenizer, questions, cfg, shots, progress=progress, task=task,
                                context=context, params=params)
    metrics["model"] = str(model_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_jsonl(tmp / "records.jsonl", records)
        write_json(tmp / "metrics.json", metrics)
    return {"metrics": Path(out_dir) / "metrics.json", "records": Path(out_dir) / "records.jsonl"}
