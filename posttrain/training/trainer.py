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


def load_causal_lm(model_dir: str | Path, quantization: str = "none", gradient_checkpointing: bool = True,
                   field: str = "quantization"):
    """The model to put LoRA on: fp32 weights, or a bitsandbytes 4-bit (QLoRA: nf4, double quantization)
    or 8-bit base made ready for k-bit training (norms in fp32, input gradients on).

    The base stays quantized and frozen; only the adapter trains (TRL keeps a quantized model's
    adapter in bf16, as the QLoRA paper does). `field` names the params key in errors.
    """
    from transformers import AutoModelForCausalLM

    from posttrain.config.schema import QUANTIZATION, ConfigError

    if quantization not in QUANTIZATION:  # load_params refuses it first; this guards direct callers
        raise ConfigError(f"{field}: unknown value {quantization!r} (one of: {', '.join(QUANTIZATION)})")
    if quantization == "none":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from posttrain.training import distributed

    if quantization == "4bit":
        on_bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16 if on_bf16_gpu else torch.float32)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    # device_map pins the whole model to this rank's device (cpu without a GPU): bitsandbytes needs it.
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map=distributed.device_map(),
                                                 dtype=torch.float32, use_safetensors=True)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def checkpoint_complete(checkpoint: Path) -> bool:
    """HF writes trainer_state.json after the weights, optimizer and RNG state: parseable means complete."""
    import json

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(output_dir: str | Path, fingerprint: str, clean: bool = True) -> str | None:
    """The newest complete checkpoint of an interrupted run with the same settings, else None.

    Checkpoints from a run with other params (fingerprint) are thrown away, never resumed, and so is
    a checkpoint that a kill cut off half-written (transformers' get_last_checkpoint would pick it).
    clean=False only looks (the other ranks of a launched run, once rank 0 has cleaned).
    """
    import re
    import shutil

    output_dir = Path(output_dir)
    stamp = output_dir / "fingerprint.txt"
    if clean:
        if output_dir.is_dir() and (not stamp.exists() or stamp.read_text() != fingerprint):
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)
    elif not output_dir.is_dir():
        return None
    steps = sorted(
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()
    )
    for _, checkpoint in reversed(steps):
        if checkpoint_complete(checkpoint):
            return str(checkpoint)
        if clean:
            shutil.rmtree(checkpoint)
    return None


def train_resumable(trainer, checkpoint_dir: str | Path, label: str, *settings) -> None:
    """trainer.train(), resuming from the last complete checkpoint written under the same settings.

    Under a launcher only rank 0 cleans the checkpoint folder; the others wait, then pick the same one.
    """
    from posttrain.training import distributed

    main = distributed.is_main()
    resume = last_checkpoint(checkpoint_dir, fingerprint(*settings)) if main else None
    distributed.wait_for_everyone()
    if not main:
        resume = last_checkpoint(checkpoint_dir, fingerprint(*settings), clean=False)
    if resume:
        print(f"resuming {label} from {resume}")
    if main:
        link_resumed_run(checkpoint_dir, resume)
    trainer.train(resume_from_checkpoint=resume)


RUN_ID_FILE = "mlflow_run_id.txt"  # in a checkpoint folder: the MLflow run that is writing its checkpoints


def link_resumed_run(checkpoint_dir: str | Path, resume: str | None) -> None:
    """Tag a resumed stage run with the (killed) run whose checkpoint it continues, so the MLflow UI tells
    the story; then record this run as the writer of the checkpoints to come."""
    import mlflow

    active = mlflow.active_run()
    if active is None:  # run outside a stage (tests, notebooks): nothing to link
        return
    record = Path(checkpoint_dir) / RUN_ID_FILE
    previous = record.read_text().strip() if resume and record.exists() else ""
    if resume:
        mlflow.set_tags({"posttrain.resumed_from_checkpoint": Path(resume).name,
                         **({"posttrain.resumed_from_run": previous} if previous else {})})
        if previous:
            mlflow.MlflowClient().set_tag(previous, "posttrain.resumed_by_run", active.info.run_id)
    record.write_text(active.info.run_id)


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


def adapter_update_norm(folder: str | Path) -> float | None:
    """How far a LoRA/DoRA adapter moved its model: the Frobenius norm of the weight change it adds,
    sqrt(sum over modules of ||scaling * B @ A||^2), read from the saved adapter. None without an adapter.
    LoRA's B starts at zero, so this is 0 for an adapter that never left its start."""
    import json

    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if not weights.exists() or not config.exists():
        return None
    cfg = json.loads(config.read_text())
    rank, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    scaling = alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
    tensors = load_file(str(weights))
    total = 0.0
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A.weight", "lora_B.weight")]
            total += float(torch.linalg.matrix_norm(scaling * (b.float() @ a.float())) ** 2)
    return total ** 0.5
