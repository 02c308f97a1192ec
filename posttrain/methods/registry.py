"""rl.method -> the method's `run` (posttrain/methods/__init__.py says what a method module provides)."""

from __future__ import annotations

from posttrain.methods import NAMES, draft, grpo, hybrid, ppo, reinforce

METHODS = {module.NAME: module.run for module in (grpo, reinforce, ppo, draft, hybrid)}
assert set(METHODS) == set(NAMES), "every module in posttrain/methods/ is a method with NAME and run()"


def get(name: str):
    if name not in METHODS:
        raise ValueError(f"rl.method: unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
