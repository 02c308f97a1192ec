"""Kill the pipeline with SIGKILL in the middle of training (SFT, GRPO): the rerun resumes and ends where an
uninterrupted run ends."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import copy_workspace, make_workspace
from posttrain.training.trainer import checkpoint_complete

DVC = str(Path(sys.executable).parent / "dvc")
SFT_SETTINGS = ["sft.training.max_steps=30", "sft.training.save_steps=5", "sft.training.logging_steps=5",
                "sft.lora.lora_dropout=0.0"]
# GRPO resumes bit for bit (the Trainer restores the torch/numpy/python RNG that sampling and TRL's shuffles
# draw from, after fast-forwarding the dataloader) only under these conditions, which the settings pin down:
# - One epoch: max_prompts 12 = max_steps x 1 prompt per step (batch 2 / num_generations 2). TRL's
#   RepeatSampler draws each epoch's order from one torch.Generator seeded once and has no set_epoch(), so a
#   run resumed in epoch k replays epoch 0's order: with the tiny profile's 4 prompts (3 epochs) the resumed
#   run trains other prompts from step 7 on (seen: num_tokens differs from step 7).
# - steps_per_generation 1: every step generates its own completions; with more, a resumed run regenerates
#   at once (_buffered_inputs is not checkpointed) and a checkpoint inside a generation block diverges.
# - A dense reward (length_penalty): exact_match/format are almost always 0 for a tiny random model, so
#   every advantage is 0, the weights never move and any two runs "match". learning_rate 1e-3 (not 1e-5)
#   moves them far more than the tolerance, so a run that diverged after the resume would not pass either.
GRPO_SETTINGS = ["rl.method=grpo", "rl.training.max_steps=12", "rl.training.save_steps=3",
                 "rl.training.logging_steps=1", "rl.lora.lora_dropout=0.0", "rl.max_prompts=12",
                 "rl.training.steps_per_generation=1", "rl.rewards.length_penalty=1.0",
                 "rl.training.learning_rate=1.0e-3"]


def env_for(ws):
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), TQDM_DISABLE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def repro(ws, *targets):
    return subprocess.run([DVC, "repro", *targets], cwd=ws, env=env_for(ws), capture_output=True, text=True, timeout=600)


def kill_when(ws, stage, checkpoint, complete=False, or_later=False, timeout=300):
    """`dvc repro <stage>` in its own process group, SIGKILLed (the whole group) once `checkpoint` exists
    (complete=True: once its trainer_state.json, written last, parses; or_later=True: or any later checkpoint,
    since with save_total_limit 1 a fast stage can replace the one asked for between two polls)."""
    proc = subprocess.Popen([DVC, "repro", stage], cwd=ws, env=env_for(ws), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = ws / checkpoint
    wanted = int(checkpoint.name.split("-")[1])

    def reached() -> bool:
        candidates = [checkpoint]
        if or_later:
            candidates = [p for p in checkpoint.parent.glob("checkpoint-*") if int(p.name.split("-")[1]) >= wanted]
        return any(p.exists() and (not complete or checkpoint_complete(p)) for p in candidates)

    deadline = time.time() + timeout
    while not reached():
        assert proc.poll() is None, f"{stage} finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _printed_dict(line: str) -> dict | None:
    """A metrics dict as the Trainer prints it on a line of its own (`{'loss': '1.234', ...}`), else None."""
    line = line.strip()
    if not (line.startswith("{'") and line.endswith("}")):
        return None
    try:
        value = ast.literal_eval(line)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, dict) else None


@pytest.mark.slow
def test_sigkill_during_sft_resumes_from_checkpoint_and_matches(tmp_path):
    from safetensors.torch import load_file

    ws = make_workspace(tmp_path / "killed", SFT_SETTINGS)
    assert repro(ws, "base", "prepare").returncode == 0
    clean = copy_workspace(ws, tmp_path / "clean")  # the same upstream outputs, for the uninterrupted run
    kill_when(ws, "sft", "checkpoints/sft/checkpoint-10", or_later=True)
    assert not (ws / "models/sft_adapter").exists()  # nothing half-written where the output goes
    assert not [p for p in (ws / "models").iterdir() if p.name.startswith(".sft_adapter")]
    # The checkpoint a resume must start from: the last complete one (the one it was killed at may be half-written).
    complete = [p for p in (ws / "checkpoints/sft").glob("checkpoint-*") if checkpoint_complete(p)]
    assert complete, list((ws / "checkpoints/sft").iterdir())
    checkpoint = max(complete, key=lambda p: int(p.name.split("-")[1]))
    resumed_step = int(checkpoint.name.split("-")[1])
    killed_log = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in killed_log if "loss" in e] == list(range(5, resumed_step + 1, 5))

    rerun = repro(ws, "sft")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    resumed = re.search(r"resuming SFT from (\S+)", rerun.stdout)
    assert resumed and Path(resumed[1]).name == checkpoint.name, rerun.stdout[-3000:]
    assert "Running stage 'prepare'" not in rerun.stdout and "Running stage 'base'" not in rerun.stdout
    assert not (ws / "checkpoints/sft").exists()  # cleaned once the adapter is saved
    history = json.loads((ws / "models/sft_adapter/train_log.json").read_text())
    logged = [e for e in history if "loss" in e]
    assert [e["step"] for e in logged] == list(range(5, 31, 5))
    assert [e for e in history if e["step"] <= resumed_step] == killed_log  # restored from the checkpoint
    # Training is deterministic, so a rerun that started over would log the same numbers and end with the same
    # weights: what tells them apart is what this process trained. The Trainer prints each logging step's
    # metrics as it logs them (ProgressCallback); the rerun must have printed only the steps after the checkpoint.
    printed = [entry for entry in map(_printed_dict, rerun.stdout.splitlines()) if entry and "loss" in entry]
    after = [e for e in logged if e["step"] > resumed_step]
    assert len(printed) == len(after), (resumed_step, printed)
    for shown, entry in zip(printed, after):
        assert float(shown["loss"]) == pytest.approx(entry["loss"], rel=1e-3), (shown, entry)

    uninterrupted_run = repro(clean, "sft")
    assert uninterrupted_run.returncode == 0 and "Running stage 'base'" not in uninterrupted_run.stdout
    resumed = load_file(ws / "models/sft_adapter/adapter_model.safetensors")
    uninterrupted = load_file(clean / "models/sft_adapter/adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_sigkill_during_grpo_resumes_from_checkpoint_and_matches(tmp_path):
    from safetensors.torch import load_file

    ws = make_workspace(tmp_path / "killed", GRPO_SETTINGS)
    upstream = repro(ws, "merge", "reward_model")  # what rl depends on: models/sft and models/reward_model
    assert upstream.returncode == 0, upstream.stdout[-2000:] + upstream.stderr[-2000:]
    clean = copy_workspace(ws, tmp_path / "clean")  # the same upstream outputs, for the uninterrupted run
    kill_when(ws, "rl", "checkpoints/rl/checkpoint-6", complete=True)
    assert not (ws / "models/rl").exists()  # nothing half-written where the output goes
    assert not [p for p in (ws / "models").iterdir() if p.name.startswith(".rl.tmp-")]
    killed_log = json.loads((ws / "checkpoints/rl/checkpoint-6/trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in killed_log if "loss" in e] == list(range(1, 7))

    rerun = repro(ws, "rl")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "resuming GRPO from" in rerun.stdout and "checkpoint-" in rerun.stdout
    assert "Running stage 'merge'" not in rerun.stdout and "Running stage 'reward_model'" not in rerun.stdout
    assert not (ws / "checkpoints/rl").exists()  # cleaned once the model is saved
    history = json.loads((ws / "models/rl/train_log.json").read_text())
    assert history[-1]["step"] == 12
    assert [e["step"] for e in history if "loss" in e] == list(range(1, 13))
    # Steps 1-6 come from the checkpoint, step_time included, so they were not trained again: a rerun that
    # started over would still end with the same weights (training is deterministic) and pass the check below.
    assert [e for e in history if e["step"] <= 6] == killed_log

    uninterrupted_run = repro(clean, "rl")
    assert uninterrupted_run.returncode == 0 and "Running stage 'merge'" not in uninterrupted_run.stdout
    from posttrain.release.modelstore import save_merged  # models/rl is an adapter on models/sft: rebuild both models

    resumed = load_file(save_merged(ws / "models/rl", tmp_path / "resumed") / "model.safetensors")
    uninterrupted = load_file(save_merged(clean / "models/rl", tmp_path / "uninterrupted") / "model.safetensors")
    sft = load_file(ws / "models/sft/model.safetensors")
    assert max((resumed[k] - sft[k]).abs().max().item() for k in sft) > 1e-3  # GRPO did move the weights
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:  # bit for bit in practice (max difference 0.0)
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-5, rtol=0)
