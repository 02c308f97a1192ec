"""DVC remote round trip: push data, adapter and models, delete cache and outputs, `dvc pull` restores them.

    .venv/bin/python -m pytest tests/test_dvc_remote.py -q

A local-directory remote stands in for S3 (same commands; README shows the S3 one).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


DVC = str(Path(sys.executable).parent / "dvc")
OUTPUTS = ("data/prepared", "models/base", "models/sft_adapter")


def dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), TQDM_DISABLE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run([DVC, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_push_then_pull_restores_data_adapter_and_model(workspace_copy, tmp_path):
    ws = workspace_copy  # reproduced: data, a base model, a LoRA adapter and the rest
    before = {out: digest(ws / out) for out in OUTPUTS}
    assert any(name.endswith(".safetensors") for name in before["models/sft_adapter"])

    remote = tmp_path / "remote"
    dvc(ws, "remote", "add", "--default", "store", str(remote))
    dvc(ws, "push")
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= sum(len(files) for files in before.values())

    shutil.rmtree(ws / ".dvc" / "cache")
    for out in OUTPUTS:
        shutil.rmtree(ws / out)
    status = subprocess.run([DVC, "status", "--with-deps", "sft"], cwd=ws, capture_output=True, text=True)
    assert "deleted" in status.stdout  # DVC sees they are gone

    pulled = dvc(ws, "pull", "--with-deps", "sft")  # the stages run here (the rest of dvc.yaml never ran)
    assert {out: digest(ws / out) for out in OUTPUTS} == before
    assert "up to date" in dvc(ws, "status", "--with-deps", "sft").stdout, pulled.stdout
    # Nothing reran: the restored outputs satisfy dvc.lock as they are.
    assert "Running stage" not in dvc(ws, "repro", "sft").stdout
