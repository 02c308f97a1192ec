"""Stage `rl`: reinforcement learning on the merged SFT model, method chosen by `rl.method`.

    posttrain stage rl               # or: dvc repro rl

grpo:      TRL's GRPOTrainer, group-relative advantages over `num_generations` samples per prompt,
           optional KL to the frozen SFT model (`beta` in rl.training), rewards from posttrain.rewards.
reinforce: posttrain/reinforce.py, batch-mean baseline, normalised advantages, optional KL (`beta`);
           reads the same GRPOConfig fields (learning_rate, max_steps, temperature, optim, ...).
The LoRA adapter either trains is merged into the SFT model, so the output is a plain HF folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from posttrain.config import Params
from posttrain.io import atomic_path, read_jsonl, write_json
from posttrain.prompts import rl_prompt
from posttrain.training import lora_config, summary_of, train_resumable, trainer_kwargs

def build_dataset(records: list[dict], params: Params):
    from datasets import Dataset

    limit = params.rl.max_prompts or len(records)
    return Dataset.from_list([rl_prompt(r, params.eval) for r in records[:limit]])


def _policy_parts(params: Params, model_dir: Path, checkpoint_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig

    from posttrain import rewards

    set_seed(params.seed)  # before any weights are built: LoRA A and heads start the same every run
    reward_funcs, weights = rewards.build(params.rl.rewards, params.rl.reward_postprocess or None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = lora_config(params.rl.lora)
    args = GRPOConfig(**trainer_kwargs(params.rl.training, checkpoint_dir, params.seed), reward_weights=weights)
    return model, tokenizer, lora, args, reward_funcs


def run_grpo(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    """Returns (policy with its adapter, tokenizer, log history)."""
    from trl import GRPOTrainer

    model, tokenizer, lora, args, reward_funcs = _policy_parts(params, model_dir, checkpoint_dir)
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
        processing_class=tokenizer, peft_config=lora,
    )
    train_resumable(trainer, checkpoint_dir, "GRPO", dataclasses.asdict(params.rl), params.seed, str(model_dir),
                    params.eval.prompt_style, params.eval.system_prompt)
    return trainer.model, tokenizer, trainer.state.log_history


def run_reinforce(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    from peft import get_peft_model

    from posttrain import reinforce

    model, tokenizer, lora, args, reward_funcs = _policy_parts(params, model_dir, checkpoint_dir)
    policy = get_peft_model(model, lora)
    history = reinforce.train(policy, tokenizer, dataset, reward_funcs, list(args.reward_weights), args)
    return policy, tokenizer, history


METHODS = {"grpo": run_grpo, "reinforce": run_reinforce}


def run(params: Params, train_path: str | Path, model_dir: str | Path, out_dir: str | Path,
        checkpoint_dir: str | Path = "checkpoints/rl") -> dict:
    import shutil

    if params.rl.method not in METHODS:
        raise ValueError(f"rl.method: unknown method {params.rl.method!r}; known: {list(METHODS)}")
    dataset = build_dataset(read_jsonl(train_path), params)
    policy, tokenizer, history = METHODS[params.rl.method](params, Path(model_dir), dataset, Path(checkpoint_dir))
    merged = policy.merge_and_unload()
    with atomic_path(out_dir, is_dir=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_log.json", history)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"model": Path(out_dir)}


def metrics(out_dir: str | Path) -> dict[str, float]:
    from posttrain.io import read_json

    history = read_json(Path(out_dir) / "train_log.json")
    return summary_of(history, ("loss", "reward", "kl", "completions/mean_length"))
