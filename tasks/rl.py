"""Stage `rl`: reinforcement learning on the merged SFT model, method chosen by `rl.method`.

    posttrain stage rl               # or: dvc repro rl

grpo: TRL's GRPOTrainer, group-relative advantages over `num_generations` samples per prompt,
      optional KL to the frozen SFT model (`beta` in rl.training), rewards from posttrain.rewards.
The LoRA adapter it trains is merged into the SFT model, so the output is a plain HF folder.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import Params
from posttrain.io import atomic_path, read_jsonl, write_json
from posttrain.prompts import rl_prompt
from posttrain.training import last_checkpoint, summary_of, trainer_kwargs

METHODS = ("grpo",)


def build_dataset(records: list[dict], params: Params):
    from datasets import Dataset

    limit = params.rl.max_prompts or len(records)
    return Dataset.from_list([rl_prompt(r, params.eval) for r in records[:limit]])


def run_grpo(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain import rewards

    reward_funcs, weights = rewards.build(params.rl.rewards)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(task_type="CAUSAL_LM", **({"r": 16, "lora_alpha": 32, "target_modules": "all-linear"} | params.rl.lora))
    args = GRPOConfig(**trainer_kwargs(params.rl.training, checkpoint_dir, params.seed), reward_weights=weights)
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
        processing_class=tokenizer, peft_config=lora,
    )
    trainer.train(resume_from_checkpoint=last_checkpoint(checkpoint_dir))
    return trainer, tokenizer


def run(params: Params, train_path: str | Path, model_dir: str | Path, out_dir: str | Path,
        checkpoint_dir: str | Path = "checkpoints/rl") -> dict:
    import shutil

    if params.rl.method not in METHODS:
        raise ValueError(f"rl.method: unknown method {params.rl.method!r}; known: {list(METHODS)}")
    dataset = build_dataset(read_jsonl(train_path), params)
    trainer, tokenizer = run_grpo(params, Path(model_dir), dataset, Path(checkpoint_dir))
    merged = trainer.model.merge_and_unload()
    with atomic_path(out_dir, is_dir=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_log.json", trainer.state.log_history)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"model": Path(out_dir)}


def metrics(out_dir: str | Path) -> dict[str, float]:
    from posttrain.io import read_json

    history = read_json(Path(out_dir) / "train_log.json")
    return summary_of(history, ("loss", "reward", "kl", "completions/mean_length"))
