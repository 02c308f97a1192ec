"""DRaFT: differentiable reward fine-tuning through a frozen encoder reward model.

Two variants (`rl.draft.variant`), which differ only in how soft tokens enter the encoder and what the
reward is:
  project: soft tokens x policy embeddings -> learned Linear -> the encoder's own embedding block
           (position embeddings + its pretrained LayerNorm, via inputs_embeds) -> layers -> mean pool
           -> head -> sigmoid (a probability in [0, 1]).
  draft_notebook: the DRaFT notebook's trainer, which this project grew out of: soft tokens x policy
           embeddings -> learned Linear -> + the encoder's position embeddings -> a NEW trainable LayerNorm
           -> the encoder layers (the embedding block is bypassed) -> mean pool -> head -> the raw class-1
           logit (unbounded; the notebook ramps beta to 0.1 over 50 steps). Rows with fewer than 2 response
           tokens are skipped.
Why they differ: the project variant keeps the encoder's input exactly as it was trained (its LayerNorm
statistics), and a bounded reward cannot be pushed up without limit; the notebook lets a fresh LayerNorm
adapt the projected soft tokens to the encoder, and the raw logit keeps a gradient where a sigmoid
saturates. Both train the new parts with the adapter, checkpoint them and save them beside the model.

    total loss = LM loss - w_t * mean(reward),   beta_t = beta * min(1, step / warmup_steps)
    w_t = beta_t * ||grad LM loss|| / ||grad reward||   (rl.draft.balance, the default)   or   w_t = beta_t

Why the bridge is fitted and frozen, and the gradients balanced (issue 30): with a random bridge trained
alongside the adapter, the logged soft reward rose 0.66 -> 0.73 while a held-out judge's score of the
decoded replies did not move (0.811 -> 0.812), and training the bridge alone gave the same rise; the
reward's gradient on the adapter was 0.05x the LM loss's. So the bridge is first fitted (Adam on MSE)
until real text fed as one-hot tokens scores as the reward model scores the same text through its own
tokenizer (`bridge_fit_error` before and after, on held-out texts), then frozen (rl.draft.train_bridge);
beta then sets the reward gradient's share directly. Every `monitor_every` steps the reward model scores
greedy replies decoded from the policy (`decoded_reward`): the reward gain as text, not as soft tokens.

One teacher-forced forward pass on (question -> worked answer) gives both terms. The LM loss is TRL's
SFT loss with the prompt masked out. For the reward, the policy's logits over the response positions
become Gumbel-softmax soft tokens (temperature tau); they pick rows of the policy's input embedding
matrix, a learned Linear maps them to the encoder's width, and the encoder's own embedding block adds
its position embeddings and LayerNorm (it is called with `inputs_embeds`). Its layers run, the output
is mean-pooled over the response and the classifier head (pooler + classifier for BERT) gives a
logit; the reward is its sigmoid, the probability the verifier assigns to "correct".

The reward model is frozen: gradients flow through it into the soft tokens, hence into the LoRA/DoRA
adapters, and into the projection, which is trained with the adapters (it sits inside the PEFT model
so the Trainer's optimizer, checkpoints and resume see it). Responses longer than the encoder's
positions are cut. The Trainer is TRL's SFTTrainer with only `compute_loss` extended, so optimizers
and schedules are chosen by their TrainingArguments names like every other stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from posttrain.reward_models.mlp_head import pad
from posttrain.reward_models.training import class_one_probability

PROJECTION_FILE = "draft_projection.safetensors"


def beta_at(step: int, beta: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 at step 0 to `beta` at `warmup_steps`, constant after."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def response_soft_tokens(logits: torch.Tensor, labels: torch.Tensor, tau: float, hard: bool,
                         max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-softmax samples at the response positions, packed to the left.

    logits (B, T, V) predict token t+1 at position t; labels (B, T) are -100 outside the response.
    Returns soft tokens (B, L, V) and their mask (B, L), L <= max_positions.
    """
    shifted_logits, targets = logits[:, :-1], labels[:, 1:]
    is_response = targets != -100
    lengths = is_response.sum(-1).clamp(max=max_positions)
    width = max(int(lengths.max()), 1)
    soft = logits.new_zeros(logits.shape[0], width, logits.shape[-1])
    mask = torch.zeros(logits.shape[0], width, dtype=torch.long, device=logits.device)
    for row in range(logits.shape[0]):
        n = int(lengths[row])
        if n == 0:
            continue
        picked = shifted_logits[row][is_response[row]][:n]
        soft[row, :n] = F.gumbel_softmax(picked.float(), tau=tau, hard=hard, dim=-1).to(soft.dtype)
        mask[row, :n] = 1
    return soft, mask


class SoftTokenReward(nn.Module):
    """Frozen encoder classifier scoring soft tokens; only `projection` is trainable (variant `project`)."""

    min_tokens = 1

    def __init__(self, reward_model: nn.Module, policy_hidden: int, tokenizer=None):
        super().__init__()
        encoder = reward_model.base_model
        if not hasattr(reward_model, "classifier") or not hasattr(encoder, "embeddings"):
            raise ValueError("rl.draft.reward_model: DRaFT needs an encoder classifier (BERT-like, "
                             "reward_model.kind: classifier)")
        self.projection = nn.Linear(policy_hidden, reward_model.config.hidden_size)
        # Kept out of state_dict()/parameters(): the RM is frozen and is saved by its own stage.
        object.__setattr__(self, "reward_model", reward_model.eval().requires_grad_(False))
        object.__setattr__(self, "tokenizer", tokenizer)  # the RM's own, to score real text
        self.max_positions = int(reward_model.config.max_position_embeddings)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """The reward from the classifier's logits: P(class 1)."""
        return class_one_probability(logits)

    @torch.no_grad()
    def text_scores(self, texts: list[str]) -> torch.Tensor:
        """The reward model's score of real text through its own tokenizer: what the bridge is fitted to."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_positions,
                               return_tensors="pt").to(self.reward_model.device)
        return self.score(self.reward_model(**batch).logits)

    @property
    def trainable(self) -> nn.Module:
        """What trains with the adapter and is saved beside the model."""
        return self.projection

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean pool over the real tokens, then the classifier head (BERT: pooler dense + tanh, classifier)."""
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        pooler = getattr(self.reward_model.base_model, "pooler", None)
        if pooler is not None:
            pooled = pooler.activation(pooler.dense(pooled))
        return self.reward_model.classifier(pooled)

    def forward(self, soft_tokens: torch.Tensor, embedding_matrix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.score_embedded(soft_tokens @ embedding_matrix.to(soft_tokens.dtype), mask)

    def score_embedded(self, token_embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The reward of tokens given as policy input embeddings (soft: a mix of rows; one-hot: the rows)."""
        projected = self.projection(token_embeddings)
        hidden = self.reward_model.base_model(inputs_embeds=projected, attention_mask=mask).last_hidden_state
        return self.score(self.head(hidden, mask))


class DraftNotebookSoftTokenReward(SoftTokenReward):
    """The DRaFT notebook's reward path (variant `draft_notebook`): + position embeddings -> a new trainable
    LayerNorm -> the encoder layers, bypassing the embedding block; the reward is the raw class-1 logit. Rows
    with fewer than 2 response tokens get no reward (their mask is dropped and they are left out of the mean)."""

    min_tokens = 2

    def __init__(self, reward_model: nn.Module, policy_hidden: int, tokenizer=None):
        super().__init__(reward_model, policy_hidden, tokenizer)
        config = reward_model.config
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=getattr(config, "layer_norm_eps", 1e-12))
        self.parts = nn.ModuleDict({"projection": self.projection, "layer_norm": self.layer_norm})

    @property
    def trainable(self) -> nn.Module:
        return self.parts

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1]  # class 1's logit (a one-logit verifier: its logit)

    def score_embedded(self, token_embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        encoder = self.reward_model.base_model
        projected = self.projection(token_embeddings)
        positions = torch.arange(projected.shape[1], device=projected.device)
        hidden = self.layer_norm(projected + encoder.embeddings.position_embeddings(positions)[None])
        attention = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=mask)
        hidden = encoder.encoder(hidden, attention_mask=attention).last_hidden_state
        return self.score(self.head(hidden, mask))


VARIANTS = {"project": SoftTokenReward, "draft_notebook": DraftNotebookSoftTokenReward}


def load_reward_model(path: str | Path):
    """The frozen encoder classifier and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"rl.draft.reward_model: no model at '{path}' (run the reward_model stage with "
                                "reward_model.kind: classifier)")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(path)


def fit_bridge(reward: SoftTokenReward, embedding_matrix: torch.Tensor, policy_tokenizer, texts: list[str],
               steps: int, learning_rate: float, seed: int, batch_size: int = 16) -> list[dict]:
    """Fit the bridge (the reward's trainable parts) so that real text, fed as one-hot policy tokens, scores as
    the reward model scores the same text through its own tokenizer: mean-squared error, Adam, a fifth of the
    texts held out. Returns two log entries, `bridge_fit_error` (mean absolute error on the held-out texts)
    before and after. The policy is not touched; the batches come from a generator of their own (`seed`), so
    the run's global random state is the same with or without a fit."""
    targets = reward.text_scores(texts).detach()
    ids = [policy_tokenizer(t, add_special_tokens=False)["input_ids"][:reward.max_positions] or [0] for t in texts]
    token_ids, mask = pad(ids, pad_id=0)  # right-padded; padding is masked out of the encoder and the pool
    table = embedding_matrix.detach()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    held_out, fitted = order[: max(1, len(texts) // 5)], order[max(1, len(texts) // 5):]
    if len(fitted) == 0:
        raise ValueError(f"rl.draft.bridge_fit_steps: fitting the bridge needs at least 2 texts, got {len(texts)} "
                         "(raise rl.max_prompts, or set bridge_fit_steps 0 and train_bridge true)")

    def scores(rows: torch.Tensor) -> torch.Tensor:
        return reward.score_embedded(table[token_ids[rows]].to(table.device), mask[rows].to(table.device))

    def held_out_error() -> float:
        with torch.no_grad():
            return float((scores(held_out) - targets[held_out]).abs().mean())

    best_error = held_out_error()
    log = [{"step": 0, "bridge_fit_error": best_error, "bridge_fit": "before"}]
    best_state = {k: v.clone() for k, v in reward.trainable.state_dict().items()}
    optimizer = torch.optim.Adam(reward.trainable.parameters(), lr=learning_rate)
    batches = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        rows = fitted[torch.randperm(len(fitted), generator=batches)[:batch_size]]
        loss = F.mse_loss(scores(rows), targets[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps:  # keep the best bridge seen on the held-out texts: never a worse one
            error = held_out_error()
            if error < best_error:
                best_error, best_state = error, {k: v.clone() for k, v in reward.trainable.state_dict().items()}
    reward.trainable.load_state_dict(best_state)
    log.append({"step": 0, "bridge_fit_error": best_error, "bridge_fit": "after", "bridge_fit_steps": steps,
                "bridge_fit_texts": len(fitted)})
    return log


def gradient_norm(loss: torch.Tensor, parameters: list[torch.Tensor]) -> float:
    """||d loss / d parameters||, the graph kept for the backward pass that follows."""
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def balanced_weight(model, lm_loss: torch.Tensor, reward: torch.Tensor, beta: float) -> tuple[float, float]:
    """The reward's weight that makes its gradient beta times the LM loss's, both measured on the trainable
    weights (the LM loss's already carries the accumulation scale, so the weight does too); and the raw
    ratio ||grad reward|| / ||grad LM loss||."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    lm_norm, reward_norm = gradient_norm(lm_loss, trainable), gradient_norm(reward, trainable)
    return beta * lm_norm / max(reward_norm, 1e-12), reward_norm / max(lm_norm, 1e-12)


def decoded_reward_callback(reward: SoftTokenReward, tokenizer, prompts: list[str], every: int,
                            max_new_tokens: int = 64):
    """A TrainerCallback: before the first step and every `every` steps, greedy replies to `prompts`, decoded
    and scored by the reward model on their text (`decoded_reward` in the log): whether a reward gain shows
    on what the policy writes, not only on its soft tokens."""
    from transformers import TrainerCallback

    class DecodedReward(TrainerCallback):
        def measure(self, model, state) -> None:
            was_training = model.training
            model.eval()
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            state.log_history.append({"step": state.global_step,
                                      "decoded_reward": float(reward.text_scores(replies).mean())})
            model.train(was_training)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:  # a resumed run already has its first measurement
                self.measure(model, state)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self.measure(model, state)

    return DecodedReward()


def make_trainer_class():
    """DraftTrainer, built lazily: importing TRL takes seconds."""
    from trl import SFTTrainer

    class DraftTrainer(SFTTrainer):
        def __init__(self, *args, reward: SoftTokenReward, beta: float, warmup_steps: int, tau: float, hard: bool,
                     balance: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.balance = balance
            reward.trainable.to(self.args.device)  # the Trainer already placed the policy; on a GPU these follow it
            reward.reward_model.to(self.args.device)
            self.model.add_module("draft_projection", reward.trainable)  # trained and checkpointed with the adapters
            self.reward, self.beta, self.warmup_steps, self.tau, self.hard = reward, beta, warmup_steps, tau, hard

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            lm_loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                    num_items_in_batch=num_items_in_batch)
            soft, mask = response_soft_tokens(outputs.logits, labels, self.tau, self.hard, self.reward.max_positions)
            embeddings = self.model.get_input_embeddings().weight
            scored = mask.sum(-1) >= self.reward.min_tokens  # the notebook skips rows with fewer than 2 tokens
            if bool(scored.any()):
                reward = self.reward(soft[scored], embeddings, mask[scored]).mean()
            else:  # nothing to score in this batch: the LM loss alone
                reward = soft.sum() * 0.0
            beta = beta_at(self.state.global_step, self.beta, self.warmup_steps)
            # The LM loss arrives already divided for gradient accumulation when the model took num_items_in_batch;
            # the reward term must be divided the same way or it would weigh `accumulation` times more.
            scaled_for_accumulation = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            scale = 1.0 / self.current_gradient_accumulation_steps if scaled_for_accumulation else 1.0
            mode = "train" if self.model.training else "eval"
            weight = beta * scale
            if self.balance and beta > 0 and reward.requires_grad and self.model.training:
                weight, ratio = balanced_weight(model, lm_loss, reward, beta)
                self._metrics[mode]["reward_grad_ratio"].append(ratio * scale)
            loss = lm_loss - weight * reward
            self._metrics[mode]["lm_loss"].append(float(lm_loss.detach()) / scale)
            self._metrics[mode]["reward"].append(float(reward.detach()))
            self._metrics[mode]["beta"].append(beta)
            self._metrics[mode]["reward_weight"].append(weight / scale)
            return (loss, outputs) if return_outputs else loss

        # PEFT checkpoints hold the adapter only: the projection travels beside it so a resumed run continues it.
        def _save(self, output_dir=None, state_dict=None):
            from safetensors.torch import save_file

            super()._save(output_dir, state_dict)
            save_file(projection_state(self), str(Path(output_dir or self.args.output_dir) / PROJECTION_FILE))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from safetensors.torch import load_file

            super()._load_from_checkpoint(resume_from_checkpoint, model)
            saved = Path(resume_from_checkpoint) / PROJECTION_FILE
            if saved.exists():
                self.reward.trainable.load_state_dict(load_file(str(saved)))

    return DraftTrainer


def projection_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in trainer.reward.trainable.state_dict().items()}


NAME = "draft"


def run(params, model_dir: Path, dataset, checkpoint_dir: Path):
    """Returns (policy with its adapter, tokenizer, log history, {file: tensors to save beside the model})."""
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig

    from posttrain.evaluation.prompts import prompt_text, sft_pairs
    from posttrain.training.trainer import lora_config, train_resumable, trainer_kwargs

    cfg = params.rl.draft
    if cfg.training.get("loss_type", "nll") != "nll":
        raise ValueError("rl.draft.training.loss_type: DRaFT needs the logits, so only 'nll' is possible")
    set_seed(params.seed)  # before any weights are built: LoRA A and the projection start the same every run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    embeddings = policy.get_input_embeddings().weight
    reward_model, reward_tokenizer = load_reward_model(cfg.reward_model)
    reward = VARIANTS[cfg.variant](reward_model, embeddings.shape[1], reward_tokenizer)
    fit_log = fit_bridge(reward, embeddings, tokenizer, [t for row in dataset for t in (row["question"], row["solution"])],
                         cfg.bridge_fit_steps, 1e-3, params.seed) if cfg.bridge_fit_steps else []
    reward.trainable.requires_grad_(cfg.train_bridge or not cfg.bridge_fit_steps)  # a bridge never fitted must learn
    monitor_rows = dataset.select(range(min(4, len(dataset))))
    monitor_prompts = [prompt_text(row["question"], params.eval, tokenizer) for row in monitor_rows]
    pairs = sft_pairs(dataset, params.eval)
    args = SFTConfig(**trainer_kwargs(cfg.training, checkpoint_dir, params.seed) | {"loss_type": "nll"})
    left_padded = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    callbacks = [decoded_reward_callback(reward, left_padded, monitor_prompts, cfg.monitor_every)] if cfg.monitor_every else []
    trainer = make_trainer_class()(
        model=policy, args=args, train_dataset=pairs, processing_class=tokenizer, callbacks=callbacks,
        peft_config=lora_config(params.rl.lora), reward=reward, beta=cfg.beta, warmup_steps=cfg.warmup_steps,
        tau=cfg.tau, hard=cfg.hard, balance=cfg.balance,
    )
    train_resumable(trainer, checkpoint_dir, "DRaFT", dataclasses.asdict(params.rl), params.seed, str(model_dir),
                    params.eval.prompt_style, params.eval.system_prompt)
    trainer.model._modules.pop("draft_projection")  # not part of the policy that gets merged and saved
    history = fit_log + trainer.state.log_history
    return trainer.model, tokenizer, history, {PROJECTION_FILE: projection_state(trainer)}
