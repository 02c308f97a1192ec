"""The promote stage against a real (sqlite) MLflow registry: the gate refuses a worse model."""

import dataclasses

import pytest

from posttrain.io import write_json, write_jsonl


def eval_dir(path, correct: list[bool], protocol_hash="p1", questions=None):
    questions = questions or [f"q{i}" for i in range(len(correct))]
    records = [{"question": q, "correct_flexible": c, "correct_strict": c} for q, c in zip(questions, correct)]
    acc = sum(correct) / len(correct)
    write_jsonl(path / "records.jsonl", records)
    write_json(path / "metrics.json", {"accuracy_flexible": acc, "accuracy_strict": acc, "n_questions": len(correct),
                                        "protocol_hash": protocol_hash, "protocol": {"k": protocol_hash},
                                        "question_set_hash": "qs"})
    return path


@pytest.fixture
def registry(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from posttrain import tracking

    tracking.setup(tmp_path)
    yield mlflow
    mlflow.set_tracking_uri(None)


def promote_once(params, tmp_path, name, correct, protocol_hash="p1"):
    from posttrain import tracking
    from tasks import promote

    model = tmp_path / f"model_{name}"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with tracking.stage_run("promote", tmp_path):
        return promote.run(params, model, eval_dir(tmp_path / f"eval_{name}", correct, protocol_hash),
                           eval_dir(tmp_path / "eval_base", [True] * 10 + [False] * 90),
                           tmp_path / "eval_sft", cache_dir=tmp_path / "cache")["metrics"]


def test_gate_promotes_on_evidence_and_refuses_a_worse_model(params, tmp_path, registry):
    from mlflow import MlflowClient

    p = dataclasses.replace(params, promote=dataclasses.replace(params.promote, threshold=0.2, n_bootstrap=500))
    good = promote_once(p, tmp_path, "good", [True] * 50 + [False] * 50)
    assert good["promote"] and good["baseline"] == "base model" and good["model_version"] == 1
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("gsm8k-policy", "champion").version) == "1"

    worse = promote_once(p, tmp_path, "worse", [True] * 40 + [False] * 60)
    assert not worse["promote"] and worse["baseline"] == "champion v1"
    assert str(client.get_model_version_by_alias("gsm8k-policy", "champion").version) == "1"
    tags = client.get_model_version("gsm8k-policy", "2").tags
    assert tags["gate.decision"] == "rejected" and float(tags["gate.ci_high"]) < 0.0
    assert int(tags["gate.count_only_baseline"]) == 10 and int(tags["gate.count_only_candidate"]) == 0
    assert list((tmp_path / "cache").iterdir())  # champion results cached locally, not re-evaluated

    refused = promote_once(p, tmp_path, "other_protocol", [True] * 100, protocol_hash="p2")
    assert not refused["promote"] and refused["reason"].startswith("refused: ") and "protocol" in refused["reason"]


def test_gate_command_exit_codes(tmp_path, monkeypatch):
    from posttrain.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["gate"]) == 2  # no decision yet
    (tmp_path / "reports").mkdir()
    write_json(tmp_path / "reports/promotion.json", {"promote": True, "reason": "gain", "model_version": 3})
    assert main(["gate"]) == 0
    write_json(tmp_path / "reports/promotion.json", {"promote": False, "reason": "noise", "model_version": 4})
    assert main(["gate"]) == 1
