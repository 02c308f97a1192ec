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


def test_each_task_has_its_own_experiment(store, monkeypatch):
    """Runs of style and chat do not land in the GSM8K experiment; gsm8k keeps `posttrain-gsm8k` (older stores)."""
    import subprocess
    import sys
    from mlflow import MlflowClient

    from posttrain.cli.command import build_parser
    from posttrain.cli.servers import runs_url
    from posttrain.pipeline import lifecycle, summary

    client = MlflowClient()
    (store / "params.yaml").write_text("data:\n  task: style  # the workspace's task\n")
    assert tracking.experiment_name(root=store) == "posttrain-style"
    style_id = tracking.setup(store)
    assert client.get_experiment(style_id).name == "posttrain-style"
    assert client.get_experiment(tracking.setup(store, task="chat")).name == "posttrain-chat"
    gsm8k_id = tracking.setup(store, task="gsm8k")
    assert client.get_experiment(gsm8k_id).name == "posttrain-gsm8k"
    (store / "params.yaml").unlink()
    assert tracking.setup(store) == gsm8k_id  # no params.yaml: the default task's experiment

    # A pipeline and its stages land in the task's experiment, and the summary names it.
    with tracking.pipeline_run(store, run_name="pipeline", task="style") as parent:
        with tracking.stage_run("prepare", store, task="style") as stage:
            pass
    assert {client.get_run(r.info.run_id).info.experiment_id for r in (parent, stage)} == {style_id}
    shown = summary.render({"mlflow": {"run_id": parent.info.run_id, "experiment_id": style_id,
                                       "experiment_name": "posttrain-style", "tracking_uri": "sqlite:///x"}})
    assert "experiment posttrain-style" in shown

    # A run left RUNNING by a dead process under another task (the workspace switched tasks) is still ended.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = client.create_run(style_id, tags={tracking.WORKSPACE_TAG: str(store.resolve()),
                                               "posttrain.host": lifecycle.identity()["posttrain.host"],
                                               "posttrain.pid": str(gone.pid)}).info.run_id
    with tracking.pipeline_run(store, run_name="gsm8k run", task="gsm8k"):
        pass
    assert client.get_run(orphan).info.status == "KILLED"

    # `posttrain ui` opens the workspace's task's experiment.
    (store / "params.yaml").write_text("data:\n  task: chat\n")
    monkeypatch.chdir(store)
    chat_id = client.get_experiment_by_name("posttrain-chat").experiment_id
    args = build_parser().parse_args(["ui", "--port", "5001"])
    assert f"/#/experiments/{chat_id}/runs" in runs_url(args.host, args.port, args.backend_store_uri)


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
