"""Kill the pipeline with SIGKILL in the middle of SFT: the rerun resumes and ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_workspace

DVC = str(Path(sys.executable).parent / "dvc")
SFT_SETTINGS = ["sft.training.max_steps=30", "sft.training.save_steps=5", "sft.training.logging_steps=5",
                "sft.lora.lora_dropout=0.0"]


def env_for(ws):
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), TQDM_DISABLE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def repro(ws, *targets):
    return subprocess.run([DVC, "repro", *targets], cwd=ws, env=env_for(ws), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_during_sft_resumes_from_checkpoint_and_matches(tmp_path):
    from safetensors.torch import load_file

    ws = make_workspace(tmp_path / "killed", SFT_SETTINGS)
    assert repro(ws, "base", "prepare").returncode == 0
    proc = subprocess.Popen([DVC, "repro", "sft"], cwd=ws, env=env_for(ws), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not (ws / "checkpoints/sft/checkpoint-10").exists():
        assert proc.poll() is None, "sft finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ws / "models/sft_adapter").exists()  # nothing half-written where the output goes
    assert not [p for p in (ws / "models").iterdir() if p.name.startswith(".sft_adapter")]

    rerun = repro(ws, "sft")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "resuming SFT from" in rerun.stdout and "checkpoint-" in rerun.stdout
    assert "Running stage 'prepare'" not in rerun.stdout and "Running stage 'base'" not in rerun.stdout
    assert not (ws / "checkpoints/sft").exists()  # cleaned once the adapter is saved

    clean = make_workspace(tmp_path / "clean", SFT_SETTINGS)
    assert repro(clean, "sft").returncode == 0
    resumed = load_file(ws / "models/sft_adapter/adapter_model.safetensors")
    uninterrupted = load_file(clean / "models/sft_adapter/adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-5, rtol=1e-4)
