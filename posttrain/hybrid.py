"""Hybrid trainer: SFT steps and RL steps alternate on one policy (one LoRA/DoRA adapter, one optimizer).

    rl:
      method: hybrid
      hybrid: {sft_fraction_start: 0.8, sft_fraction_end: 0.2, sft_batch_size: 4}   # curriculum SFT -> RL
      training: {max_steps: 10, num_generations: 4, beta: 0.04, ...}               # trl.GRPOConfig names

SFT step: next-token loss on question -> worked answer with the prompt masked out (-100 labels).
RL step: `num_generations` samples per prompt, GRPO-style group-relative normalised advantages,
optional k3 KL to the frozen reference (the disabled adapter), the rewards of `rl.rewards`
(posttrain/reinforce.py). The share of SFT steps moves linearly from `sft_fraction_start` at the first
step to `sft_fraction_end` at the last; the step kinds are fixed in advance, so a run is reproducible.
"""

from __future__ import annotations

import math
import random

import torch


def step_kinds(n_steps: int, sft_start: float, sft_end: float) -> list[str]:
    """'sft' / 'rl' for each step, so that the running count of SFT steps tracks the linear schedule."""
    kinds, target, done = [], 0.0, 0
    for i in range(n_steps):
        share = sft_start if n_steps == 1 else sft_start + (sft_end - sft_start) * i / (n_steps - 1)
        target += min(1.0, max(0.0, share))
        take_sft = math.floor(target + 0.5 + 1e-9) > done  # round half up (round() rounds half to even)
        done += take_sft
        kinds.append("sft" if take_sft else "rl")
    return kinds


def sft_batch(tokenizer, examples: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """Prompt-completion examples (sft_example shape) -> right-padded input_ids/attention_mask/labels."""
    rows = []
    for example in examples:
        if isinstance(example["prompt"], str):
            prompt, full = example["prompt"], example["prompt"] + example["completion"]
        else:
            prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        full_ids = tokenizer(full, add_special_tokens=False).input_ids[:max_length]
        labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
        rows.append((full_ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
    }


def train(model, tokenizer, prompts, sft_examples, reward_funcs, reward_weights: list[float], args, cfg,
          max_length: int = 512, progress: bool = True) -> list[dict]:
    """`args.max_steps` steps on a PEFT `model`, each an SFT or an RL step; returns a Trainer-style log."""
    from tqdm.auto import tqdm

    print("hybrid: no checkpoints; an interrupted run restarts from step 0")

    from posttrain.reinforce import apply_gradients, optimizer_and_scheduler, rl_step_loss

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    optimizer, scheduler, trainable = optimizer_and_scheduler(model, args)
    kinds = step_kinds(args.max_steps, cfg.sft_fraction_start, cfg.sft_fraction_end)
    group_size = max(1, int(args.num_generations))
    rl_prompts = max(1, args.per_device_train_batch_size // group_size)
    history: list[dict] = []
    for step, kind in enumerate(tqdm(kinds, desc="hybrid", disable=not progress), start=1):
        if kind == "sft":
            model.train()
            picked = [sft_examples[i] for i in rng.sample(range(len(sft_examples)), min(cfg.sft_batch_size, len(sft_examples)))]
            batch = {k: v.to(model.device) for k, v in sft_batch(tokenizer, picked, max_length).items()}
            loss = model(**batch).loss
            entry = {"lm_loss": float(loss.detach())}
        else:
            picked = [prompts[i] for i in rng.sample(range(len(prompts)), min(rl_prompts, len(prompts)))]
            loss, entry = rl_step_loss(model, tokenizer, picked, reward_funcs, reward_weights, args, group_size)
        apply_gradients(loss, optimizer, scheduler, trainable, args.max_grad_norm)
        if step % max(1, int(args.logging_steps)) == 0 or step == args.max_steps:
            history.append({"step": step, "kind": kind, **entry, "learning_rate": scheduler.get_last_lr()[0]})
    return history
