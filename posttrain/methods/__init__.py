"""RL methods, one module each: grpo, reinforce, ppo, draft, hybrid.

A method module has `NAME` and `run(params, model_dir, dataset, checkpoint_dir)` -> (policy with its adapter,
tokenizer, log history[, {file name: tensors saved beside the model}]). Adding a method is adding a module
here: `NAMES` is read from this folder (no import: loading params must not pull in torch), and
posttrain/methods/registry.py maps each name to its `run`.
"""

import pkgutil

HELPERS = {"common", "registry"}  # modules here that are not methods
NAMES = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name not in HELPERS))
