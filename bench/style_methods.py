"""The style task, RL methods side by side: one `dvc exp run` per method on a workspace where the
quick style pipeline already ran (`posttrain run -S data.task=style -S rl.method=draft`), so every
method starts from the same base and SFT model and is judged on the same held-out items, same protocol.

    python bench/style_methods.py --workspace /tmp/quickstyle     # -> bench/results/style_methods.json

Rows: base and sft (from the workspace's own run), then each method's eval_rl, gate decision and
training reward curve; the hybrid modes and the methods they mix also go to bench/results/hybrid.json.
A method run reruns rl, eval_rl, promote and report, and the reward model (its stage reads rl.method
to know whether it is needed; ppo also changes its kind to pairwise). The gate of each row compares against whatever was champion when it ran (the base
model at first): its `baseline` field says which. One run per method; nothing is tuned per method.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # row name -> dvc exp run -S overrides
    "draft": [],  # the workspace's own run (rl.method=draft, variant project)
    "draft_seed": ["rl.method=draft", "rl.draft.variant=seed", "rl.draft.beta=0.1"],
    "reinforce": ["rl.method=reinforce"],
    "grpo": ["rl.method=grpo"],
    "hybrid_alternate": ["rl.method=hybrid", "rl.hybrid.mode=alternate"],  # one SFT then one PPO step per batch
    "hybrid_curriculum": ["rl.method=hybrid", "rl.hybrid.mode=curriculum"],  # SFT share 0.8 -> 0.2, REINFORCE steps
    # last: it changes the reward model's kind, which later rows would inherit from the workspace
    "ppo": ["rl.method=ppo", "reward_model.kind=pairwise", "reward_model.max_length=512"],
}
# issue 17's comparison: the hybrid modes beside the methods they mix, written to bench/results/hybrid.json
HYBRID_ROWS = ("hybrid_alternate", "hybrid_curriculum", "grpo", "reinforce", "ppo")
KEEP = ("accuracy_pass", "accuracy_style", "accuracy_content", "content_mean", "judge_p_poem_mean", "gen_length_mean",
        "n_questions", "protocol_hash")


def read(ws: Path, name: str) -> dict:
    return json.loads((ws / "reports" / name).read_text())


def row(ws: Path, eval_name: str, with_gate: bool) -> dict:
    metrics = read(ws, eval_name)
    out = {"style_rate": metrics["accuracy_style"], "content": metrics["content_mean"], "pass_rate": metrics["accuracy_pass"],
           **{k: metrics[k] for k in KEEP if k in metrics}}
    if with_gate:
        gate = read(ws, "promotion.json")
        out |= {"gate": "promoted" if gate.get("promote") else "rejected", "gate_baseline": gate.get("baseline"),
                "gate_reason": gate.get("reason"), "rl_seconds": read(ws, "rl.json").get("stage_seconds")}
        rl = read(ws, "rl.json")
        out |= {k: rl[k] for k in ("reward_first", "reward_last", "kl_last") if k in rl}
        # each method's own training reward (draft: the RM through soft tokens; ppo: the pairwise RM's score;
        # grpo, reinforce, hybrid: the task's rewards): a curve per method, not comparable across methods
        log = json.loads((ws / "models/rl/train_log.json").read_text())
        out["reward_curve"] = [round(e["reward"], 4) for e in log if "reward" in e]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="a workspace where the quick style pipeline ran")
    parser.add_argument("--methods", default=",".join(METHODS), help="rows to run, comma-separated (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/style_methods.json"), help="default: %(default)s")
    args = parser.parse_args()
    ws = Path(args.workspace)
    dvc = str(Path(sys.executable).parent / "dvc")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result |= {"task": "style", "workspace_params": "quick profile (params.yaml) with data.task=style"}
    result["classifier_val_accuracy"] = read(ws, "reward_model.json").get("val_accuracy")
    result["judge_val_accuracy"] = read(ws, "judge.json").get("val_accuracy")
    rows = result.setdefault("rows", {})
    rows["base"], rows["sft"] = row(ws, "eval_base.json", False), row(ws, "eval_sft.json", False)
    result["n_items"] = rows["base"]["n_questions"]
    for name in args.methods.split(","):
        if METHODS[name]:
            started = time.time()
            done = subprocess.run([dvc, "exp", "run", "-n", f"style-{name}", *sum((["-S", o] for o in METHODS[name]), [])],
                                  cwd=ws, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
                return done.returncode
            print(f"{name}: {time.time() - started:.0f} s")
        rows[name] = row(ws, "eval_rl.json", True) | {"overrides": METHODS[name]}
        if METHODS[name]:
            rows[name]["exp_run_seconds"] = round(time.time() - started)  # the whole `dvc exp run`
        out_path.write_text(json.dumps(result, indent=2) + "\n")  # after every row: a partial run keeps its rows
        hybrid = {"task": "style", "n_items": result["n_items"], "source": "bench/style_methods.py, same runs",
                  "rows": {k: rows[k] for k in HYBRID_ROWS if k in rows}}
        (out_path.parent / "hybrid.json").write_text(json.dumps(hybrid, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
