"""REINFORCE with a batch-mean baseline, normalised advantages and an optional KL term to a frozen reference.

No library ships this exact estimator (TRL's GRPO uses per-prompt group baselines, RLOO leave-one-out),
so the loop is here; everything around it is the libraries': the config is a trl.GRPOConfig (same field
names as `rl.training` for grpo), the optimizer and schedule come by name (posttrain/training/optim.py), the policy
is a PEFT model whose disabled adapter is the frozen reference.

    loss = -mean_i( A_i * sum_t log pi(y_it | x_i, y_i<t) ) + beta * mean_i( KL_i )
    A_i  = (r_i - mean_batch(r)) / (std_batch(r) + eps)
    KL_i = sum_t KL_t (kl_reduction sequence_sum) | mean_t KL_t (token_mean)
    KL_t = exp(ref - logp) - (ref - logp) - 1   (k3: unbiased, always >= 0) | logp - ref (k1, the assignment's)

rl.reinforce sets kl_estimator, kl_reduction and logprob_clamp ([low, high]: both log-probs clamped, the
assignment's [-20, 0]); sampling reads rl.training's temperature, top_p and top_k. One optimizer step covers
gradient_accumulation_steps micro-batches of per_device_train_batch_size prompts: all of them are sampled
and scored first, advantages are normalised over the whole step's batch, then each micro-batch's share of
the loss is back-propagated, so k micro-batches give the update of one k-times batch.
"""

from __future__ import annotations

import random
from pathlib import Path
from dataclasses import dataclass, field

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


@dataclass
class Settings:
    """rl.reinforce: the estimator choices of the assignment (defaults: this project's)."""

    kl_estimator: str = "k3"  # k3 | k1
    kl_reduction: str = "sequence_sum"  # sequence_sum | token_mean
    logprob_clamp: tuple[float, float] | None = None  # e.g. (-20, 0)

    @classmethod
    def of(cls, cfg) -> "Settings":
        if cfg is None:
            return cls()
        clamp = tuple(cfg.logprob_clamp) if getattr(cfg, "logprob_clamp", None) else None
        return cls(cfg.kl_estimator, cfg.kl_reduction, clamp)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def k1_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Per-row KL to the reference: k1 or k3 per token, summed or averaged over the row's tokens."""
    per_token = (k1_kl if settings.kl_estimator == "k1" else k3_kl)(logp, ref_logp) * mask
    if settings.kl_reduction == "token_mean":
        return per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    return per_token.sum(-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them, so log-probs match the sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                        clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """Log-probability of every completion token (batch, completion_length), clamped to `clamp` if given."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask)).logits[:, prompt_length - 1:-1]
    targets = input_ids[:, prompt_length:]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp.clamp(*clamp) if clamp else logp


def reinforce_loss(logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor, rewards: torch.Tensor,
                   beta: float, group_size: int = 1, settings: Settings | None = None,
                   adv: torch.Tensor | None = None, denominator: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one (micro-)batch. `adv` (already normalised over the optimizer step's whole batch) and
    `denominator` (that batch's row count) make micro-batch losses add up to the whole batch's."""
    settings = settings or Settings()
    adv = advantages(rewards, group_size) if adv is None else adv
    denominator = denominator or len(logp)
    seq_logp = (logp * mask).sum(-1)
    loss = -(adv.detach() * seq_logp).sum() / denominator
    kl = torch.zeros(())
    if ref_logp is not None:
        kl_rows = sequence_kl(logp, ref_logp, mask, settings)
        kl = kl_rows.mean()
        loss = loss + beta * kl_rows.sum() / denominator
    return loss, {"kl": float(kl.detach())}


def optimizer_and_scheduler(model, args, optimizer: dict | None = None, lr_scheduler: dict | None = None):
    """The optimizer and LR schedule by name (posttrain/training/optim.py): rl.optimizer / rl.lr_scheduler when they
    name one, else TrainingArguments' `optim` / `lr_scheduler_type` with `lr_scheduler_kwargs`."""
    from posttrain.training import optim

    optimizer, lr_scheduler = optimizer or {}, lr_scheduler or {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    built = optim.build_optimizer(trainable, args, model, optimizer.get("name", ""), optimizer.get("kwargs"))
    scheduler = optim.build_scheduler(built, args, lr_scheduler.get("name", ""), lr_scheduler.get("kwargs"))
    return built, scheduler, trainable


@dataclass
class Rollout:
    """Sampled completions of one micro-batch, scored: what a loss needs besides the model."""

    sequences: torch.Tensor
    attention: torch.Tensor
    mask: torch.Tensor  # 1 for completion tokens up to and including the first EOS
    prompt_length: int
    rewards: torch.Tensor
    entry: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def logprobs(self, model, clamp=None) -> torch.Tensor:
        return completion_logprobs(model, self.sequences, self.attention, self.prompt_length, clamp)


def rollout(model, tokenizer, batch: list[dict], reward_funcs, reward_weights: list[float], args,
            group_size: int = 1) -> Rollout:
    """Sample completions for `batch` (each prompt `group_size` times) and score them."""
    from posttrain.rewards.composition import weighted_total

    batch = [row for row in batch for _ in range(group_size)]
    prompts = [b["prompt"] if isinstance(b["prompt"], str)
               else tokenizer.apply_chat_template(b["prompt"], tokenize=False, add_generation_prompt=True) for b in batch]
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    prompt_length = encoded.input_ids.shape[1]
    model.eval()
    with torch.no_grad():
        sequences = model.generate(**encoded, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                   top_k=args.top_k or 0, max_new_tokens=args.max_completion_length,
                                   pad_token_id=tokenizer.pad_token_id)
    completion_ids = sequences[:, prompt_length:]
    # Tokens after the first EOS are padding: mask them out of log-probs and KL.
    is_eos = completion_ids == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    mask = (~after_eos).float()
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(completion_ids, mask)]
    columns = {k: [b[k] for b in batch] for k in batch[0] if k != "prompt"}
    # completion_ids as GRPOTrainer passes them (up to and including EOS): trl.rewards' length and repetition terms read them
    ids = [row[m.bool()].tolist() for row, m in zip(completion_ids, mask)]
    per_reward = [fn(prompts=prompts, completions=texts, completion_ids=ids, **columns) for fn in reward_funcs]
    rewards = torch.tensor(weighted_total(per_reward, reward_weights))
    entry = {"completions/mean_length": float(mask.sum(-1).mean())}
    for fn, values in zip(reward_funcs, per_reward):
        entry[f"rewards/{fn.__name__}"] = sum(float(v or 0.0) for v in values) / len(values)
    attention = torch.cat([encoded.attention_mask, mask.long()], dim=1)
    return Rollout(sequences, attention, mask, prompt_length, rewards, entry, batch)


def merge_entries(entries: list[dict]) -> dict:
    """Mean of each logged number over the micro-batches of one optimizer step."""
    keys = {k for e in entries for k in e}
    return {k: sum(e[k] for e in entries if k in e) / sum(1 for e in entries if k in e) for k in sorted(keys)}


def train_step(model, rollouts: list[Rollout], optimizer, scheduler, trainable, args, group_size: int = 1,
               settings: Settings | None = None) -> dict:
    """One optimizer step over the micro-batches in `rollouts`: advantages over all of them, each micro-batch's
    share of the loss back-propagated in turn, then clip, step and schedule (a plateau schedule on the reward)."""
    from posttrain.training import optim

    settings = settings or Settings()
    rewards = torch.cat([r.rewards for r in rollouts])
    adv = advantages(rewards, group_size)
    total = len(rewards)
    optimizer.zero_grad()
    losses, kls, start = 0.0, [], 0
    model.train()
    for r in rollouts:
        rows = len(r.rewards)
        logp = r.logprobs(model, settings.logprob_clamp)
        ref_logp = None
        if args.beta > 0:
            with torch.no_grad(), model.disable_adapter():
                ref_logp = r.logprobs(model, settings.logprob_clamp)
        loss, extra = reinforce_loss(logp, ref_logp, r.mask, r.rewards, args.beta, settings=settings,
                                     adv=adv[start:start + rows], denominator=total)
        loss.backward()
        losses += float(loss.detach())
        kls.append(extra["kl"] * rows)
        start += rows
    torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
    optimizer.step()
    mean_reward = float(rewards.mean())
    optim.step_scheduler(scheduler, mean_reward)
    return {"loss": losses, "reward": mean_reward, "reward_std": float(rewards.std()) if total > 1 else 0.0,
            "kl": sum(kls) / total, **merge_entries([r.entry for r in rollouts])}


def rl_step_loss(model, tokenizer, batch: list[dict], reward_funcs, reward_weights: list[float], args,
                 group_size: int = 1, settings: Settings | None = None) -> tuple[torch.Tensor, dict]:
    """Sample completions for `batch` (each prompt `group_size` times), score them, return (loss, log entry)."""
    settings = settings or Settings()
    r = rollout(model, tokenizer, batch, reward_funcs, reward_weights, args, group_size)
    model.train()
    logp = r.logprobs(model, settings.logprob_clamp)
    ref_logp = None
    if args.beta > 0:
        with torch.no_grad(), model.disable_adapter():
            ref_logp = r.logprobs(model, settings.logprob_clamp)
    loss, extra = reinforce_loss(logp, ref_logp, r.mask, r.rewards, args.beta, group_size, settings)
    entry = {"loss": float(loss.detach()), "reward": float(r.rewards.mean()),
             "reward_std": float(r.rewards.std()) if len(r.rewards) > 1 else 0.0, **r.entry, **extra}
    return loss, entry


def train(model, tokenizer, dataset, reward_funcs, reward_weights: list[float], args, progress: bool = True,
          cfg=None) -> list[dict]:
    """Run `args.max_steps` REINFORCE steps on a PEFT `model`; return a Trainer-style log history.

    `cfg` is params.rl (its `reinforce` settings, `optimizer` and `lr_scheduler`); None: the defaults.
    """
    from tqdm.auto import tqdm

    from posttrain.training.optim import current_lr

    print("reinforce: no checkpoints; an interrupted run restarts from step 0")

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    settings = Settings.of(getattr(cfg, "reinforce", None))
    optimizer, scheduler, trainable = optimizer_and_scheduler(model, args, *named_optim(cfg))
    rows = list(range(len(dataset)))
    history: list[dict] = []
    for step in tqdm(range(1, args.max_steps + 1), desc="reinforce", disable=not progress):
        rollouts = []
        for _ in range(max(1, int(args.gradient_accumulation_steps))):
            batch = [dataset[i] for i in rng.sample(rows, min(args.per_device_train_batch_size, len(rows)))]
            rollouts.append(rollout(model, tokenizer, batch, reward_funcs, reward_weights, args))
        entry = train_step(model, rollouts, optimizer, scheduler, trainable, args, settings=settings)
        if step % max(1, int(args.logging_steps)) == 0 or step == args.max_steps:
            history.append({"step": step, **entry, "learning_rate": current_lr(optimizer)})
    return history


def named_optim(cfg) -> tuple[dict, dict]:
    """rl.optimizer and rl.lr_scheduler as dicts ({} when absent)."""
    import dataclasses

    out = []
    for key in ("optimizer", "lr_scheduler"):
        value = getattr(cfg, key, None) if cfg is not None else None
        out.append(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value or {}))
    return out[0], out[1]


NAME = "reinforce"


def run(params, model_dir: Path, dataset, checkpoint_dir: Path):
    """The GRPOConfig fields of rl.training drive it (learning_rate, max_steps, temperature, optim, ...)."""
    from peft import get_peft_model

    from posttrain.methods.common import policy_parts

    model, tokenizer, lora, args, reward_funcs = policy_parts(params, model_dir, checkpoint_dir)
    policy = get_peft_model(model, lora)
    history = train(policy, tokenizer, dataset, reward_funcs, list(args.reward_weights), args, cfg=params.rl)
    return policy, tokenizer, history
