"""GRPO: TRL's GRPOTrainer, group-relative advantages over `num_generations` samples per prompt, optional KL
to the frozen SFT model (`beta` in rl.training), rewards from rl.rewards (posttrain/rewards/).

    posttrain run -S rl.method=grpo
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from posttrain.config.schema import Params
from posttrain.methods.common import policy_parts
from posttrain.training.throughput import throughput_callback
from posttrain.training.trainer import train_resumable

NAME = "grpo"


def run(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    """Returns (policy with its adapter, tokenizer, log history)."""
    from trl import GRPOTrainer

    model, tokenizer, lora, args, reward_funcs = policy_parts(params, model_dir, checkpoint_dir)
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
        processing_class=tokenizer, peft_config=lora, callbacks=[throughput_callback("grpo")],
    )
    train_resumable(trainer, checkpoint_dir, "GRPO", dataclasses.asdict(params.rl), params.seed, str(model_dir),
                    params.eval.prompt_style, params.eval.system_prompt)
    return trainer.model, tokenizer, trainer.state.log_history
