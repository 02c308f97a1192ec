"""RL methods side by side on one task: one `dvc exp run` per method on a workspace where the quick
pipeline of that task already ran, so every method starts from the same base and SFT model and is
judged on the same held-out items, same protocol.

    posttrain run -S data.task=style -S eval.n_questions=0     # in a fresh clone (0 = all 80 test items), then:
    python bench/methods.py --workspace /tmp/quickstyle          # -> bench/results/style_methods.json
    posttrain run -S data.task=chat -S eval.n_questions=0      # all 42 chat test items, then:
    python bench/methods.py --workspace /tmp/quickchat

Rows: base and sft (from the workspace's own run), the workspace's own method, then each method's
eval_rl, and against SFT (the promote stage's paired comparison on promote.metric: the difference, its
interval and the test's p, and the share of greedy replies that changed), the gate decision and the
training reward curve. Every method runs its quick-profile budget (params.yaml; docs/methods/index.md):
the budgets are per method, not one wall-clock budget, so each row records its RL seconds. A method run
reruns rl, eval_rl, promote and report, and the reward model when the method needs another kind (ppo:
an LM reward model). Every row starts from the workspace's own params.yaml (`dvc exp run` would leave a
row's -S values for the next). The chat rows grpo_rm and reinforce_rm train on the chat reward model
(rl.rewards mlp_head) instead of cosine_sts; chat's ppo reads its mlp_head reward model, as StrictBot did. Each row's eval records are kept under <workspace>/methods/<row>.jsonl for reading.
The gate of each row compares against whatever was champion when it ran (`gate_baseline` says which).
One run per method; nothing is tuned per method.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # row name -> dvc exp run -S overrides
    "draft": ["rl.method=draft", "rl.draft.variant=project"],
    "draft_notebook": ["rl.method=draft", "rl.draft.variant=draft_notebook", "rl.draft.beta=0.1"],
    "reinforce": ["rl.method=reinforce"],
    "grpo": ["rl.method=grpo"],
    "hybrid_alternate": ["rl.method=hybrid", "rl.hybrid.mode=alternate"],  # one SFT then one PPO step per batch
    "hybrid_curriculum": ["rl.method=hybrid", "rl.hybrid.mode=curriculum"],  # SFT share 0.8 -> 0.2, REINFORCE steps
    "ppo": ["rl.method=ppo", "reward_model.kind=pairwise", "reward_model.max_length=512"],
    # the chat task's reward model (mlp_head) as the reward of GRPO and REINFORCE, with the task's overlong and
    # repetition terms: in place of cosine_sts to the reference (`++` adds a key to the empty rl.rewards)
    "grpo_rm": ["rl.method=grpo", "++rl.rewards.mlp_head=1.0", "++rl.rewards.overlong=1.0",
                "++rl.rewards.repetition=0.5"],
    "reinforce_rm": ["rl.method=reinforce", "++rl.rewards.mlp_head=1.0", "++rl.rewards.overlong=1.0",
                     "++rl.rewards.repetition=0.5"],
}
# chat's PPO reads its own LM reward model, mlp_head (reward_model.kind task), as StrictBot did
TASK_METHODS = {"chat": {"ppo": ["rl.method=ppo"]}}
# issue 17's comparison: the hybrid modes beside the methods they mix, written to bench/results/hybrid.json
HYBRID_ROWS = ("hybrid_alternate", "hybrid_curriculum", "grpo", "reinforce", "ppo")
KEEP = ("content_mean", "judge_p_poem_mean", "judge_margin_mean", "gen_length_mean", "n_questions", "protocol_hash",
        "truncation_rate", "repetition_rate", "copy_rate", "degenerate_rate")
# the issues' names for the style task's figures
ALIASES = {"style": {"style_rate": "accuracy_style", "content": "content_mean", "pass_rate": "accuracy_pass"},
           "chat": {"win_rate": "accuracy_pass", "margin": "judge_margin_mean", "length": "gen_length_mean",
                    "words": "reply_words_mean"}}


def read(ws: Path, name: str) -> dict:
    return json.loads((ws / "reports" / name).read_text())


def row(ws: Path, task: str, eval_name: str, with_gate: bool) -> dict:
    metrics = read(ws, eval_name)
    out = {alias: metrics[key] for alias, key in ALIASES.get(task, {}).items()}
    out |= {k: v for k, v in metrics.items() if k.startswith("accuracy_") or k in KEEP}
    if with_gate:
        gate, rl = read(ws, "promotion.json"), read(ws, "rl.json")
        out |= {"gate": "promoted" if gate.get("promote") else "rejected", "gate_baseline": gate.get("baseline"),
                "gate_reason": gate.get("reason"), "rl_seconds": rl.get("stage_seconds")}
        # against the SFT model it started from, paired on promote.metric (posttrain/release/registry.py)
        out |= {k: v for k, v in gate.items() if k.startswith("rl_vs_sft") or k == "rl_changed_replies"}
        out |= {k: rl[k] for k in ("reward_first", "reward_last", "kl_last", "adapter_update_norm",
                                   "decoded_reward_first", "decoded_reward_last", "bridge_fit_error_first",
                                   "bridge_fit_error_last", "loss/value_avg_first", "loss/value_avg_last",
                                   "val/clipfrac_avg_last") if k in rl}
        # each method's own training reward (draft: the RM through soft tokens; ppo: the pairwise RM's score;
        # grpo, reinforce, hybrid: the task's rewards): a curve per method, not comparable across methods
        log = json.loads((ws / "models/rl/train_log.json").read_text())
        out["reward_curve"] = [round(e["reward"], 4) for e in log if "reward" in e]
    return out


def keep_records(ws: Path, stage: str, row_name: str) -> None:
    """The next `dvc exp run` overwrites reports/eval/rl: keep each row's replies for reading side by side."""
    (ws / "methods").mkdir(exist_ok=True)
    shutil.copy(ws / "reports/eval" / stage / "records.jsonl", ws / "methods" / f"{row_name}.jsonl")


def own_row_name(params: dict) -> str:
    rl = params["rl"]
    if rl["method"] == "hybrid":
        return f"hybrid_{rl['hybrid']['mode']}"
    # a workspace's params.yaml may still hold the variant's old name, `seed` (deprecated)
    notebook = rl["method"] == "draft" and rl["draft"]["variant"] in ("draft_notebook", "seed")
    return "draft_notebook" if notebook else rl["method"]


def write_hybrid(path: Path, task: str, result: dict) -> None:
    if not any(name.startswith("hybrid") for name in result["rows"]):
        return  # hybrid.json compares the hybrid modes with the methods they mix: nothing to compare
    hybrid = json.loads(path.read_text()) if path.exists() else {}
    hybrid.setdefault("tasks", {})[task] = {
        "n_items": result["n_items"], "source": f"bench/methods.py, the runs of bench/results/{task}_methods.json",
        "rows": {k: result["rows"][k] for k in HYBRID_ROWS if k in result["rows"]}}
    path.write_text(json.dumps(hybrid, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="a workspace where a task's quick pipeline ran")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="rows to run, comma-separated, from: %(default)s (the workspace's own method is read, "
                             "not rerun)")
    parser.add_argument("--out", help="default: bench/results/<task>_methods.json")
    args = parser.parse_args()
    ws = Path(args.workspace)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {', '.join(sorted(unknown))}; known: {', '.join(METHODS)}")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    task = params["data"]["task"]
    dvc = str(Path(sys.executable).parent / "dvc")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out_path = Path(args.out or ROOT / f"bench/results/{task}_methods.json")
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result |= {"task": task, "workspace_params": f"quick profile (params.yaml) with data.task={task}"}
    for name in ("reward_model", "judge"):
        if (ws / "reports" / f"{name}.json").exists():
            result[f"{name}_val_accuracy"] = read(ws, f"{name}.json").get("val_accuracy")
    if params["reward_model"]["kind"] in ("classifier", "task") and task == "style":  # the style issue's name for it
        result["classifier_val_accuracy"] = result.get("reward_model_val_accuracy")
    rows = result.setdefault("rows", {})
    rows["base"], rows["sft"] = row(ws, task, "eval_base.json", False), row(ws, task, "eval_sft.json", False)
    result["n_items"] = rows["base"]["n_questions"]
    own = own_row_name(params)
    rows[own] = row(ws, task, "eval_rl.json", True) | {"overrides": [], "workspace_run": True}
    result["metric"] = read(ws, "promotion.json").get("metric")
    keep_records(ws, "sft", "sft")
    keep_records(ws, "rl", own)
    own_params = (ws / "params.yaml").read_text()
    for name in [m for m in args.methods.split(",") if m != own]:
        started = time.time()
        overrides = TASK_METHODS.get(task, {}).get(name, METHODS[name])
        # `dvc exp run` leaves its -S values in the workspace: every row starts from the workspace's own params
        (ws / "params.yaml").write_text(own_params)
        done = subprocess.run([dvc, "exp", "run", "-n", f"{task}-{name}", *sum((["-S", o] for o in overrides), [])],
                              cwd=ws, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
            return done.returncode
        print(f"{name}: {time.time() - started:.0f} s")
        rows[name] = row(ws, task, "eval_rl.json", True) | {"overrides": overrides,
                                                            "exp_run_seconds": round(time.time() - started)}
        keep_records(ws, "rl", name)
        out_path.write_text(json.dumps(result, indent=2) + "\n")  # after every row: a partial run keeps its rows
        write_hybrid(out_path.parent / "hybrid.json", task, result)
    (ws / "params.yaml").write_text(own_params)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    write_hybrid(out_path.parent / "hybrid.json", task, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
