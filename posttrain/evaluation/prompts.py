"""The prompt protocol shared by SFT, RL and evaluation, for every task.

Training and evaluation build prompts with the same function, so a model is evaluated in the
format it was trained on; the protocol (style, shots, system prompt, ...) is hashed and recorded
with every result so two numbers are compared only under one protocol. A task (posttrain/tasks/)
says what a record's user message and reference reply are; everything here works on that pair.
"""

from __future__ import annotations

import hashlib
import json

from posttrain.config.schema import EvalConfig
from posttrain.tasks import gsm8k
from posttrain.tasks.gsm8k import target_text  # noqa: F401  (the GSM8K training target; tests import it here)

EXTRACTION_VERSION = "gsm8k-extract-v1"  # bump when posttrain.tasks.gsm8k_answers changes what it extracts


def _plain_block(user: str, reference: str | None = None) -> str:
    text = f"Question: {user}\nAnswer:"
    return text if reference is None else f"{text} {reference}\n\n"


STRICTBOT_TEMPLATE = "<|user|> {user} <|end|>\n<|assistant|>"  # StrictBot notebook: a literal prompt, no chat template


def _strictbot_block(user: str, reference: str | None = None) -> str:
    text = STRICTBOT_TEMPLATE.format(user=user)
    return text if reference is None else f"{text} {reference} <|end|>\n"


def _strictbot_text(user: str, cfg: EvalConfig, shots: list[tuple[str, str]] | None = None) -> str:
    """StrictBot's format; a system prompt, when one is set, goes first in the same style."""
    system = f"<|system|> {cfg.system_prompt} <|end|>\n" if cfg.system_prompt else ""
    return system + "".join(_strictbot_block(u, r) for u, r in shots or []) + _strictbot_block(user)


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
    if cfg.prompt_style == "strictbot":
        return _strictbot_text(user, cfg, shots)
    raise ValueError(f"eval.prompt_style must be 'chat', 'plain' or 'strictbot', got {cfg.prompt_style!r}")


def completion_example(user: str, reference: str, cfg: EvalConfig) -> dict:
    """A prompt-completion example for TRL's SFTTrainer; the prompt is masked out of the loss."""
    if cfg.prompt_style == "chat":
        return {"prompt": prompt_messages(user, cfg), "completion": [{"role": "assistant", "content": reference}]}
    if cfg.prompt_style == "strictbot":  # the trainer appends EOS, where a reply ends
        return {"prompt": _strictbot_text(user, cfg), "completion": " " + reference}
    return {"prompt": _plain_block(user), "completion": " " + reference + "\n"}


def reply_text(reply: str, cfg: EvalConfig) -> str:
    """A reply as it follows the prompt text in the model's input: what SFT trained after the prompt (the
    chat template's assistant turn holds the reply itself; the string formats start it with a space)."""
    return reply.strip() if cfg.prompt_style == "chat" else " " + reply.strip()


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
    prompt = (prompt_messages(user, cfg) if cfg.prompt_style == "chat" else
              _strictbot_text(user, cfg) if cfg.prompt_style == "strictbot" else _plain_block(user))
    return {"prompt": prompt, **task.reward_columns(record), "question": user, "solution": reference}


# A prompt format is recorded in the protocol under the name its results were first hashed with: a rename of the
# params value must not change a recorded hash (the gate refuses to pair two hashes). Kept after the old params
# name is refused.
PROTOCOL_NAMES = {"strictbot": "seed"}


def protocol_name(value: str) -> str:
    """The name a prompt style or format has in the protocol (and so in its hash)."""
    return PROTOCOL_NAMES.get(value, value)


def protocol(cfg: EvalConfig, task_protocol: dict | None = None) -> dict:
    """What decides a score: the prompt format, decoding, extraction, and what the task adds (its judge,
    thresholds). GSM8K adds nothing, so its hash is the one recorded before tasks existed."""
    return {
        "prompt_style": protocol_name(cfg.prompt_style),
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
