"""Hybrid trainer: SFT and RL on one policy (one LoRA/DoRA adapter, one optimizer).

    rl:
      method: hybrid
      hybrid: {mode: alternate, sft_batch_size: 4, cliprange: 0.2, vf_coef: 0.1, kl_coef: 0.05, ...}
      training: {max_steps: 10, num_generations: 4, ...}      # trl.GRPOConfig names: sampling, lr, optim

mode `alternate` (the assignment's): every step takes one batch of questions and makes one SFT step on their
reference worked answers, then one PPO step on completions sampled for the same questions:
  per-token reward  r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)), plus the sequence's score at its last token
  advantages        GAE(gamma, lam) on a value head (TRL's ValueHead over the policy's last hidden state),
                    whitened over the batch; returns = advantages + old values
  loss              clipped policy loss (cliprange) + vf_coef * clipped value loss (cliprange_value),
                    ppo_epochs passes over the batch
The reference is the policy with its adapter disabled; the value head trains with the adapter and is not saved.
mode `curriculum`: SFT steps and group-relative REINFORCE steps (posttrain/methods/reinforce.py) draw their own
samples; the share of SFT steps moves linearly from `sft_fraction_start` to `sft_fraction_end`, fixed in
advance so a run is reproducible.
Both honour gradient_accumulation_steps (an optimizer step covers that many micro-batches) and name their
optimizer and schedule as reinforce does (posttrain/training/optim.py).
"""

from __future__ import annotations

import math
from pathlib import Path
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


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates per token; positions where mask is 0 have no value and no reward."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages


def ppo_losses(logp, old_logp, values, old_values, advantages, returns, mask, cliprange: float,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """PPO's clipped policy loss and clipped value loss, token means over `mask` (as TRL's PPOTrainer)."""
    from trl.experimental.ppo.ppo_trainer import masked_mean

    ratio = torch.exp(logp - old_logp)
    pg_loss = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)), mask)
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    clipfrac = masked_mean(((ratio - 1).abs() > cliprange).float(), mask)
    return pg_loss, vf_loss, {"clipfrac": float(clipfrac)}


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL): -kl_coef * k1 KL on every token, the score added at the last one."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


class ValueModel(torch.nn.Module):
    """TRL's ValueHead on the policy's last hidden state: V(state before each completion token)."""

    def __init__(self, config):
        super().__init__()
        from trl.experimental.ppo import modeling_value_head

        self.head = modeling_value_head.ValueHead(config, summary_dropout_prob=0.0)

    def forward(self, hidden: torch.Tensor, prompt_length: int) -> torch.Tensor:
        return self.head(hidden[:, prompt_length - 1:-1]).squeeze(-1).float()


def policy_outputs(model, r, clamp=None, hidden: bool = False):
    """(completion log-probs, last hidden states or None) of a rollout under `model`."""
    from posttrain.methods.reinforce import position_ids

    out = model(input_ids=r.sequences, attention_mask=r.attention, position_ids=position_ids(r.attention),
                output_hidden_states=hidden)
    logits = out.logits[:, r.prompt_length - 1:-1]
    targets = r.sequences[:, r.prompt_length:]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp.clamp(*clamp) if clamp else logp), (out.hidden_states[-1] if hidden else None)


def ppo_step(model, value_model, rollouts, optimizer, scheduler, trainable, args, cfg) -> dict:
    """One PPO update (ppo_epochs passes, each an optimizer step over the micro-batches) on sampled rollouts."""
    from trl.experimental.ppo.ppo_trainer import masked_mean, masked_whiten

    from posttrain.training import optim

    prepared = []
    with torch.no_grad():
        for r in rollouts:
            old_logp, hidden = policy_outputs(model, r, hidden=True)
            old_values = value_model(hidden, r.prompt_length) * r.mask
            with model.disable_adapter():
                ref_logp, _ = policy_outputs(model, r)
            rewards, kl = token_rewards(r.rewards, old_logp, ref_logp, r.mask, cfg.kl_coef)
            adv = gae(rewards, old_values, r.mask, cfg.gamma, cfg.lam)
            prepared.append([r, old_logp, old_values, adv, adv + old_values, kl])
    all_adv = torch.cat([p[3] for p in prepared])
    all_mask = torch.cat([p[0].mask for p in prepared])
    whitened = masked_whiten(all_adv, all_mask) * all_mask if all_mask.sum() > 1 else all_adv
    start = 0
    for p in prepared:
        p[3] = whitened[start:start + len(p[0].rewards)]
        start += len(p[0].rewards)
    logs = []
    for _ in range(max(1, cfg.ppo_epochs)):
        optimizer.zero_grad()
        for r, old_logp, old_values, adv, returns, kl in prepared:
            logp, hidden = policy_outputs(model, r, hidden=True)
            values = value_model(hidden, r.prompt_length)
            pg_loss, vf_loss, extra = ppo_losses(logp, old_logp, values, old_values, adv, returns, r.mask,
                                                 cfg.cliprange, cfg.cliprange_value)
            loss = (pg_loss + cfg.vf_coef * vf_loss) / len(prepared)
            loss.backward()
            logs.append({"ppo/policy_loss": float(pg_loss.detach()), "ppo/value_loss": float(vf_loss.detach()),
                         "ppo/clipfrac": extra["clipfrac"]})
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
    scores = torch.cat([r.rewards for r in rollouts])
    optim.step_scheduler(scheduler, float(scores.mean()))
    from posttrain.methods.reinforce import merge_entries

    kl = float(masked_mean(torch.cat([p[5] for p in prepared]).sum(-1), torch.ones(len(scores))))
    return {"reward": float(scores.mean()), "kl": kl, **merge_entries(logs), **merge_entries([r.entry for r in rollouts])}


def sft_step(model, tokenizer, micro_batches: list[list[dict]], optimizer, trainable, args, max_length: int) -> dict:
    """One optimizer step of next-token loss over the micro-batches (each a list of SFT examples)."""
    model.train()
    optimizer.zero_grad()
    total = sum(len(b) for b in micro_batches)
    lm_loss = 0.0
    for picked in micro_batches:
        batch = {k: v.to(model.device) for k, v in sft_batch(tokenizer, picked, max_length).items()}
        loss = model(**batch).loss * len(picked) / total
        loss.backward()
        lm_loss += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
    optimizer.step()
    return {"lm_loss": lm_loss}


def train(model, tokenizer, prompts, sft_examples, reward_funcs, reward_weights: list[float], args, cfg,
          max_length: int = 512, progress: bool = True, rl_cfg=None) -> list[dict]:
    """`args.max_steps` steps on a PEFT `model`; returns a Trainer-style log. `cfg` is params.rl.hybrid,
    `rl_cfg` params.rl (optimizer, lr_scheduler and reinforce settings; None: the defaults).

    alternate: `prompts` and `sft_examples` are the same questions in the same order (rl.sft_pairs)."""
    from tqdm.auto import tqdm

    from posttrain.training import optim
    from posttrain.methods.reinforce import Settings, named_optim, optimizer_and_scheduler, rollout, train_step

    print("hybrid: no checkpoints; an interrupted run restarts from step 0")

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    mode = getattr(cfg, "mode", "curriculum")
    value_model = ValueModel(model.config).to(model.device) if mode == "alternate" else None
    if value_model is not None:  # the value head trains beside the adapter, in the same optimizer
        model.add_module("posttrain_value_head", value_model)
    try:
        optimizer, scheduler, trainable = optimizer_and_scheduler(model, args, *named_optim(rl_cfg))
    finally:
        if value_model is not None:
            del model._modules["posttrain_value_head"]
    settings = Settings.of(getattr(rl_cfg, "reinforce", None))
    accumulation = max(1, int(args.gradient_accumulation_steps))
    group_size = max(1, int(args.num_generations))
    kinds = ["sft+ppo"] * args.max_steps if mode == "alternate" else step_kinds(
        args.max_steps, cfg.sft_fraction_start, cfg.sft_fraction_end)
    rl_prompts = max(1, args.per_device_train_batch_size // group_size)
    history: list[dict] = []
    for step, kind in enumerate(tqdm(kinds, desc="hybrid", disable=not progress), start=1):
        if kind == "sft+ppo":
            if len(prompts) != len(sft_examples):
                raise ValueError("hybrid alternate: prompts and SFT examples must be the same questions")
            picks = [rng.sample(range(len(prompts)), min(cfg.sft_batch_size, len(prompts))) for _ in range(accumulation)]
            entry = sft_step(model, tokenizer, [[sft_examples[i] for i in p] for p in picks], optimizer, trainable,
                             args, max_length)
            rollouts = [rollout(model, tokenizer, [prompts[i] for i in p], reward_funcs, reward_weights, args, group_size)
                        for p in picks]
            entry |= ppo_step(model, value_model, rollouts, optimizer, scheduler, trainable, args, cfg)
        elif kind == "sft":
            picks = [rng.sample(range(len(sft_examples)), min(cfg.sft_batch_size, len(sft_examples)))
                     for _ in range(accumulation)]
            entry = sft_step(model, tokenizer, [[sft_examples[i] for i in p] for p in picks], optimizer, trainable,
                             args, max_length)
            optim.step_scheduler(scheduler, None)
        else:
            rollouts = [rollout(model, tokenizer, [prompts[i] for i in rng.sample(range(len(prompts)),
                                                                                   min(rl_prompts, len(prompts)))],
                                reward_funcs, reward_weights, args, group_size) for _ in range(accumulation)]
            entry = train_step(model, rollouts, optimizer, scheduler, trainable, args, group_size, settings)
        if step % max(1, int(args.logging_steps)) == 0 or step == args.max_steps:
            history.append({"step": step, "kind": kind, **entry, "learning_rate": optim.current_lr(optimizer)})
    return history


NAME = "hybrid"


def run(params, model_dir: Path, dataset, checkpoint_dir: Path):
    """SFT and RL steps alternating on one adapter."""
    from peft import get_peft_model

    from posttrain.evaluation.prompts import sft_pairs
    from posttrain.methods.common import policy_parts

    model, tokenizer, lora, args, reward_funcs = policy_parts(params, model_dir, checkpoint_dir)
    args.learning_rate = params.rl.hybrid.learning_rate  # its own LoRA rate (rl.hybrid), not rl.training's
    policy = get_peft_model(model, lora)
    pairs = list(sft_pairs(dataset, params.eval))
    history = train(policy, tokenizer, list(dataset), pairs, reward_funcs, list(args.reward_weights), args,
                    params.rl.hybrid, rl_cfg=params.rl)
    return policy, tokenizer, history
