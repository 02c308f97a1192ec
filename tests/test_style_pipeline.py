"""The style task end to end: `dvc repro` of the tiny pipeline on the shipped style data, the DRaFT notebook's variant,
the judge stage, per-item pass/fail and the gate (slow: trains tiny models)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_workspace, run_in


@pytest.mark.slow
@pytest.mark.integration
def test_style_run_through_dvc_repro_and_the_gate(tmp_path):
    from posttrain.release import gate
    from posttrain.io import read_jsonl

    ws = make_workspace(tmp_path / "ws", [f"data.style.source={ROOT / 'data' / 'style'}", "data.task=style",
                                          "rl.method=draft", "rl.draft.variant=draft_notebook", "rl.draft.beta=0.1"])
    done = run_in(ws, [str(Path(sys.executable).parent / "dvc"), "repro"], timeout=2400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = ws / "reports"
    prepared = json.loads((ws / "data/prepared/validation.json").read_text())
    # the shipped data: 72 three-pair records and 85 singles give 80 held-out pairs; the tiny profile scores 12
    assert prepared["task"] == "style" and prepared["splits"]["val"] == 80 and prepared["splits"]["test"] == 12
    # the reward model and the judge both trained (2 classes), on disjoint records, neither skipped
    for name in ("reward_model", "judge"):
        assert (ws / "models" / name / "model.safetensors").exists(), name
        assert json.loads((ws / "models" / name / "config.json").read_text())["id2label"] == {"0": "normal", "1": "poem"}
    # the DRaFT notebook's variant saved its projection and its new LayerNorm beside the model
    from safetensors.torch import load_file

    assert set(load_file(ws / "models/rl/draft_projection.safetensors")) == {
        "projection.weight", "projection.bias", "layer_norm.weight", "layer_norm.bias"}
    # every item scored by the judge and the content check; the gate paired exactly these passes
    records = {m: read_jsonl(reports / f"eval/{m}/records.jsonl") for m in ("base", "rl")}
    for rows in records.values():
        assert all(r["correct_pass"] == (r["correct_style"] and r["correct_content"]) for r in rows)
        assert all(0.0 <= r["judge_p_poem"] <= 1.0 and -1.0 <= r["content"] <= 1.0 for r in rows)
    metrics = json.loads((reports / "eval/rl/metrics.json").read_text())
    assert metrics["protocol"]["task"] == "style" and "judge" in metrics["protocol"]
    promotion = json.loads((reports / "promotion.json").read_text())
    expected = gate.decide(*gate.pair_records(records["rl"], records["base"], "correct_pass"), 0.0, 0.0, 0.95, 2000, 42)
    harmed = gate.harm_reasons(records["rl"], records["base"], 0.95, 2000, 42)  # do no harm comes first
    assert promotion["metric"] == "pass" and promotion["promote"] == (expected.promote and not harmed)
    # the judge was checked against the shortcuts a policy finds, on held-out records
    judge_eval = json.loads((ws / "models/judge/eval.json").read_text())
    assert set(judge_eval["shortcut_pass_rates"]) == {"copied_input", "input_in_lines", "repeated_line", "cut_off"}
