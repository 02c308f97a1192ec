"""Training stages under `accelerate launch`: DDP over gloo with 2 CPU processes on tiny models.

    .venv/bin/python -m pytest tests/test_scale_accelerate.py -q

Every rank trains; rank 0 alone opens the MLflow run, writes the output folder and reports/*.json
and deletes the checkpoints; the other rank waits and exits 0. The shipped accelerate configs
(configs/accelerate/) are checked against `accelerate launch`'s own argument handling.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_workspace

CONFIGS = ROOT / "configs" / "accelerate"
CPU_DDP = f"accelerate launch --config_file {CONFIGS / 'cpu_ddp.yaml'}"


def _launch_args(config: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config), "-m", "posttrain", "stage", "sft"])
    known = set(vars(args))
    validated, defaults, _ = _validate_launch_command(args)
    return validated, defaults, known


@pytest.mark.parametrize("name, kind", [("cpu_ddp", "MULTI_GPU"), ("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                        ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_are_accepted_by_accelerate_launch(name, kind):
    args, defaults, known = _launch_args(CONFIGS / f"{name}.yaml")
    assert str(defaults.distributed_type).endswith(kind)
    assert args.num_processes >= 2 and args.main_process_port == 0
    # Nested sections become `accelerate launch` flags: a misspelt key would be silently ignored, so check them.
    for section, prefix in (("fsdp_config", ""), ("deepspeed_config", "")):
        for key in (getattr(defaults, section) or {}):
            flag = key if key.startswith("fsdp") or section == "deepspeed_config" else f"fsdp_{key}"
            assert prefix + flag in known, f"{name}.yaml: {section}.{key} is not an accelerate launch option"
    if kind == "DEEPSPEED":
        assert args.use_deepspeed and defaults.deepspeed_config["zero_stage"] == int(name[-1])
    if kind == "FSDP":
        assert args.use_fsdp and str(defaults.fsdp_config["fsdp_version"]) == "2"


def test_launch_command_reruns_the_stage_under_the_launcher():
    from posttrain.training.distributed import launch_command

    cmd = launch_command("accelerate launch --config_file 'my configs/ddp.yaml' --num_processes 4", "sft", quiet=True)
    assert Path(cmd[0]).name == "accelerate" and cmd[1:5] == ["launch", "--config_file", "my configs/ddp.yaml", "--num_processes"]
    assert cmd[-6:] == ["4", "-m", "posttrain", "-q", "stage", "sft"]
    with pytest.raises(ValueError, match="empty launcher"):
        launch_command("  ", "sft")


def test_rank_comes_from_the_launcher_environment(monkeypatch):
    from posttrain.training import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", distributed.LAUNCHED_ENV):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world_size() == 1 and distributed.is_main() and not distributed.launched()
    assert distributed.state() is None  # a single process never initialises torch.distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.world_size() == 2 and distributed.rank() == 1 and not distributed.is_main()
    assert distributed.launched()


def _env(ws: Path, **extra) -> dict:
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), TQDM_DISABLE="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in ("MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK", "LOCAL_RANK", "POSTTRAIN_LAUNCHED", "POSTTRAIN_PARENT_RUN_ID"):
        env.pop(name, None)
    return env


def _stage(ws: Path, *args, **env):
    result = subprocess.run([sys.executable, "-m", "posttrain", "-q", "stage", *args], cwd=ws, env=_env(ws, **env),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def _stage_runs(ws: Path, stage: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain-gsm8k")
    runs = client.search_runs(experiment.experiment_id)
    return client, [r for r in runs if r.data.tags.get("posttrain.stage") == stage]


@pytest.mark.slow
@pytest.mark.integration
def test_sft_and_grpo_train_on_two_ranks_and_rank_zero_alone_writes(tmp_path):
    from safetensors.torch import load_file

    steps, batch, examples = 6, 2, 16
    ws = make_workspace(tmp_path / "ws", [f"sft.training.max_steps={steps}", "sft.training.logging_steps=1",
                                          f"sft.training.per_device_train_batch_size={batch}",
                                          f"sft.max_examples={examples}", "sft.training.learning_rate=0.01",
                                          "sft.training.save_steps=2", "sft.lora.lora_dropout=0.0",
                                          "rl.training.max_steps=2", "rl.training.save_steps=1"])
    _stage(ws, "prepare")
    _stage(ws, "base")

    # The CLI way: the stage re-runs itself under the launcher, one process per rank.
    out = _stage(ws, "sft", "--launcher", CPU_DDP)
    assert "launching stage sft:" in out and "-m posttrain -q stage sft" in out
    assert out.count("stage sft: rank 1/2 done") == 1 and "rank 0/2" not in out

    adapter_dir = ws / "models" / "sft_adapter"
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    assert not (adapter_dir / "training_args.bin").exists()
    assert [p.name for p in (ws / "models").iterdir() if "sft_adapter" in p.name] == ["sft_adapter"]  # no temp left
    assert not (ws / "checkpoints" / "sft").exists()
    log = json.loads((adapter_dir / "train_log.json").read_text())
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == steps and losses[-1] < losses[0]
    # Data parallel, not two copies of one run: each step consumed a batch per rank, so the epoch counter
    # moved twice as fast as a single process's (examples / batch steps per epoch) would.
    last_epoch = max(e["epoch"] for e in log if "loss" in e)
    assert last_epoch == pytest.approx(steps * batch * 2 / examples)
    assert json.loads((ws / "reports" / "sft.json").read_text())["loss_last"] == pytest.approx(losses[-1])

    client, runs = _stage_runs(ws, "sft")
    assert len(runs) == 1 and runs[0].data.tags["posttrain.world_size"] == "2"
    assert runs[0].data.metrics["loss_last"] == pytest.approx(losses[-1])
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "sft")]
    assert artifacts == ["sft/train_log.json"]

    _stage(ws, "merge")
    # The pipeline way: POSTTRAIN_LAUNCHER makes `python -m posttrain stage rl` (dvc.yaml's command) launch.
    out = _stage(ws, "rl", POSTTRAIN_LAUNCHER=CPU_DDP)
    assert "launching stage rl:" in out and out.count("stage rl: rank 1/2 done") == 1
    rl_log = json.loads((ws / "models" / "rl" / "train_log.json").read_text())
    assert [e["step"] for e in rl_log if "reward" in e] == [1, 2]
    assert (ws / "models" / "rl" / "adapter_model.safetensors").exists() and not (ws / "checkpoints" / "rl").exists()
    assert (ws / "reports" / "rl.json").exists()
    _, rl_runs = _stage_runs(ws, "rl")
    assert len(rl_runs) == 1 and rl_runs[0].data.tags["posttrain.world_size"] == "2"
    # Stages that are not data-parallel ignore the launcher and run once.
    out = _stage(ws, "eval_rl", POSTTRAIN_LAUNCHER=CPU_DDP)
    assert "launching" not in out and (ws / "reports" / "eval_rl.json").exists()


def test_a_launcher_that_starts_one_process_is_reported_and_its_exit_code_returned(tmp_path):
    # `python` as the "launcher" runs the stage in one child process, as `accelerate launch --num_processes 2`
    # does on a machine without a GPU; the child has no params.yaml here, so it stops at once with exit code 2.
    result = subprocess.run([sys.executable, "-m", "posttrain", "-q", "stage", "sft", "--launcher", sys.executable],
                            cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"launching stage sft: {sys.executable} -m posttrain -q stage sft" in result.stdout
    assert "warning: the launcher started one process only" in result.stderr
    assert "error: params.yaml: params file not found" in result.stderr
