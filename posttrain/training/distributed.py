"""Which process am I: training stages run once per process under `accelerate launch` or torchrun.

    posttrain stage sft --launcher "accelerate launch --config_file configs/accelerate/cpu_ddp.yaml"
    POSTTRAIN_LAUNCHER="accelerate launch --config_file configs/accelerate/ddp.yaml" dvc repro   # sft and rl launched

Every rank trains (the HF Trainer shards the data and all-reduces the gradients); only the main
process opens the MLflow run, writes outputs and reports, and deletes checkpoints. The other ranks
wait at a barrier and exit 0. A single process (no WORLD_SIZE in the environment) never touches
torch.distributed, so the plain `python -m posttrain stage sft` path is unchanged.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

LAUNCHER_ENV = "POSTTRAIN_LAUNCHER"  # e.g. "accelerate launch --config_file configs/accelerate/ddp.yaml"
LAUNCHED_ENV = "POSTTRAIN_LAUNCHED"  # set in the launched children so they never launch again

# Launchers that are not torchrun set one of these instead of WORLD_SIZE / RANK (MPI for multi-CPU).
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def world_size() -> int:
    return _env_int(_WORLD_SIZE_VARS, 1)


def rank() -> int:
    return _env_int(_RANK_VARS, 0)


def is_main() -> bool:
    return rank() == 0


def state():
    """accelerate's PartialState (initialises the process group on first use); None in a single process.

    cpu=True without a GPU: accelerate then picks MULTI_CPU over gloo, the same state the TRL/HF
    Trainer builds from `use_cpu=True` (PartialState is a singleton: whoever builds it first decides).
    """
    if world_size() <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def wait_for_everyone() -> None:
    current = state()
    if current is not None:
        current.wait_for_everyone()


def device_map() -> dict:
    """Where this rank's copy of a (quantized) model lives: the whole model on one device."""
    import torch

    if torch.cuda.is_available():
        return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"}
    return {"": "cpu"}


def launch_command(launcher: str, stage: str, quiet: bool = False) -> list[str]:
    """`accelerate launch ...` / `torchrun ...` + `-m posttrain stage <name>` (both take -m MODULE)."""
    parts = shlex.split(launcher)
    if not parts:
        raise ValueError(f"{LAUNCHER_ENV}/--launcher: empty launcher command")
    if shutil.which(parts[0]) is None and (Path(sys.executable).parent / parts[0]).exists():
        parts[0] = str(Path(sys.executable).parent / parts[0])  # the venv's accelerate/torchrun, PATH or not
    return parts + ["-m", "posttrain"] + (["-q"] if quiet else []) + ["stage", stage]


def relaunch(launcher: str, stage: str, quiet: bool = False) -> int:
    """Run one stage under a multi-process launcher; returns the launcher's exit code."""
    cmd = launch_command(launcher, stage, quiet)
    print(f"launching stage {stage}: {shlex.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=dict(os.environ, **{LAUNCHED_ENV: "1"}))


def launched() -> bool:
    """True inside a process started by a launcher (ours or one the user ran by hand)."""
    return bool(os.environ.get(LAUNCHED_ENV)) or "LOCAL_RANK" in os.environ or world_size() > 1
