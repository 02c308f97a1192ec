"""The prompt protocol shared by SFT, RL and evaluation, for every task.

Training and evaluation build prompts with the same function, so a model is evaluated in the
format it was trained on; the protocol (style, shots, system prompt, ...) is hashed and recorded
with every result so two numbers are compared only under one protocol. A task (posttrain/tasks/)
says what a record's user message and reference reply are; everything here works on that pair.
"""

from __future__ import annotations

import hashlib
import json

from posttrain.config import EvalConfig
from posttrain.tasks import gsm8k
from posttrain.tasks.gsm8k import target_text  # noqa: F401  (the GSM8K training target; tests import it here)

EXTRACTION_VERSION = "gsm8k-extract-v1"  # bump when posttrain.gsm8k changes what it extracts


def _plain_block(user: str, reference: str | None = None) -> str:
    text = f"Question: {user}\nAnswer:"
    return text if reference is None else f"{text} {reference}\n\n"


def prompt_messages(user: str, cfg: EvalConfig, shots: list[tuple[str, str]] | None = None) -> list[dict]:
    """System prompt, k-shot (user, reference) examples, then the user message."""
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for shot_user, shot_reference in shots or []:
        messages += [{"role": "user", "content": shot_user}, {"role": "assistant", "content": shot_reference}]
    return messages + [{"role": "user", "content": user}]


def prompt_text(user: str, cfg: EvalConfig, tokenizer, shots: list[tuple[str, str]] | None = None) -> str:
    """The exact string fed to the model (the chat template applied, or the plain format)."""
    if cfg.prompt_style == "chat":
        return tokenizer.apply_chat_template(
            prompt_messages(user, cfg, shots), tokenize=False, add_generation_prompt=True
        )
    if cfg.prompt_style == "plain":
        return "".join(_plain_block(u, r) for u, r in shots or []) + _plain_block(user)
    raise ValueError(f"eval.prompt_style must be 'chat' or 'plain', got {cfg.prompt_style!r}")


def completion_example(user: str, reference: str, cfg: EvalConfig) -> dict:
    """A prompt-completion example for TRL's SFTTrainer; the prompt is masked out of the loss."""
    if cfg.prompt_style == "chat":
        return {"prompt": prompt_messages(user, cfg), "completion": [{"role": "assistant", "content": reference}]}
    return {"prompt": _plain_block(user), "completion": " " + reference + "\n"}


def sft_example(record: dict, cfg: EvalConfig, task=gsm8k) -> dict:
    """A task record as an SFT example: its user message -> its reference reply."""
    return completion_example(*task.prompt_and_reference(record), cfg)


def sft_pairs(rl_rows, cfg: EvalConfig):
    """rl_prompt rows (question = user message, solution = reference columns) -> a prompt-completion Dataset:
    the pairs DRaFT and the hybrid trainer take their LM loss on."""
    from datasets import Dataset

    return Dataset.from_list([completion_example(row["question"], row["solution"], cfg) for row in rl_rows])


def rl_prompt(record: dict, cfg: EvalConfig, task=gsm8k) -> dict:
    """A prompt for RL trainers; the task's reward columns (gsm8k: answer), the user message (question) and
    the reference reply (solution) travel along as columns for the rewards."""
    user, reference = task.prompt_and_reference(record)
    prompt = prompt_messages(user, cfg) if cfg.prompt_style == "chat" else _plain_block(user)
    return {"prompt": prompt, **task.reward_columns(record), "question": user, "solution": reference}


def protocol(cfg: EvalConfig, task_protocol: dict | None = None) -> dict:
    """What decides a score: the prompt format, decoding, extraction, and what the task adds (its judge,
    thresholds). GSM8K adds nothing, so its hash is the one recorded before tasks existed."""
    return {
        "prompt_style": cfg.prompt_style,
        "shots": cfg.shots,
        "system_prompt": cfg.system_prompt,
        "max_new_tokens": cfg.max_new_tokens,
        "dtype": cfg.dtype,
        "decoding": "greedy",
        "extraction": EXTRACTION_VERSION,
        **(task_protocol or {}),
    }


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
