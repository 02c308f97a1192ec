"""What each task declares for params: its metrics, what `task` stands for in params, its system prompt.

Each task module (gsm8k.py, style.py, chat.py) reads its own entry as `DEFAULTS`; posttrain/config/ reads
`TASKS` to check `data.task` and to resolve the params that say `task`. This module imports nothing of the
project, so loading params imports no task code and a stage's DVC deps stay its own (the base stage does not
depend on answer extraction). posttrain/tasks/registry.py maps the same names to the task modules and
refuses to import when the two disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# rl.ppo fields params leave unset, for tasks without their own (chat has the StrictBot notebook's)
PROJECT_PPO_DEFAULTS = {"kl_coef": 0.05, "response_length": 64, "temperature": 0.8}


@dataclass(frozen=True)
class TaskDefaults:
    """One task's declaration: what params may say `task` for, and what the evaluation reports."""

    name: str  # data.task
    system_prompt: str  # data.<task>.system_prompt's default (what eval.system_prompt `task` stands for)
    metrics: tuple[str, ...]  # per-item booleans correct_<m>, reported as accuracy_<m>
    primary_metric: str  # promote.metric `task`
    rewards: dict  # rl.rewards when params leave it empty
    ppo: dict = field(default_factory=lambda: dict(PROJECT_PPO_DEFAULTS))  # rl.ppo fields params leave unset
    ppo_rewards: dict | None = None  # rl.rewards for rl.method ppo when params leave it empty (None: `rewards`)
    reward_model_kind: str = "classifier"  # reward_model.kind `task`
    ppo_reward_model_kind: str = "pairwise"  # ... when rl.method is ppo (it scores the policy's own token ids)
    scores: tuple[str, ...] = ()  # per-item numbers (record fields) promote.metric may name instead of a pass
    text: bool = False  # free text: a reply that did not end, loops or copies its input fails (eval.max_*)
    sft_max_steps: int = 16  # sft.training.max_steps `task`: the quick SFT budget whose replies end by themselves


GSM8K = TaskDefaults(
    "gsm8k", "Solve the math problem step by step. End with a line '#### <number>'.",
    ("strict", "flexible"), "flexible", {"exact_match": 1.0, "format": 0.2})

# text tasks: the reward also sees what the evaluation fails, a reply cut off at the token limit (DAPO's
# soft overlong punishment) and loops (repeated n-grams): trl.rewards' helpers, posttrain/rewards/rule_based.py
STYLE = TaskDefaults(
    "style", ("You are a poet. Whatever the user writes, answer with a short rhyming poem of two to four lines that "
              "says the same thing."),
    ("pass", "style", "content"), "pass", {"style": 1.0, "overlong": 1.0, "repetition": 0.5},
    scores=("judge_p_poem",),
    # 16 steps: replies loop to the token limit on 26-28 of 40 items; 64: 40/40 end (issue 30)
    text=True, sft_max_steps=64)

# PPO on the learned reward alone, with the StrictBot notebook's kl_coef, response_length and temperature.
# The gate reads the judge margin: `pass` (beat the reference under the judge) sat at 0-1 of 40 for every
# model while the margin moved from -12.8 (base) to -9.9 (SFT).
CHAT = TaskDefaults(
    "chat", ("You are a strict tutor. Never give the final answer. Reply in at most two sentences: name the concept "
             "or first step the student should use, then end with a question that makes them do the next step "
             "themselves. No exclamation marks."),
    ("pass",), "judge_margin", {"cosine_sts": 1.0, "overlong": 1.0, "repetition": 0.5},
    ppo={"kl_coef": 0.03, "response_length": 32, "temperature": 0.7}, ppo_rewards={},
    reward_model_kind="mlp_head", ppo_reward_model_kind="mlp_head", scores=("judge_margin",), text=True)

TASKS = {task.name: task for task in (GSM8K, STYLE, CHAT)}
