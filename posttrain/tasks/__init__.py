"""Task plug-ins: one module per kind of data (gsm8k, style), chosen by `data.task`.

Not to be confused with the top-level `tasks/` folder, which holds the pipeline's stages (Prefect
tasks). A task here is a small declaration in the spirit of lm-evaluation-harness: how its records are
read, validated and split, what a prompt and its reference reply are, the reward-model data, the
default rewards and the per-item pass/fail evaluation the gate pairs. registry.py lists them.
"""
