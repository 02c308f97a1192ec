"""The chat task, base -> SFT -> PPO, read from a workspace where the quick chat pipeline ran:

    posttrain run -S data.task=chat -S rl.method=ppo                                 # in the workspace
    python bench/chat_methods.py --workspace /tmp/quickchat --wall-seconds 479         # -> bench/results/chat_pipeline.json

Per model: the judge's win rate (share of held-out items whose greedy reply the judge scores above the
reference output: the gate's `pass`), the mean judge margin, the mean reply length in tokens and in words;
for the PPO row also the gate's decision. Nothing is run here: the numbers are the workspace's reports.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import run_record  # bench/run_record.py

ROOT = Path(__file__).resolve().parents[1]


def read(ws: Path, *parts: str) -> dict:
    return json.loads(ws.joinpath(*parts).read_text())


def row(ws: Path, model: str) -> dict:
    metrics = read(ws, "reports", "eval", model, "metrics.json")
    return {"win_rate": metrics["accuracy_pass"], "margin": metrics["judge_margin_mean"],
            "length": metrics["gen_length_mean"], "words": metrics["reply_words_mean"],
            "n_items": metrics["n_questions"], "protocol_hash": metrics["protocol_hash"]}


def collect(ws: Path) -> dict:
    rm, judge = read(ws, "models", "reward_model", "eval.json"), read(ws, "models", "judge", "eval.json")
    gate = read(ws, "reports", "promotion.json")
    rows = {"base": row(ws, "base"), "sft": row(ws, "sft"), "ppo": row(ws, "rl")}
    rows["ppo"] |= {"gate": "promoted" if gate.get("promote") else "rejected", "gate_reason": gate.get("reason")}
    rl = read(ws, "reports", "rl.json")
    rows["ppo"] |= {k: rl[k] for k in ("reward_first", "reward_last", "kl_first", "kl_last") if k in rl}
    stages = {}
    for path in sorted((ws / "reports").glob("*.json")):
        seconds = json.loads(path.read_text()).get("stage_seconds") if path.name != "promotion.json" else None
        if seconds is not None:
            stages[path.stem] = round(seconds, 1)
    return {"task": "chat", "n_items": rows["base"]["n_items"],
            "rm_val_pairwise_accuracy": rm["eval_accuracy"], "rm_val_pairs": rm["n_val_pairs"],
            "rm_beats_chance": rm["beats_chance"], "judge_val_pairwise_accuracy": judge["eval_accuracy"],
            "judge_val_pairs": judge["n_val_pairs"], "judge_beats_chance": judge["beats_chance"],
            "rows": rows, "stage_seconds": stages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="where the quick chat pipeline ran")
    run_record.add_arguments(parser, ROOT / "bench/results/chat_pipeline.json")
    args = parser.parse_args()
    result = collect(Path(args.workspace))
    result |= {"command": "posttrain run -S data.task=chat -S rl.method=ppo (quick profile; reward_model.kind task = mlp_head)"}
    return run_record.write(result, args)


if __name__ == "__main__":
    raise SystemExit(main())
