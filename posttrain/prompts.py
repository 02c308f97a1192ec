"""The GSM8K prompt protocol shared by SFT, RL and evaluation.

Training and evaluation build prompts with the same function, so a model is evaluated in the
format it was trained on; the protocol (style, shots, system prompt, ...) is hashed and recorded
with every result so two numbers are compared only under one protocol.
"""

from __future__ import annotations

import hashlib
import json

from posttrain.config import EvalConfig
from posttrain.gsm8k import strip_calculator_notes

EXTRACTION_VERSION = "gsm8k-extract-v1"  # bump when posttrain.gsm8k changes what it extracts


def target_text(answer: str) -> str:
    """The worked answer a model is trained to write: prose and `#### n`, no calculator notes."""
    return strip_calculator_notes(answer).strip()


def _plain_block(question: str, answer: str | None = None) -> str:
    text = f"Question: {question}\nAnswer:"
    return text if answer is None else f"{text} {target_text(answer)}\n\n"


def prompt_messages(question: str, cfg: EvalConfig, shots: list[dict] | None = None) -> list[dict]:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for shot in shots or []:
        messages += [
            {"role": "user", "content": shot["question"]},
            {"role": "assistant", "content": target_text(shot["answer"])},
        ]
    return messages + [{"role": "user", "content": question}]


def prompt_text(question: str, cfg: EvalConfig, tokenizer, shots: list[dict] | None = None) -> str:
    """The exact string fed to the model (the chat template applied, or the plain format)."""
    if cfg.prompt_style == "chat":
        return tokenizer.apply_chat_template(
            prompt_messages(question, cfg, shots), tokenize=False, add_generation_prompt=True
        )
    if cfg.prompt_style == "plain":
        return "".join(_plain_block(s["question"], s["answer"]) for s in shots or []) + _plain_block(question)
    raise ValueError(f"eval.prompt_style must be 'chat' or 'plain', got {cfg.prompt_style!r}")


def sft_example(record: dict, cfg: EvalConfig) -> dict:
    """A prompt-completion example for TRL's SFTTrainer; the prompt is masked out of the loss."""
    if cfg.prompt_style == "chat":
        return {
            "prompt": prompt_messages(record["question"], cfg),
            "completion": [{"role": "assistant", "content": target_text(record["answer"])}],
        }
    return {"prompt": _plain_block(record["question"]), "completion": " " + target_text(record["answer"]) + "\n"}


def sft_pairs(rl_rows, cfg: EvalConfig):
    """rl_prompt rows (question, solution columns) -> a prompt-completion Dataset of sft_example rows:
    the question -> worked answer pairs DRaFT and the hybrid trainer take their LM loss on."""
    from datasets import Dataset

    return Dataset.from_list([sft_example({"question": row["question"], "answer": row["solution"]}, cfg)
                              for row in rl_rows])


def rl_prompt(record: dict, cfg: EvalConfig) -> dict:
    """A prompt for RL trainers; answer, question and solution travel along as columns for the rewards."""
    from posttrain.gsm8k import gold_answer

    prompt = prompt_messages(record["question"], cfg) if cfg.prompt_style == "chat" else _plain_block(record["question"])
    return {"prompt": prompt, "answer": gold_answer(record["answer"]), "question": record["question"],
            "solution": target_text(record["answer"])}


def protocol(cfg: EvalConfig) -> dict:
    return {
        "prompt_style": cfg.prompt_style,
        "shots": cfg.shots,
        "system_prompt": cfg.system_prompt,
        "max_new_tokens": cfg.max_new_tokens,
        "dtype": cfg.dtype,
        "decoding": "greedy",
        "extraction": EXTRACTION_VERSION,
    }


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
