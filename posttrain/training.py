"""Small pieces the training stages share: device defaults, checkpoints, metric logging."""

from __future__ import annotations

from pathlib import Path

import torch


def trainer_kwargs(training: dict, output_dir: str | Path, seed: int) -> dict:
    """Library config kwargs from params, with the defaults this project needs.

    TRL configs default to bf16=True, which fails on a CPU: pick the device's precision unless
    params say otherwise. Logging goes to MLflow through the stage runner, not a Trainer callback,
    so the runs nest under the pipeline's parent run.
    """
    on_gpu = torch.cuda.is_available()
    defaults = {
        "use_cpu": not on_gpu,
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
        "report_to": "none",
        "seed": seed,
        "save_strategy": "steps",
        "save_total_limit": 1,
        "disable_tqdm": False,
    }
    return defaults | dict(training) | {"output_dir": str(output_dir)}


LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


def lora_config(overrides: dict):
    """A causal-LM LoraConfig: the project's defaults under the params section's LoraConfig fields."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **(LORA_DEFAULTS | overrides))


def _complete(checkpoint: Path) -> bool:
    """HF writes trainer_state.json after the weights, optimizer and RNG state: parseable means complete."""
    import json

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(output_dir: str | Path, fingerprint: str) -> str | None:
    """The newest complete checkpoint of an interrupted run with the same settings, else None.

    Checkpoints from a run with other params (fingerprint) are thrown away, never resumed, and so is
    a checkpoint that a kill cut off half-written (transformers' get_last_checkpoint would pick it).
    """
    import re
    import shutil

    output_dir = Path(output_dir)
    stamp = output_dir / "fingerprint.txt"
    if output_dir.is_dir() and (not stamp.exists() or stamp.read_text() != fingerprint):
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    steps = sorted(
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()
    )
    for _, checkpoint in reversed(steps):
        if _complete(checkpoint):
            return str(checkpoint)
        shutil.rmtree(checkpoint)
    return None


def train_resumable(trainer, checkpoint_dir: str | Path, label: str, *settings) -> None:
    """trainer.train(), resuming from the last complete checkpoint written under the same settings."""
    resume = last_checkpoint(checkpoint_dir, fingerprint(*settings))
    if resume:
        print(f"resuming {label} from {resume}")
    trainer.train(resume_from_checkpoint=resume)


def fingerprint(*parts) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def history_metrics(log_history: list[dict]) -> list[tuple[int, dict[str, float]]]:
    """Trainer log history -> [(step, {metric: value})] with numbers only."""
    rows = []
    for entry in log_history:
        step = int(entry.get("step", 0))
        values = {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        if values:
            rows.append((step, values))
    return rows


def summary_of(log_history: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """First and last value of each key: what a stage reports as its metrics."""
    out: dict[str, float] = {}
    for key in keys:
        values = [float(e[key]) for e in log_history if key in e]
        if values:
            out[f"{key}_first"], out[f"{key}_last"] = values[0], values[-1]
    return out
