"""REINFORCE with a batch-mean baseline, normalised advantages and an optional KL term to a frozen reference.

No library ships this exact estimator (TRL's GRPO uses per-prompt group baselines, RLOO leave-one-out),
so the loop is here; everything around it is the libraries': the config is a trl.GRPOConfig (same field
names as `rl.training` for grpo), the optimizer and schedule come from TrainingArguments' `optim` and
`lr_scheduler_type` names, the policy is a PEFT model whose disabled adapter is the frozen reference.

    loss = -mean_i( A_i * sum_t log pi(y_it | x_i, y_i<t) ) + beta * mean_i( sum_t KL_t )
    A_i  = (r_i - mean_batch(r)) / (std_batch(r) + eps)
    KL_t = exp(ref - logp) - (ref - logp) - 1      (the k3 estimator: unbiased, always >= 0)
"""

from __future__ import annotations

import random

import torch


def advantages(rewards: torch.Tensor, group_size: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """Baseline = batch mean (group_size 1) or the mean of each prompt's group of samples (GRPO-style,
    rows ordered prompt by prompt), then normalised to unit variance (zero when all rewards are equal)."""
    if group_size > 1:
        grouped = rewards.view(-1, group_size)
        return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)).view(-1)
    centred = rewards - rewards.mean()
    if rewards.numel() < 2:
        return centred
    return centred / (rewards.std() + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Log-probability of every completion token (batch, completion_length)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, prompt_length - 1:-1]
    targets = input_ids[:, prompt_length:]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def reinforce_loss(logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor, rewards: torch.Tensor,
                   beta: float, group_size: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    adv = advantages(rewards, group_size)
    seq_logp = (logp * mask).sum(-1)
    loss = -(adv.detach() * seq_logp).mean()
    kl = torch.zeros(())
    if ref_logp is not None:
        kl = ((k3_kl(logp, ref_logp) * mask).sum(-1)).mean()
        loss = loss + beta * kl
    return loss, {"kl": float(kl.detach())}


def optimizer_and_scheduler(model, args):
    """The optimizer and LR schedule the HF Trainer would build from `optim` / `lr_scheduler_type` names."""
    from transformers import Trainer, get_scheduler

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls(trainable, **optimizer_kwargs)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(args.max_steps),
                              num_training_steps=args.max_steps)
    return optimizer, scheduler, trainable


def rl_step_loss(model, tokenizer, batch: list[dict], reward_funcs, reward_weights: list[float], args,
                 group_size: int = 1) -> tuple[torch.Tensor, dict]:
    """Sample completions for `batch` (each prompt `group_size` times), score them, return (loss, log entry)."""
    from posttrain.rewards import weighted_total

    batch = [row for row in batch for _ in range(group_size)]
    prompts = [b["prompt"] if isinstance(b["prompt"], str)
               else tokenizer.apply_chat_template(b["prompt"], tokenize=False, add_generation_prompt=True) for b in batch]
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    prompt_length = encoded.input_ids.shape[1]
    model.eval()
    with torch.no_grad():
        sequences = model.generate(**encoded, do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0,
                                   max_new_tokens=args.max_completion_length, pad_token_id=tokenizer.pad_token_id)
    completion_ids = sequences[:, prompt_length:]
    # Tokens after the first EOS are padding: mask them out of log-probs and KL.
    is_eos = completion_ids == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    mask = (~after_eos).float()
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(completion_ids, mask)]
    columns = {k: [b[k] for b in batch] for k in batch[0] if k != "prompt"}
    per_reward = [fn(prompts=prompts, completions=texts, **columns) for fn in reward_funcs]
    rewards = torch.tensor(weighted_total(per_reward, reward_weights))
    attention = torch.cat([encoded.attention_mask, mask.long()], dim=1)
    model.train()
    logp = completion_logprobs(model, sequences, attention, prompt_length)
    ref_logp = None
    if args.beta > 0:
        with torch.no_grad(), model.disable_adapter():
            ref_logp = completion_logprobs(model, sequences, attention, prompt_length)
    loss, extra = reinforce_loss(logp, ref_logp, mask, rewards, args.beta, group_size)
    entry = {"loss": float(loss.detach()), "reward": float(rewards.mean()),
             "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
             "completions/mean_length": float(mask.sum(-1).mean()), **extra}
    for fn, values in zip(reward_funcs, per_reward):
        entry[f"rewards/{fn.__name__}"] = sum(float(v or 0.0) for v in values) / len(values)
    return loss, entry


def apply_gradients(loss: torch.Tensor, optimizer, scheduler, trainable, max_grad_norm: float) -> None:
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()


def train(model, tokenizer, dataset, reward_funcs, reward_weights: list[float], args, progress: bool = True) -> list[dict]:
    """Run `args.max_steps` REINFORCE steps on a PEFT `model`; return a Trainer-style log history."""
    from tqdm.auto import tqdm

    print("reinforce: no checkpoints; an interrupted run restarts from step 0")

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    optimizer, scheduler, trainable = optimizer_and_scheduler(model, args)
    rows = list(range(len(dataset)))
    history: list[dict] = []
    for step in tqdm(range(1, args.max_steps + 1), desc="reinforce", disable=not progress):
        batch = [dataset[i] for i in rng.sample(rows, min(args.per_device_train_batch_size, len(rows)))]
        loss, entry = rl_step_loss(model, tokenizer, batch, reward_funcs, reward_weights, args)
        apply_gradients(loss, optimizer, scheduler, trainable, args.max_grad_norm)
        if step % max(1, int(args.logging_steps)) == 0 or step == args.max_steps:
            history.append({"step": step, **entry, "learning_rate": scheduler.get_last_lr()[0]})
    return history
