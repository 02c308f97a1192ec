"""Hyperparameter sweeps with `dvc exp run -S`: only the affected stages rerun, `dvc exp show` lists accuracies."""

import json
import subprocess

import pytest

from conftest import run_in
from test_pipeline import DVC


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_exp_run_sweeps_rl_methods_and_exp_show_lists_accuracy(workspace_copy):
    ws = workspace_copy
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=ws, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=ws, check=True, capture_output=True)

    skipped_rm = (ws / "models/reward_model/skipped.json").read_bytes()  # the tiny grpo run reads no reward model
    sweep = run_in(ws, [DVC, "exp", "run", "-n", "hybrid-curriculum", "-S", "rl.method=hybrid",
                        "-S", "rl.hybrid.mode=curriculum",
                        "-S", "rl.hybrid.sft_fraction_start=1.0", "-S", "rl.hybrid.sft_fraction_end=0.0"])
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    ran = {line.split("'")[1] for line in sweep.stdout.splitlines() if line.startswith("Running stage")}
    # the sweep touches rl params only: data, base, SFT and the base/SFT evals are reused. The reward model
    # stage reads rl.method (to know whether it is needed), so DVC reruns it; hybrid does not need it either,
    # so it skips again and writes the same output
    assert {"rl", "eval_rl", "promote"} <= ran and not ran & {"prepare", "base", "sft", "merge",
                                                              "eval_base", "eval_sft"}, ran
    assert (ws / "models/reward_model/skipped.json").read_bytes() == skipped_rm

    shown = run_in(ws, [DVC, "exp", "show", "--json"])
    assert shown.returncode == 0, shown.stderr
    text = json.dumps(json.loads(shown.stdout))
    assert "hybrid-curriculum" in text and "reports/eval_rl.json" in text and "accuracy_flexible" in text
    log = json.loads((ws / "models/rl/train_log.json").read_text())
    assert [e["kind"] for e in log][0] == "sft"
