"""The bf16 protocol against fp32: the evaluator's answers, accuracy and speed, same questions.

    posttrain run                                                    # in a fresh clone (GSM8K), then:
    python bench/sft_variants.py --workspace /tmp/quickgsm8k         # the training loss curves (optional)
    python bench/bf16.py --workspace /tmp/quickgsm8k                 # -> bench/results/bf16.json

For each model (default: the workspace's base and SFT models) the evaluator (posttrain.evaluation.evaluator,
params.yaml's protocol, 100 GSM8K test questions) runs once in fp32 and once in bf16 (`eval.dtype:
bfloat16`: weights, activations and KV cache in bf16). Reported: agreement (share of questions whose
extracted answer is the same in both), the accuracy of each, the paired bootstrap interval of the
accuracy difference (the gate's own, posttrain/release/gate.py) and tokens/s. bf16 becomes the default only
where agreement is at least 0.98 and the interval holds 0 (`bf16_default_rule_met`). The SFT loss
curves of bench/results/sft_variants.json (fp32 and bf16 autocast, same steps) are copied in beside.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import run_record  # bench/run_record.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def evaluate_in(dtype: str, model_dir: Path, records: list[dict], params) -> dict:
    import dataclasses

    from posttrain.evaluation.evaluator import generate, load_model
    from posttrain.tasks.gsm8k_answers import gold_answer, score
    from posttrain.evaluation.prompts import prompt_text

    cfg = dataclasses.replace(params.eval, dtype=dtype)
    model, tokenizer = load_model(model_dir, dtype)
    prompts = [prompt_text(r["question"], cfg, tokenizer) for r in records]
    out = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, streams=cfg.streams)
    scores = [score(text, gold_answer(r["answer"])) for text, r in zip(out.texts, records)]
    return {"answers": [s.flexible_prediction for s in scores], "texts": out.texts,
            "correct": [s.flexible_correct for s in scores],
            "tokens_per_s": round(sum(out.n_tokens) / out.seconds, 1), "seconds": round(out.seconds, 1)}


def compare(model_dir: Path, records: list[dict], params) -> dict:
    from posttrain.release.gate import bootstrap_interval

    fp32, bf16 = (evaluate_in(dtype, model_dir, records, params) for dtype in ("float32", "bfloat16"))
    n = len(records)
    agreement = sum(a == b for a, b in zip(fp32["answers"], bf16["answers"])) / n
    low, high = bootstrap_interval(bf16["correct"], fp32["correct"], params.promote.confidence,
                                   params.promote.n_bootstrap, params.seed)
    return {
        "model": str(model_dir), "n_questions": n,
        "agreement": round(agreement, 3),
        "same_text": round(sum(a == b for a, b in zip(fp32["texts"], bf16["texts"])) / n, 3),
        "accuracy_fp32": sum(fp32["correct"]) / n, "accuracy_bf16": sum(bf16["correct"]) / n,
        "accuracy_difference_interval": [round(low, 3), round(high, 3)],
        "tokens_per_s_fp32": fp32["tokens_per_s"], "tokens_per_s_bf16": bf16["tokens_per_s"],
        "seconds_fp32": fp32["seconds"], "seconds_bf16": bf16["seconds"],
        "bf16_default_rule_met": agreement >= 0.98 and low <= 0.0 <= high,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, type=Path, help="a folder where the quick GSM8K pipeline ran")
    parser.add_argument("--models", default="models/base,models/sft",
                        help="comma-separated model folders in the workspace (default: %(default)s)")
    parser.add_argument("--n", type=int, default=100, help="GSM8K test questions (default: %(default)s)")
    parser.add_argument("--note", default="", help="what else was running, how many runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bf16.json", help="results file")
    args = parser.parse_args()

    from posttrain.config.loader import load_params
    from posttrain.io import read_json, read_jsonl, write_json
    from posttrain.release.modelstore import is_model_folder

    models = [args.workspace / name.strip() for name in args.models.split(",")]
    missing = [str(m) for m in models if not is_model_folder(m)]
    if missing:
        parser.error(f"--models: no model folder at {', '.join(missing)} (run the quick GSM8K pipeline there first)")
    params = load_params(ROOT / "params.yaml")
    records = read_jsonl(ROOT / "data" / "gsm8k" / "test.jsonl")[: args.n]
    rows = []
    for model_dir in models:
        rows.append(compare(model_dir, records, params))
        print(rows[-1], file=sys.stderr)
    report = {key: rows[0][key] for key in ("agreement", "accuracy_fp32", "accuracy_bf16",
                                            "tokens_per_s_fp32", "tokens_per_s_bf16")}
    variants = ROOT / "bench" / "results" / "sft_variants.json"
    training = {}
    if variants.exists():
        rows_sft = read_json(variants)["variants"]
        training = {name: rows_sft[name] for name in ("fp32", "bf16") if name in rows_sft}
    write_json(args.out, report | {
        "models": rows, "sft_training_fp32_vs_bf16_autocast": training,
        "protocol": {"decoding": "greedy", "max_new_tokens": params.eval.max_new_tokens,
                     "batch_size": params.eval.batch_size, "extraction": "flexible"},
    } | run_record.conditions(args.note))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
