"""The promote stage against a real (sqlite) MLflow registry: the gate refuses a worse model."""

import dataclasses
import json

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
    from posttrain.release import tracking

    tracking.setup(tmp_path)
    yield mlflow
    mlflow.set_tracking_uri(None)


def promote_once(params, tmp_path, name, correct, protocol_hash="p1", fresh=True):
    from posttrain.release import tracking
    from posttrain.stages import promote

    model = tmp_path / f"model_{name}"
    model.mkdir(exist_ok=not fresh)
    (model / "config.json").write_text(json.dumps({"name": name}))
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
    from posttrain.cli.command import main

    monkeypatch.chdir(tmp_path)
    assert main(["gate"]) == 2  # no decision yet
    (tmp_path / "reports").mkdir()
    write_json(tmp_path / "reports/promotion.json", {"promote": True, "reason": "gain", "model_version": 3})
    assert main(["gate"]) == 0
    write_json(tmp_path / "reports/promotion.json", {"promote": False, "reason": "noise", "model_version": 4})
    assert main(["gate"]) == 1


def test_champion_life_cycle_on_a_real_registry(params, tmp_path, registry, monkeypatch):
    """v1 promoted; a worse v2 rejected (alias stays); a better v3 promoted (alias moves); the next gate
    compares with v3 from the local cache, without downloading anything."""
    import mlflow
    from mlflow import MlflowClient

    p = dataclasses.replace(params, promote=dataclasses.replace(params.promote, n_bootstrap=500))
    client = MlflowClient()

    def champion():
        return str(client.get_model_version_by_alias("gsm8k-policy", "champion").version)

    v1 = promote_once(p, tmp_path, "v1", [True] * 50 + [False] * 50)
    assert v1["promote"] and v1["model_version"] == 1 and champion() == "1"
    v2 = promote_once(p, tmp_path, "v2", [True] * 40 + [False] * 60)
    assert not v2["promote"] and v2["baseline"] == "champion v1" and champion() == "1"
    v3 = promote_once(p, tmp_path, "v3", [True] * 80 + [False] * 20)
    assert v3["promote"] and v3["baseline"] == "champion v1" and champion() == "3"

    def no_download(*args, **kwargs):
        raise AssertionError("the champion's results were downloaded instead of read from the cache")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    v4 = promote_once(p, tmp_path, "v4", [True] * 60 + [False] * 40)
    assert not v4["promote"] and v4["baseline"] == "champion v3" and champion() == "3"
    assert v4["count_only_baseline"] == 20 and v4["count_only_candidate"] == 0  # compared with v3's answers


def test_a_retried_promote_reuses_the_version_it_registered(params, tmp_path, registry, monkeypatch):
    """A crash between create_model_version and the alias move, then a retry: one version, and the alias on it."""
    from mlflow import MlflowClient

    from posttrain.release import tracking

    p = dataclasses.replace(params, promote=dataclasses.replace(params.promote, n_bootstrap=500))
    original = MlflowClient.set_registered_model_alias
    calls = {"n": 0}

    def crash_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("killed between registering and moving the alias")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", crash_once)
    with tracking.pipeline_run(tmp_path, run_name="pipeline"):
        with pytest.raises(ConnectionError):
            promote_once(p, tmp_path, "good", [True] * 50 + [False] * 50)
        retried = promote_once(p, tmp_path, "good", [True] * 50 + [False] * 50, fresh=False)
    client = MlflowClient()
    versions = client.search_model_versions("name = 'gsm8k-policy'")
    assert [str(v.version) for v in versions] == ["1"] and str(retried["model_version"]) == "1"
    assert str(client.get_model_version_by_alias("gsm8k-policy", "champion").version) == "1"
    # Another pipeline run with the same candidate is a new registration (a new decision on record).
    with tracking.pipeline_run(tmp_path, run_name="pipeline 2"):
        again = promote_once(p, tmp_path, "good", [True] * 50 + [False] * 50, fresh=False)
    assert str(again["model_version"]) == "2"


class _FailingRegistry:
    """A tracking server that answers every request with one HTTP status (and an MLflow-style body)."""

    def __init__(self, status: int, error_code: str):
        import http.server
        import json
        import threading

        body = json.dumps({"error_code": error_code, "message": f"status {status}"}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.mark.parametrize("status,error_code", [(500, "INTERNAL_ERROR"), (401, "UNAUTHENTICATED"),
                                               (403, "PERMISSION_DENIED")])
def test_registry_errors_fail_the_gate_instead_of_meaning_no_champion(params, tmp_path, monkeypatch, status,
                                                                      error_code):
    import mlflow

    from posttrain.release.tracking import RegistryError
    from posttrain.stages import promote

    server = _FailingRegistry(status, error_code)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow.set_tracking_uri(server.uri)
    created = []
    monkeypatch.setattr(mlflow.MlflowClient, "create_model_version", lambda *a, **k: created.append(a))
    try:
        model = tmp_path / "model"
        model.mkdir()
        with pytest.raises(RegistryError, match=r"cannot read alias 'champion'.*nothing registered") as err:
            promote.run(params, model, eval_dir(tmp_path / "cand", [True] * 100),
                        eval_dir(tmp_path / "base", [False] * 100), tmp_path / "sft", cache_dir=tmp_path / "cache")
        assert "\n" not in str(err.value) and created == []
    finally:
        mlflow.set_tracking_uri(None)
        server.close()


def test_not_found_means_no_champion(params, tmp_path, monkeypatch):
    import mlflow

    from posttrain.release import registry

    server = _FailingRegistry(404, "RESOURCE_DOES_NOT_EXIST")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(server.uri)
    try:
        assert registry.current_champion(mlflow.MlflowClient(), "gsm8k-policy") is None
    finally:
        mlflow.set_tracking_uri(None)
        server.close()


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "metrics.json").unlink(), r"metrics\.json: eval report not found"),
    (lambda d: (d / "metrics.json").write_text('{"accuracy_strict": 0.'), r"metrics\.json: corrupt eval report"),
    (lambda d: (d / "metrics.json").write_text('{"accuracy_strict": 0.5}'), r"metrics\.json: corrupt eval report \(missing"),
    (lambda d: (d / "records.jsonl").write_text('{"question": "q0"}\n'), r"records\.jsonl:1: missing field 'correct_flexible'"),
])
def test_promote_refuses_a_missing_or_corrupt_eval_report(params, tmp_path, registry, damage, message):
    from posttrain.io import DataError

    candidate = eval_dir(tmp_path / "cand", [True] * 10)
    damage(candidate)
    from posttrain.stages import promote

    with pytest.raises(DataError, match=message):
        promote.run(params, tmp_path, candidate, eval_dir(tmp_path / "base", [False] * 10), tmp_path / "sft",
                    cache_dir=tmp_path / "cache")
    from mlflow import MlflowClient

    assert MlflowClient().search_registered_models() == []  # nothing registered
