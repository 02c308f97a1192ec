"""The task registry: `data.task` -> the module that declares the task. Stages never branch on a name.

Every task module exposes the same few names:

    NAME, DEFAULTS (its entry in posttrain/tasks/defaults.py: what params may say `task` for),
    METRICS (per-item booleans `correct_<m>`, reported as `accuracy_<m>`), PRIMARY_METRIC,
    DEFAULT_REWARDS (rl.rewards when params leave it empty), USES_JUDGE (its evaluation needs the judge stage),
    CLASSIFIER_LABELS (1: a one-logit verifier, 2: a two-class classifier whose class 1 is the reward)
    SCORES (per-item numbers in the records that promote.metric may name: the gate then pairs scores)
    FAILS_DEGENERATE (free-text tasks: a reply that did not end, loops or copies its input fails every metric;
        posttrain/evaluation/degeneration.py; the rates are recorded for every task)
    prepare(params) -> (splits {train, val, test}, report)     read, validate (file:line errors), split
    prompt_and_reference(record) -> (user message, reference reply)
    reward_model_records(train) / judge_records(train) -> the records each of them trains on (disjoint)
    reward_columns(record) -> extra columns the RL rewards read (beside prompt, question, solution)
    check_eval_records(records)                                  DataError naming file:line
    classifier_examples(records, n, seed) -> [{text, label}]     the classifier reward model's data
    preference_pairs(records, n, seed) -> [(user, chosen, rejected)]
    stop_rule(tokenizer) -> a decoding stop rule or None
    make_context(params, judge_dir) -> what score() needs loaded (the judge), or None
    score(records, generations, context, params) -> per-item records, each with `question` (the pairing key)
    summary(per_item) -> task metrics beside accuracy_<m>
    protocol(params) -> what the task adds to the evaluation protocol (empty for gsm8k: its hash is pinned)

Optional (posttrain/reward_models/training.py and posttrain/stages/judge.py fall back when a module lacks them):
    JUDGE_KIND ("classifier" when absent; chat: "mlp_head")
    pair_sets(role, train, val, preferences, n, seed) -> (train pairs, held-out pairs, origin): the pairs an
        mlp_head reward model (role `reward_model`) or judge (`judge`) learns from; `preferences` are the
        records of data/prepared/preferences.jsonl (empty for tasks without preference data)
"""

from __future__ import annotations

from posttrain.tasks import chat, defaults, gsm8k, style

TASKS = {module.NAME: module for module in (gsm8k, style, chat)}
# posttrain/tasks/defaults.py declares the names params accept (it is read without importing task code)
assert list(TASKS) == list(defaults.TASKS), "every task declared in defaults.py has its module here, in order"


def get(name: str):
    if name not in TASKS:
        raise KeyError(f"data.task: unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
