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

    total loss = LM loss - beta_t * mean(reward),   beta_t = beta * min(1, step / warmup_steps)

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

    def __init__(self, reward_model: nn.Module, policy_hidden: int):
        super().__init__()
        encoder = reward_model.base_model
        if not hasattr(reward_model, "classifier") or not hasattr(encoder, "embeddings"):
            raise ValueError("rl.draft.reward_model: DRaFT needs an encoder classifier (BERT-like, "
                             "reward_model.kind: classifier)")
        self.projection = nn.Linear(policy_hidden, reward_model.config.hidden_size)
        # Kept out of state_dict()/parameters(): the RM is frozen and is saved by its own stage.
        object.__setattr__(self, "reward_model", reward_model.eval().requires_grad_(False))
        self.max_positions = int(reward_model.config.max_position_embeddings)

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
        projected = self.projection(soft_tokens @ embedding_matrix.to(soft_tokens.dtype))
        hidden = self.reward_model.base_model(inputs_embeds=projected, attention_mask=mask).last_hidden_state
        return class_one_probability(self.head(hidden, mask))


class DraftNotebookSoftTokenReward(SoftTokenReward):
    """The DRaFT notebook's reward path (variant `draft_notebook`): + position embeddings -> a new trainable
    LayerNorm -> the encoder layers, bypassing the embedding block; the reward is the raw class-1 logit. Rows
    with fewer than 2 response tokens get no reward (their mask is dropped and they are left out of the mean)."""

    min_tokens = 2

    def __init__(self, reward_model: nn.Module, policy_hidden: int):
        super().__init__(reward_model, policy_hidden)
        config = reward_model.config
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=getattr(config, "layer_norm_eps", 1e-12))
        self.parts = nn.ModuleDict({"projection": self.projection, "layer_norm": self.layer_norm})

    @property
    def trainable(self) -> nn.Module:
        return self.parts

    def forward(self, soft_tokens: torch.Tensor, embedding_matrix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        encoder = self.reward_model.base_model
        projected = self.projection(soft_tokens @ embedding_matrix.to(soft_tokens.dtype))
        positions = torch.arange(projected.shape[1], device=projected.device)
        hidden = self.layer_norm(projected + encoder.embeddings.position_embeddings(positions)[None])
        attention = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=mask)
        hidden = encoder.encoder(hidden, attention_mask=attention).last_hidden_state
        return self.head(hidden, mask)[:, -1]  # class 1's logit (a one-logit verifier: its logit)


VARIANTS = {"project": SoftTokenReward, "draft_notebook": DraftNotebookSoftTokenReward}


def load_reward_model(path: str | Path):
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"rl.draft.reward_model: no model at '{path}' (run the reward_model stage with "
                                "reward_model.kind: classifier)")
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True)


def make_trainer_class():
    """DraftTrainer, built lazily: importing TRL takes seconds."""
    from trl import SFTTrainer

    class DraftTrainer(SFTTrainer):
        def __init__(self, *args, reward: SoftTokenReward, beta: float, warmup_steps: int, tau: float, hard: bool,
                     **kwargs):
            super().__init__(*args, **kwargs)
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
            loss = lm_loss - beta * reward * scale
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["lm_loss"].append(float(lm_loss.detach()) / scale)
            self._metrics[mode]["reward"].append(float(reward.detach()))
            self._metrics[mode]["beta"].append(beta)
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

    from posttrain.evaluation.prompts import sft_pairs
    from posttrain.training.trainer import lora_config, train_resumable, trainer_kwargs

    cfg = params.rl.draft
    if cfg.training.get("loss_type", "nll") != "nll":
        raise ValueError("rl.draft.training.loss_type: DRaFT needs the logits, so only 'nll' is possible")
    set_seed(params.seed)  # before any weights are built: LoRA A and the projection start the same every run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    reward = VARIANTS[cfg.variant](load_reward_model(cfg.reward_model), policy.get_input_embeddings().weight.shape[1])
    dataset = sft_pairs(dataset, params.eval)
    args = SFTConfig(**trainer_kwargs(cfg.training, checkpoint_dir, params.seed) | {"loss_type": "nll"})
    trainer = make_trainer_class()(
        model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(params.rl.lora), reward=reward, beta=cfg.beta, warmup_steps=cfg.warmup_steps,
        tau=cfg.tau, hard=cfg.hard,
    )
    train_resumable(trainer, checkpoint_dir, "DRaFT", dataclasses.asdict(params.rl), params.seed, str(model_dir),
                    params.eval.prompt_style, params.eval.system_prompt)
    trainer.model._modules.pop("draft_projection")  # not part of the policy that gets merged and saved
    return trainer.model, tokenizer, trainer.state.log_history, {PROJECTION_FILE: projection_state(trainer)}
