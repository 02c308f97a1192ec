"""`posttrain compare A B`: report folders and registered versions, paired table, interval, McNemar, differing items.

    .venv/bin/python -m pytest tests/test_compare.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT
from posttrain.release.gate import bootstrap_interval, mcnemar_exact

# 10 items: A right on 0-5, B right on 0-2 and 6: both right 3, only A 3, only B 1, both wrong 3
A_RIGHT = [i < 6 for i in range(10)]
B_RIGHT = [i < 3 or i == 6 for i in range(10)]


def write_report(folder: Path, right: list[bool], answer: str, protocol_hash: str = "p1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"question": f"question {i}?", "generation": f"{answer} #### {i if ok else -1}", "gold": str(i),
                "prediction_flexible": str(i if ok else -1), "correct_flexible": ok, "correct_strict": ok}
               for i, ok in enumerate(right)]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = {"n_questions": len(right), "accuracy_flexible": sum(right) / len(right),
               "accuracy_strict": sum(right) / len(right), "protocol_hash": protocol_hash,
               "question_set_hash": "q1", "protocol": {"max_new_tokens": 12 if protocol_hash == "p1" else 10}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_report(tmp_path / "a", A_RIGHT, "answer of A")
    write_report(tmp_path / "b", B_RIGHT, "answer of B")
    return tmp_path


def test_two_report_folders_paired(workspace, capsys):
    from posttrain.cli.command import main

    assert main(["compare", "a", "b", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "both right 3, only A 3, only B 1, both wrong 3" in out
    assert re.search(r"^ +B right +B wrong\nA right +3 +3\nA wrong +1 +3$", out, re.M), out
    low, high = bootstrap_interval(A_RIGHT, B_RIGHT, 0.95, 2000, 0)  # params.yaml: confidence, n_bootstrap, seed
    assert f"A - B = +0.200, 95% paired bootstrap interval [{low:+.3f}, {high:+.3f}]" in out
    assert f"McNemar p = {mcnemar_exact(3, 1):.3g}" in out
    assert "first 2 of 4 items where they differ:" in out
    assert "1. [only A right] question 3? (reference: 3)" in out
    assert "   A: answer of A #### 3  -> 3" in out and "   B: answer of B #### -1  -> -1" in out
    assert "[only B right] question 6?" not in out  # --show 2


def test_different_protocols_are_refused_in_one_line(workspace, capsys):
    from posttrain.cli.command import main

    write_report(workspace / "c", B_RIGHT, "answer of C", protocol_hash="p2")
    assert main(["compare", "a", "c"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("error: refusing to compare results under a different protocol")
    assert "A protocol_hash=p1 vs B p2" in err


def test_not_a_report_or_model_is_refused(workspace, capsys):
    from posttrain.cli.command import main

    assert main(["compare", "a", "nowhere"]) == 2
    assert capsys.readouterr().err.startswith("error: nowhere: neither an eval report folder")


def test_registered_versions_by_number_and_alias(workspace, capsys):
    import mlflow
    from mlflow import MlflowClient

    from posttrain.release import tracking
    from posttrain.cli.command import main

    tracking.setup(workspace)
    client = MlflowClient()
    client.create_registered_model("gsm8k-policy")
    for folder in ("a", "b"):  # as posttrain/stages/promote.py logs them: eval/metrics.json, eval/records.jsonl
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(workspace / folder), artifact_path="eval")
        client.create_model_version("gsm8k-policy", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("gsm8k-policy", "champion", "2")

    assert main(["compare", "models:/gsm8k-policy/1", "models:/gsm8k-policy@champion"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("A  models:/gsm8k-policy/1: flexible 0.600\nB  models:/gsm8k-policy@champion: flexible 0.400")
    assert "both right 3, only A 3, only B 1, both wrong 3" in out
    assert main(["compare", "models:/gsm8k-policy/7", "b"]) == 2
    assert "models:/gsm8k-policy/7: not in the model registry" in capsys.readouterr().err
