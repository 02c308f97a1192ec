"""The stage graph, the evaluator's stop rule, the gate stage, and the whole flow on tiny settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_workspace
from posttrain import stages

DVC = str(Path(sys.executable).parent / "dvc")


def test_dvc_yaml_is_generated_from_the_stage_graph():
    assert (ROOT / "dvc.yaml").read_text() == stages.dvc_yaml_text(), "run `posttrain dvc-yaml`"


def test_stage_graph_is_ordered_and_every_input_has_a_producer():
    produced = set()
    for stage in stages.STAGES:
        for path in stage.inputs.values():
            assert any(path == out or path.startswith(out + "/") for out in produced), (stage.name, path)
        produced |= set(stage.outputs.values()) | ({stage.metrics} if stage.metrics else set())
        import importlib

        assert hasattr(importlib.import_module(f"tasks.{stage.module}"), "run")


def test_answer_line_stop_matches_full_generation(tiny_base, params):
    """Early stopping only cuts text after the answer line: the scored answers do not change."""
    from posttrain.evaluation import AnswerLineStop, generate, load_model

    model, tokenizer = load_model(tiny_base)
    prompts = [f"Question: what is {i} + {i}?\nAnswer:" for i in range(7)]
    fast = generate(model, tokenizer, prompts, 10, batch_size=3, sort_by_length=True, early_stop=True, progress=False)
    slow = generate(model, tokenizer, prompts, 10, batch_size=1, sort_by_length=False, early_stop=False, stop_at_eos=False, progress=False)
    assert fast.texts == slow.texts
    stop = AnswerLineStop(tokenizer, prompt_length=2)
    newline_last = tokenizer("ab#### 12\n", return_tensors="pt").input_ids
    assert stop(newline_last, None).tolist() == [True]
    assert stop(tokenizer("ab 12\n", return_tensors="pt").input_ids, None).tolist() == [False]


def _run(cmd, cwd, env=None):
    full_env = dict(os.environ, PREFECT_HOME=str(Path(cwd) / ".prefect"), **(env or {}))
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.integration
def test_full_flow_on_tiny_settings_then_dvc_repro_is_a_noop(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    result = _run([sys.executable, "-m", "posttrain", "-q", "run", "--run-name", "tiny"], ws)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "gate:" in out and "MLflow: run" in out and "base" in out and "rl" in out
    for report in ("eval_base.json", "eval_sft.json", "eval_rl.json", "promotion.json"):
        assert (ws / "reports" / report).exists()
    records = [json.loads(l) for l in (ws / "reports/eval/rl/records.jsonl").open()]
    assert len(records) == 6 and {"question", "generation", "gold", "correct_flexible"} <= set(records[0])

    status = _run([DVC, "status"], ws)
    assert "up to date" in status.stdout, status.stdout
    again = _run([DVC, "repro"], ws)
    assert again.returncode == 0 and "Running stage" not in again.stdout

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs(client.get_experiment_by_name("posttrain-gsm8k").experiment_id)
    parent = [r for r in runs if r.data.tags.get("posttrain.pipeline") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and {r.data.tags["posttrain.stage"] for r in children} == {s.name for s in stages.STAGES}
    version = client.get_model_version("gsm8k-policy", "1")
    assert version.tags["gate.decision"] in ("promoted", "rejected") and "protocol_hash" in version.tags
    assert "# gsm8k-policy" in version.description  # the model card

    # Changing one eval knob reruns only the eval stages and the gate.
    changed = _run([sys.executable, "-m", "posttrain", "-q", "run", "-S", "eval.max_new_tokens=10"], ws)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "Running stage 'eval_rl'" in changed.stdout and "Running stage 'promote'" in changed.stdout
    assert "Running stage 'sft'" not in changed.stdout and "Running stage 'rl'" not in changed.stdout
