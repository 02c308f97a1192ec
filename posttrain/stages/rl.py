"""Stage `rl`: reinforcement learning on the merged SFT model, method chosen by `rl.method`.

    posttrain stage rl               # or: dvc repro rl

grpo:      TRL's GRPOTrainer, group-relative advantages over `num_generations` samples per prompt,
           optional KL to the frozen SFT model (`beta` in rl.training), rewards from posttrain.rewards.composition.
reinforce: posttrain/methods/reinforce.py, batch-mean baseline, normalised advantages, optional KL (`beta`);
           reads the same GRPOConfig fields (learning_rate, max_steps, temperature, optim, ...).
draft:     posttrain/methods/draft.py, LM loss - beta * reward of a frozen encoder RM fed Gumbel-softmax soft
           tokens (rl.draft); the learned projection is saved beside the model.
hybrid:    posttrain/methods/hybrid.py, SFT and RL steps alternating on one adapter (rl.hybrid + rl.training).
ppo:       posttrain/methods/ppo.py, TRL PPOTrainer with an LM reward model (reward_model.kind: pairwise or mlp_head)
           as reward and value model's start, plus rl.rewards rule terms, KL to the adapter-free policy (rl.ppo).
The output is the LoRA/DoRA adapter a method trains and a pointer to the SFT model it adapts (sha256 checked),
not a merged copy; posttrain/release/modelstore.py rebuilds the merged model wherever one is loaded.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import Params
from posttrain.io import atomic_path, read_jsonl, write_json
from posttrain.evaluation.prompts import rl_prompt
from posttrain.methods import registry as methods
from posttrain.tasks import registry
from posttrain.training.throughput import throughput_of
from posttrain.training.trainer import adapter_update_norm, summary_of


def build_dataset(records: list[dict], params: Params):
    from datasets import Dataset

    limit = params.rl.max_prompts or len(records)
    task = registry.get(params.data.task)
    return Dataset.from_list([rl_prompt(r, params.eval, task) for r in records[:limit]])


def run(params: Params, train_path: str | Path, model_dir: str | Path, out_dir: str | Path,
        checkpoint_dir: str | Path = "checkpoints/rl") -> dict:
    import shutil

    method = methods.get(params.rl.method)
    dataset = build_dataset(read_jsonl(train_path), params)
    # A method returns (policy with adapter, tokenizer, log history[, {file name: tensors saved beside the model}]).
    policy, tokenizer, history, *extra = method(params, Path(model_dir), dataset, Path(checkpoint_dir))
    from posttrain.training import distributed

    if not distributed.is_main():
        return {"model": Path(out_dir)}  # under a launcher rank 0 writes the output and cleans up
    save_policy(policy, Path(model_dir), out_dir, tokenizer, history, extra[0] if extra else {})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"model": Path(out_dir)}


def save_policy(policy, model_dir: Path, out_dir: str | Path, tokenizer, history, files: dict) -> Path:
    """The adapter and a pointer to the model it adapts (posttrain/release/modelstore.py), not a merged copy:
    `posttrain eval models/rl` and the eval stage rebuild the merged model from them. A policy without
    an adapter is saved whole."""
    from safetensors.torch import save_file

    from posttrain.release.modelstore import write_pointer

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
    moved = adapter_update_norm(out_dir)  # how far the adapter moved the SFT model (0: not at all)
    return (summary_of(history, ("loss", "reward", "kl", "lm_loss", "beta", "completions/mean_length",
                                 "completions/clipped_ratio", "frac_reward_zero_std",
                                 # draft: the bridge's fit, the reward's gradient share, the RM on decoded text
                                 "bridge_fit_error", "reward_weight", "reward_grad_ratio", "decoded_reward",
                                 # ppo: whether the value model learns, and whether clipping acts
                                 "loss/value_avg", "val/clipfrac_avg", "policy/approxkl_avg"))
            | throughput_of(history) | ({"adapter_update_norm": moved} if moved is not None else {}))
