"""PPO (`rl.method: ppo`) on TRL's experimental PPOTrainer: kept behind this one module so it can be replaced.

    posttrain stage rl -S rl.method=ppo -S reward_model.kind=mlp_head    # or kind pairwise: an LM reward model

trl 1.12.0 is the last release that ships PPO (`trl.experimental.ppo`). The pieces:
  policy     the merged SFT model + a LoRA adapter (`rl.lora`); only the adapter trains
  reference  the same policy with its adapter disabled (ref_model=None + peft_config): frozen by construction
  value      started from the reward model and trained alongside the adapter: kind pairwise, a full copy
             (LM + linear head, all weights train); kind mlp_head, the same frozen base with a copy of
             the trained MLP head, only the head trains
  reward     the reward model (pairwise: LM + scalar head; mlp_head: frozen base + MLP head, the StrictBot
             notebook's), frozen, plus the rule-based terms of `rl.rewards` (exact_match against the gold
             answer, format, ...) added to its score by RuleAugmentedReward; no terms = the RM alone
Per token the policy is paid -kl_coef * KL(policy || reference) and the sequence score at its last token
(PPOConfig.kl_coef, kl_estimator). `rl.ppo` holds PPOConfig fields; `reward_model_path` picks the folder.

TRL logs objective/scores, objective/kl, loss/policy_avg ...; `reward` (= objective/scores) and `kl`
(= objective/kl) are added to each log entry so the rl stage metrics and the report read PPO like GRPO.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from posttrain.config.schema import Params

# Project defaults under `rl.ppo`: one PPO epoch per rollout (the quick CPU profile), a stop at EOS, no
# checkpoints (PPOTrainer cannot resume from one) and no sample tables (they need an eval set and `rich`).
PPO_DEFAULTS = {
    "num_ppo_epochs": 1,
    "num_mini_batches": 1,
    "response_length": 64,
    "stop_token": "eos",
    "num_sample_generations": 0,
    "save_strategy": "no",
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "reward_model_path": "models/reward_model",
}

LOG_ALIASES = {"reward": "objective/scores", "kl": "objective/kl"}


def ppo_config(params: Params, checkpoint_dir: str | Path, model_dir: str | Path = ""):
    """PPOConfig from `rl.ppo` over the project defaults (device precision, seed, output dir)."""
    from trl.experimental.ppo import PPOConfig

    from posttrain.training.trainer import trainer_kwargs

    settings = PPO_DEFAULTS | {"sft_model_path": str(model_dir)} | dict(params.rl.ppo)
    return PPOConfig(**trainer_kwargs(settings, checkpoint_dir, params.seed))


def check_reward_model_kind(params: Params) -> None:
    from posttrain.config.schema import PPO_REWARD_MODEL_KINDS

    if params.reward_model.kind not in PPO_REWARD_MODEL_KINDS:
        raise ValueError(f"rl.method=ppo needs an LM reward model, but reward_model.kind is "
                         f"{params.reward_model.kind!r}: set reward_model.kind: pairwise (or mlp_head) and rerun the "
                         "reward_model stage")


def distinct_pad(tokenizer, prompts_ids: list[list[int]]) -> None:
    """PPOTrainer treats every pad id as padding (masked out, even inside a prompt): pick a pad that is
    neither EOS nor in any prompt. SmolLM2 pads with <|im_end|>, which every chat prompt contains."""
    used = {t for ids in prompts_ids for t in ids}
    if tokenizer.pad_token_id not in (None, tokenizer.eos_token_id) and tokenizer.pad_token_id not in used:
        return
    vocab = tokenizer.get_vocab()
    for token in (tokenizer.unk_token, "<|endoftext|>", "<pad>", "<|pad|>"):
        if token in vocab and vocab[token] != tokenizer.eos_token_id and vocab[token] not in used:
            tokenizer.pad_token = token
            return
    raise ValueError("rl.method=ppo: the tokenizer has no pad token distinct from EOS and unused by the prompts; "
                     "PPOTrainer would mask the prompts (give the base model's tokenizer a pad token)")


class _RecordingBackbone(nn.Module):
    """The reward model's transformer; remembers the token ids of the last call for the rule-based terms."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.inner = backbone
        self.last_ids: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def forward(self, input_ids, attention_mask, **kwargs):
        self.last_ids, self.last_mask = input_ids.detach(), attention_mask.detach()
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class RuleAugmentedReward(nn.Module):
    """A TRL PPO reward model: the sequence classifier's score plus weighted rule-based rewards.

    PPOTrainer scores a batch with `trl.experimental.utils.get_reward`, which runs
    `getattr(model, model.base_model_prefix)` on the query+response ids and then `model.score(hidden)`,
    and reads the value at each sequence's last token. This module keeps that contract: the backbone
    records the ids, `score` adds, to every position, the rule rewards of the decoded response for the
    prompt's dataset row (found by the prompt's token ids). `stats()` returns the batch means for the logs.
    """

    base_model_prefix = "backbone"

    def __init__(self, reward_model: nn.Module, tokenizer, rows_by_prompt: dict[tuple[int, ...], dict],
                 reward_funcs: list, weights: list[float]):
        super().__init__()
        self.backbone = _RecordingBackbone(getattr(reward_model, reward_model.base_model_prefix))
        self.head = reward_model.score
        self.config = reward_model.config
        self.tokenizer = tokenizer
        self.rows_by_prompt = rows_by_prompt
        self.prompt_lengths = sorted({len(k) for k in rows_by_prompt}, reverse=True)
        self.reward_funcs, self.weights = reward_funcs, weights
        self._stats: dict[str, list[float]] = {}

    def split(self, ids: list[int], mask: list[bool]) -> tuple[dict, list[int]]:
        """(dataset row, response ids) of one left-padded query+response sequence."""
        start = mask.index(True) if True in mask else len(mask)
        for length in self.prompt_lengths:
            row = self.rows_by_prompt.get(tuple(ids[start:start + length]))
            if row is not None and all(mask[start:start + length]):
                response = []
                for token, real in zip(ids[start + length:], mask[start + length:]):
                    if not real:  # get_reward scores up to the first pad: the rules read the same text
                        break
                    response.append(token)
                return row, response
        raise RuntimeError("RuleAugmentedReward: a PPO query matches no training prompt")

    def rule_rewards(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], dict[str, float]]:
        rows, completions, responses = [], [], []
        for seq, seq_mask in zip(ids.tolist(), mask.bool().tolist()):
            row, response = self.split(seq, seq_mask)
            rows.append(row)
            responses.append(response)
            completions.append(self.tokenizer.decode(response, skip_special_tokens=True))
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        per_reward = [fn(completions=completions, completion_ids=responses, **columns) for fn in self.reward_funcs]
        totals = [sum(w * float(values[i] or 0.0) for w, values in zip(self.weights, per_reward))
                  for i in range(len(completions))]
        means = {f"rewards/{getattr(fn, '__name__', 'rule')}": sum(float(v or 0.0) for v in values) / len(values)
                 for fn, values in zip(self.reward_funcs, per_reward)}
        return totals, means

    def score(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden_states)  # (batch, tokens, 1): get_reward picks each sequence's last token
        if not self.reward_funcs:
            return logits
        totals, means = self.rule_rewards(self.backbone.last_ids, self.backbone.last_mask)
        self._record(means)
        bonus = torch.tensor(totals, dtype=logits.dtype, device=logits.device)
        return logits + bonus.view(-1, 1, 1)

    def _record(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._stats.setdefault(key, []).append(value)

    def stats(self) -> dict[str, float]:
        """Mean of each rule reward since the last call (one PPO rollout), then reset."""
        out = {key: sum(v) / len(v) for key, v in self._stats.items() if v}
        self._stats = {}
        return out


def value_learning_rate(params: Params, args) -> float:
    """`rl.value_learning_rate`, else: an mlp_head value model (only its MLP head trains) at the rate that head
    was trained at, a pairwise one (the whole scalar-head LM) at the adapter's rate (`args`: the PPOConfig). At
    the adapter's LoRA rate the chat value head's loss fell only 20.9 -> 12.7 over 8 updates (7.4 at 1e-3)."""
    from posttrain.reward_models import mlp_head

    if params.rl.value_learning_rate:
        return params.rl.value_learning_rate
    if mlp_head.is_mlp_head(Path(args.reward_model_path)):
        return params.reward_model.mlp_head.learning_rate
    return args.learning_rate


def _trainer_class(value_rate: float):
    from trl.experimental.ppo import PPOTrainer

    class LoggingPPOTrainer(PPOTrainer):
        """PPOTrainer whose log entries also carry `reward`/`kl` and the rule-reward means, and whose value
        model trains at its own rate."""

        def create_optimizer(self, model=None):
            """The Trainer's optimizer with the value model's weights moved to groups at `value_rate`."""
            optimizer = super().create_optimizer(model)
            value_ids = {id(p) for p in self.model.value_model.parameters()}
            groups, optimizer.param_groups = optimizer.param_groups, []
            for group in groups:
                for is_value in (False, True):
                    params = [p for p in group["params"] if (id(p) in value_ids) == is_value]
                    if params:
                        optimizer.add_param_group({**group, "params": params,
                                                   "lr": value_rate if is_value else group["lr"]})
            return optimizer

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            logs = dict(logs)
            for alias, key in LOG_ALIASES.items():
                if key in logs:
                    logs[alias] = logs[key]
            if isinstance(self.reward_model, RuleAugmentedReward):
                logs |= self.reward_model.stats()
            super().log(logs, start_time)

    return LoggingPPOTrainer


def load_reward_model(path: str | Path, tokenizer, value: bool = False):
    """The LM reward model, checked to share the policy's vocabulary: a pairwise scalar-head LM, or an
    mlp_head model (frozen base + MLP head). `value`: the copy PPO trains as its value model (mlp_head:
    only the head takes gradients)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.reward_models import mlp_head

    path = Path(path)
    if mlp_head.is_mlp_head(path):
        model, rm_tokenizer, _ = mlp_head.load(path, trainable=value)
        if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"rl.ppo.reward_model_path: the base of '{path}' has another vocabulary than the policy; "
                             "PPO scores the policy's token ids, so train the head on the policy's base")
        return model
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"rl.ppo.reward_model_path: no reward model at '{path}' "
                                "(run the reward_model stage with reward_model.kind: pairwise)")
    config = AutoConfig.from_pretrained(path)
    if config.num_labels != 1 or not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise ValueError(f"rl.ppo.reward_model_path: '{path}' is not a scalar-head sequence classifier "
                         "(run the reward_model stage with reward_model.kind: pairwise)")
    if AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"rl.ppo.reward_model_path: '{path}' has another vocabulary than the policy; PPO scores "
                         "the policy's token ids, so train the reward model from the same base (reward_model.kind: pairwise)")
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True)


def tokenize_prompts(dataset, tokenizer) -> list[list[int]]:
    texts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in dataset["prompt"]]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


NAME = "ppo"


def run(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    """Returns (policy with its adapter, tokenizer, log history), like every method (posttrain/methods/__init__.py)."""
    import shutil

    trainer, tokenizer = build_trainer(params, model_dir, dataset, checkpoint_dir)
    print("ppo: no checkpoints (TRL's PPOTrainer cannot resume); an interrupted run restarts from step 0")
    trainer.train()
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return trainer.accelerator.unwrap_model(trainer.model).policy, tokenizer, trainer.state.log_history


def build_trainer(params: Params, model_dir: Path, dataset, checkpoint_dir: Path):
    """(the PPOTrainer, ready to train; the tokenizer the policy is saved with)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from posttrain.rewards import composition as rewards
    from posttrain.training.trainer import lora_config

    check_reward_model_kind(params)
    args = ppo_config(params, checkpoint_dir, model_dir)
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if batch > len(dataset):  # PPOTrainer drops incomplete batches and would then wait forever for one
        raise ValueError(f"rl.ppo.per_device_train_batch_size x gradient_accumulation_steps = {batch} exceeds the "
                         f"{len(dataset)} prompts (rl.max_prompts); lower it or raise rl.max_prompts")
    set_seed(params.seed)  # before any weights are built: LoRA A starts the same every run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # returned (and saved) unchanged
    ppo_tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    prompt_ids = tokenize_prompts(dataset, ppo_tokenizer)
    distinct_pad(ppo_tokenizer, prompt_ids)
    columns = [c for c in dataset.column_names if c != "prompt"]
    rows_by_prompt = {tuple(ids): {c: row[c] for c in columns} for ids, row in zip(prompt_ids, dataset)}
    reward_funcs, weights = rewards.build(params.rl.rewards, params.rl.reward_postprocess or None) \
        if params.rl.rewards else ([], [])

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    reward_model = load_reward_model(args.reward_model_path, tokenizer).eval().requires_grad_(False)
    value_model = load_reward_model(args.reward_model_path, tokenizer, value=True)
    trainer = _trainer_class(value_learning_rate(params, args))(
        args=args, processing_class=ppo_tokenizer, model=policy, ref_model=None,
        reward_model=RuleAugmentedReward(reward_model, ppo_tokenizer, rows_by_prompt, reward_funcs, weights),
        value_model=value_model, train_dataset=Dataset.from_dict({"input_ids": prompt_ids}),
        peft_config=lora_config(params.rl.lora),
    )
    return trainer, tokenizer
