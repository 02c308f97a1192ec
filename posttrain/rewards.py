"""Reward functions by name, following TRL's contract `(completions, **columns) -> list[float]`.

Extra dataset columns (GSM8K's `answer`) reach a reward as keyword arguments. `rl.rewards` in
params.yaml maps reward names to weights; GRPOConfig.reward_weights carries the weights.
"""

from __future__ import annotations

from typing import Callable

from posttrain.gsm8k import extract_flexible, extract_strict, numbers_match

RewardFn = Callable[..., list[float]]
REGISTRY: dict[str, RewardFn] = {}


def register(name: str):
    def wrap(fn: RewardFn) -> RewardFn:
        fn.__name__ = name  # TRL logs each reward under its function's name
        REGISTRY[name] = fn
        return fn

    return wrap


def completion_text(completion) -> str:
    """A completion is a string (plain prompts) or a list of chat messages (conversational)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion)


@register("exact_match")
def exact_match(completions, answer, **_) -> list[float]:
    """1.0 when the extracted number equals the GSM8K reference numerically."""
    return [float(numbers_match(extract_flexible(completion_text(c)), gold)) for c, gold in zip(completions, answer)]


@register("format")
def format_reward(completions, **_) -> list[float]:
    """1.0 when the completion ends its reasoning with a `#### <number>` line."""
    return [float(extract_strict(completion_text(c)) is not None) for c in completions]


@register("length_penalty")
def length_penalty(completions, **_) -> list[float]:
    """-1.0 for an empty completion scaling to 0 at 200 characters: discourages giving up early."""
    return [min(len(completion_text(c)), 200) / 200.0 - 1.0 for c in completions]


def build(spec: dict[str, float]) -> tuple[list[RewardFn], list[float]]:
    unknown = sorted(set(spec) - set(REGISTRY))
    if unknown:
        raise ValueError(f"rl.rewards: unknown reward(s) {unknown}; known: {sorted(REGISTRY)}")
    return [REGISTRY[name] for name in spec], [float(weight) for weight in spec.values()]
