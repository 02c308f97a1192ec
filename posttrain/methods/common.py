"""What the GRPO-config methods share: the SFT model, its tokenizer, a LoRA config, GRPOConfig and rewards.

Every method module exposes `NAME` and `run(params, model_dir, dataset, checkpoint_dir)` returning
(policy with its adapter, tokenizer, log history[, {file name: tensors saved beside the model}]).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import Params
from posttrain.training.trainer import lora_config, trainer_kwargs


def policy_parts(params: Params, model_dir: Path, checkpoint_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig

    from posttrain.rewards import composition as rewards

    set_seed(params.seed)  # before any weights are built: LoRA A and heads start the same every run
    reward_funcs, weights = rewards.build(params.rl.rewards, params.rl.reward_postprocess or None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    lora = lora_config(params.rl.lora)
    args = GRPOConfig(**trainer_kwargs(params.rl.training, checkpoint_dir, params.seed), reward_weights=weights)
    return model, tokenizer, lora, args, reward_funcs
