"""Task plug-ins: one module per kind of data (gsm8k, style, chat), chosen by `data.task`.

A task is a small declaration in the spirit of lm-evaluation-harness: how its records are read, validated
and split, what a prompt and its reference reply are, the reward-model data, the default rewards and the
per-item pass/fail evaluation the gate pairs. registry.py lists them; adding a task is one module here, one
line there, and its declaration in defaults.py (metrics, default rewards, system prompt: what params read
without importing task code) with its data section in posttrain/config/schema.py.
"""
