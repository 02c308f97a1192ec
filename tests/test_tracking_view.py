"""What the MLflow UI is handed, without a pipeline: the experiment kind, run names, datasets with the DVC hash.

    .venv/bin/python -m pytest tests/test_tracking_view.py -q
"""

from __future__ import annotations

import hashlib

import pytest

from posttrain.release import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(tracking.EXPERIMENT_ENV, raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_the_experiment_is_marked_as_model_training(store):
    from mlflow import MlflowClient

    experiment_id = tracking.setup(store)
    client = MlflowClient()
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.delete_experiment_tag(experiment_id, tracking.EXPERIMENT_KIND_TAG)  # one made by an older version
    tracking.setup(store)
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(experiment_id, tracking.EXPERIMENT_KIND_TAG, "genai_development")  # a user's choice
    tracking.setup(store)
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_default_run_name_says_task_method_and_params_hash():
    from types import SimpleNamespace

    params = SimpleNamespace(data=SimpleNamespace(task="gsm8k"), rl=SimpleNamespace(method="draft"))
    flat = {"rl.method": "draft", "sft.training.learning_rate": 1e-4}
    name = tracking.default_run_name(params, flat)
    assert name == f"gsm8k-draft-{tracking.params_hash(flat)}" and len(name.rsplit("-", 1)[1]) == 8
    assert tracking.params_hash(flat) != tracking.params_hash(flat | {"sft.training.learning_rate": 2e-4})


def test_stage_inputs_are_datasets_with_the_dvc_hash(store):
    import mlflow

    prepared = store / "data" / "prepared"
    prepared.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (prepared / f"{split}.jsonl").write_text(f'{{"question": "{split}?"}}\n')
    (store / "dvc.lock").write_text("schema: '2.0'\nstages:\n  prepare:\n    cmd: x\n    outs:\n"
                                    "    - path: data/prepared\n      hash: md5\n      md5: 0123456789abcdef0123456789abcdef.dir\n")
    assert tracking.prepared_data_md5(store) == "0123456789abcdef0123456789abcdef.dir"
    tracking.setup(store)
    with mlflow.start_run() as run:
        logged = tracking.log_data_inputs([prepared / "train.jsonl", prepared / "test.jsonl", store / "dvc.lock"],
                                          "gsm8k", store)
    assert logged == ["gsm8k-train", "gsm8k-test"]
    inputs = {i.dataset.name: i for i in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    train = inputs["gsm8k-train"]
    assert train.dataset.digest == hashlib.md5((prepared / "train.jsonl").read_bytes()).hexdigest()
    assert str(prepared / "train.jsonl") in train.dataset.source
    assert {t.key: t.value for t in train.tags} == {"mlflow.data.context": "training",
                                                    "dvc.data_prepared_md5": "0123456789abcdef0123456789abcdef.dir"}
    assert {t.key: t.value for t in inputs["gsm8k-test"].tags}["mlflow.data.context"] == "evaluation"
