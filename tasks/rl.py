"""Stage `rl`: reinforcement learning on the merged SFT model, method chosen by `rl.method`.

    posttrain stage rl               # or: dvc repro rl

grpo:      TRL's GRPOTrainer, group-relative advantages over `num_generations` samples per prompt,
           optional KL to the frozen SFT model (`beta` in rl.training), rewards from posttrain.rewards.
reinforce: posttrain/reinforce.py, batch-mean baseline, normalised advantages, optional KL (`beta`);
           reads the same GRPOConfig fields (learning_rate, max_steps, temperature, optim, ...).
draft:     posttrain/draft.py, LM loss - beta * reward of a frozen encoder RM fed Gumbel-softmax soft
           tokens (rl.draft); the learned projection is saved beside the model.
hybrid:    posttrain/hybrid.py, SFT and RL steps alternating on one adapter (rl.hybrid + rl.training).
ppo:       posttrain/ppo.py, TRL PPOTrainer with an LM reward model (reward_model.kind: pairwise or mlp_head)
           as reward and value model's start, plus rl.rewards rule terms, KL to the adapter-free policy (rl.ppo).
The output is the LoRA/DoRA adapter a method trains and a pointer to the SFT model it adapts (sha256 checked),
not a merged copy; posttrain/modelstore.py rebuilds the merged model wherever one is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from posttrain.config import Params
from posttrain.io import atomic_path, read_jsonl, write_json
from posttrain.prompts import rl_prompt
from posttrain.tasks import registry
from posttrain.throughput import throughput_callback, throughput_of
from posttrain.training import lora_config, summary_of, train_resumable, trainer_kwargs


def build_dataset(records: list[dict], params: Params):
    from datasets import Dataset

    limit = params.rl.max_prompts or len(records)
    task = registry.get(params.data.task)
    return Dataset.from_list([rl_prompt(r, params.eval, task) for r in records[:limit]])


def _policy_parts(params: Params, model_dir: Path, checkpoint_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig

    from posttrain import rewards

    set_seed(params.seed)  # before any weights are built: LoRA A and heads start the same every run
    reward_funcs, weights = rewards.build(params.rl.rewards, params.rl.reward_postprocess or None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    lora = lora_config(params.rl.lora)
    args = GRPOConfig(**trainer_kwargs(params.rl.training, checkpoint_dir, params.seed), reward_weights=weights)
    return model, tokenizer, lora, args, reward_funcs


def run_grpo(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    """Returns (policy with its adapter, tokenizer, log history)."""
    from trl import GRPOTrainer

    model, tokenizer, lora, args, reward_funcs = _policy_parts(params, model_dir, checkpoint_dir)
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
        processing_class=tokenizer, peft_config=lora, callbacks=[throughput_callback("grpo")],
    )
    train_resumable(trainer, checkpoint_dir, "GRPO", dataclasses.asdict(params.rl), params.seed, str(model_dir),
                    params.eval.prompt_style, params.eval.system_prompt)
    return trainer.model, tokenizer, trainer.state.log_history


def run_reinforce(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    from peft import get_peft_model

    from posttrain import reinforce

    model, tokenizer, lora, args, reward_funcs = _policy_parts(params, model_dir, checkpoint_dir)
    policy = get_peft_model(model, lora)
    history = reinforce.train(policy, tokenizer, dataset, reward_funcs, list(args.reward_weights), args, cfg=params.rl)
    return policy, tokenizer, history


def run_draft(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    """DRaFT trains on question -> worked answer pairs (LM loss) rather than on prompts: see posttrain/draft.py."""
    from posttrain import draft

    return draft.run(params, model_dir, dataset, checkpoint_dir)


def run_hybrid(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    """SFT and RL steps alternating on one adapter: see posttrain/hybrid.py."""
    from peft import get_peft_model

    from posttrain import hybrid
    from posttrain.prompts import sft_pairs

    model, tokenizer, lora, args, reward_funcs = _policy_parts(params, model_dir, checkpoint_dir)
    policy = get_peft_model(model, lora)
    pairs = list(sft_pairs(dataset, params.eval))
    history = hybrid.train(policy, tokenizer, list(dataset), pairs, reward_funcs, list(args.reward_weights), args,
                           params.rl.hybrid, rl_cfg=params.rl)
    return policy, tokenizer, history


def run_ppo(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    """TRL's experimental PPOTrainer with the pairwise reward model: see posttrain/ppo.py."""
    from posttrain import ppo

    return ppo.run_ppo(params, model_dir, dataset, checkpoint_dir)


METHODS = {"grpo": run_grpo, "reinforce": run_reinforce, "draft": run_draft, "hybrid": run_hybrid, "ppo": run_ppo}


def run(params: Params, train_path: str | Path, model_dir: str | Path, out_dir: str | Path,
        checkpoint_dir: str | Path = "checkpoints/rl") -> dict:
    import shutil

    if params.rl.method not in METHODS:
        raise ValueError(f"rl.method: unknown method {params.rl.method!r}; known: {list(METHODS)}")
    dataset = build_dataset(read_jsonl(train_path), params)
    # A method returns (policy with adapter, tokenizer, log history[, {file name: tensors saved beside the model}]).
    policy, tokenizer, history, *extra = METHODS[params.rl.method](params, Path(model_dir), dataset, Path(checkpoint_dir))
    from posttrain import distributed

    if not distributed.is_main():
        return {"model": Path(out_dir)}  # under a launcher rank 0 writes the output and cleans up
    save_policy(policy, Path(model_dir), out_dir, tokenizer, history, extra[0] if extra else {})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"model": Path(out_dir)}


def save_policy(policy, model_dir: Path, out_dir: str | Path, tokenizer, history, files: dict) -> Path:
    """The adapter and a pointer to the model it adapts (posttrain/modelstore.py), not a merged copy:
    `posttrain eval models/rl` and the eval stage rebuild the merged model from them. A policy without
    an adapter is saved whole."""
    from safetensors.torch import save_file

    from posttrain.modelstore import write_pointer

    with atomic_path(out_dir, is_dir=True) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        if hasattr(policy, "peft_config"):
            write_pointer(tmp, model_dir)
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_log.json", history)
    return Path(out_dir)


def metrics(out_dir: str | Path) -> dict[str, float]:
    from posttrain.io import read_json

    history = read_json(Path(out_dir) / "train_log.json")
    return summary_of(history, ("loss", "reward", "kl", "lm_loss", "beta", "completions/mean_length")) | throughput_of(history)
