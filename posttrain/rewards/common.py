"""What every reward module shares: TRL's reward contract, a registry decorator and the completion's text.

A reward follows TRL's contract `(completions, **columns) -> list[float]`: extra dataset columns (GSM8K's
`answer`, `solution`, `question`) reach it as keyword arguments. Each reward module registers factories
`(**options) -> reward function` by name; posttrain/rewards/composition.py builds the registry from them.
"""

from __future__ import annotations

from typing import Callable

RewardFn = Callable[..., list[float]]


def registrar(factories: dict[str, Callable[..., RewardFn]]):
    """A decorator `@register(name)` that records a factory `(**options) -> reward function` in `factories`."""
    def register(name: str):
        def wrap(factory):
            factories[name] = factory
            return factory

        return wrap

    return register


def named(fn: RewardFn, name: str) -> RewardFn:
    fn.__name__ = name  # TRL logs each reward under its function's name
    return fn


def completion_text(completion) -> str:
    """A completion is a string (plain prompts) or a list of chat messages (conversational)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion)


def completion_texts(completions) -> list[str]:
    return [completion_text(c) for c in completions]


def references(columns: dict, reference: str, name: str) -> list[str]:
    """The texts of the dataset column a reward compares against (option `reference`), or a named error."""
    if reference not in columns:
        raise ValueError(f"rl.rewards.{name}: the dataset has no column '{reference}' (option `reference`); "
                         f"columns: {sorted(columns)}")
    return [completion_text(r) for r in columns[reference]]
