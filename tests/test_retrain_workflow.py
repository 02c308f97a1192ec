"""The GitHub Actions retrain workflow: runs on a schedule and on data/params changes, and fails on the gate."""

import yaml

from conftest import ROOT


def test_retrain_workflow_triggers_and_fails_on_the_gate():
    workflow = yaml.safe_load((ROOT / ".github/workflows/retrain.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert triggers["schedule"][0]["cron"] and "workflow_dispatch" in triggers
    assert {"params.yaml", "dvc.lock"} <= set(triggers["push"]["paths"])
    steps = workflow["jobs"]["retrain"]["steps"]
    commands = [step.get("run", "") for step in steps]
    run_at = next(i for i, c in enumerate(commands) if "posttrain -q run" in c)
    gate_at = next(i for i, c in enumerate(commands) if c.strip().endswith("posttrain gate"))
    assert run_at < gate_at
    gate = steps[gate_at]
    # The gate's exit code must fail the job: nothing may swallow it.
    assert not gate.get("continue-on-error") and "||" not in gate["run"] and gate.get("if") is None
