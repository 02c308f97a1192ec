"""params.yaml -> typed, validated Params: YAML read with each key's line, -S overrides, every check.

Errors name the file and the line (`params.yaml:118: 'promote.min_effect' must be >= 0, got -0.5`). The
fields and their checks are declared in posttrain/config/schema.py; the library sections' field names and
values are checked in posttrain/config/library_fields.py. Profiles are written into params.yaml by
posttrain/pipeline/preflight.py (`posttrain run --profile`), which then loads it here.

    python -m posttrain.config.loader params.yaml      # validate and print the resolved config
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from posttrain.config import library_fields
from posttrain.config.schema import (PPO_REWARD_MODEL_KINDS, ConfigError, Params, check_fields, did_you_mean, section,
                                     type_name, value_has_type)
from posttrain.tasks.defaults import TASKS


def line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (str(key_node.value),)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


class Where:
    """key path -> 'file:line' of that key, or of its nearest parent in the file (a default has no line)."""

    def __init__(self, file: str, lines: dict[tuple[str, ...], int]):
        self.file, self.lines = file, lines

    def __call__(self, path: tuple[str, ...]) -> str:
        while path and path not in self.lines:
            path = path[:-1]
        return f"{self.file}:{self.lines.get(path, 1)}"


def _build(cls: type, raw: Any, path: tuple[str, ...], where: Where) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where(path)}: {'.'.join(path) or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        key_path = path + (str(key),)
        if key not in names:
            raise ConfigError(f"{where(key_path)}: unknown key '{'.'.join(key_path)}'{did_you_mean(key, names)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, key_path, where)
            continue
        if not value_has_type(value, annotation):
            raise ConfigError(f"{where(key_path)}: '{'.'.join(key_path)}' must be {type_name(annotation)}, "
                              f"got {type(value).__name__} ({value!r})")
        kwargs[key] = float(value) if annotation is float else value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'sft.training.learning_rate=1e-4' -> (['sft','training','learning_rate'], 0.0001)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw_value = text.split("=", 1)
    value = yaml.safe_load(raw_value) if raw_value else ""
    # YAML reads 1e-4 as a string (it wants 1.0e-4); people type 1e-4.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{key}' is not a section")
        node[keys[-1]] = value
    return raw


def _read_yaml(path: Path, label: str) -> tuple[dict, dict[tuple[str, ...], int]]:
    """The file's mapping and each key's line; a missing file or bad YAML fails naming the file (and line)."""
    if not path.exists():
        raise ConfigError(f"{label}: params file not found")
    text = path.read_text()
    try:
        return yaml.safe_load(text) or {}, line_index(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{label}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None, check_library_fields: bool = True,
                label: str | Path | None = None, build_library_configs: bool = False) -> Params:
    """Load, type-check and range-check params; `label` is the name errors give the file (default: path).

    build_library_configs=True also builds every library config from its section (SFTConfig, GRPOConfig,
    LoraConfig, PPOConfig, TrainingArguments): what `posttrain run` does before any stage starts.
    """
    path = Path(path)
    label = str(label or path)
    raw, lines = _read_yaml(path, label)
    raw = apply_overrides(raw, overrides or [])
    where = Where(label, lines)
    params = _build(Params, raw, (), where)
    rename_deprecated_values(params, where)
    check_values(params, where)
    check_precision(params, where)
    check_padding_free(params, where)
    resolve_task_defaults(params, where)
    if check_library_fields or build_library_configs:
        library_fields.check_field_names(params, where)
    if build_library_configs:
        library_fields.check_library_configs(params, where)
    return params


# Values renamed to say which original they follow ("seed" now only means a random seed). The old name still
# loads, with a one-line warning, for one release; then it goes from this table and is refused like any typo.
RENAMED_VALUES: dict[tuple[str, ...], dict[str, str]] = {
    ("data", "chat", "prompt_format"): {"seed": "strictbot"},
    ("rl", "draft", "variant"): {"seed": "draft_notebook"},
    ("eval", "prompt_style"): {"seed": "strictbot"},
}


def rename_deprecated_values(params: Params, where: Where) -> None:
    """Replace a deprecated value by its new name, saying so on stderr: the stages only know the new names."""
    for path, renamed in RENAMED_VALUES.items():
        value = section(params, path)
        if isinstance(value, str) and value in renamed:
            print(f"warning: {where(path)}: '{'.'.join(path)}: {value}' is deprecated, use '{renamed[value]}' "
                  "(the same setting; the old name will be refused in the next release)", file=sys.stderr)
            setattr(section(params, path[:-1]), path[-1], renamed[value])


def _check_finite(node: Any, path: tuple[str, ...], where: Where) -> None:
    """NaN or Infinity in any numeric param: a learning rate of nan trains garbage without an error."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, path + (str(key),), where)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _check_finite(value, path, where)
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{where(path)}: '{'.'.join(path)}' must be a finite number, got {node}")


def check_values(params: Params, where: Where) -> None:
    """Values a type alone does not rule out: NaN/Infinity anywhere, each field's declared check (schema.py),
    then the batch sizes and step counts inside the library sections."""
    _check_finite(to_dict(params), (), where)
    check_fields(params, where)
    library_fields.check_library_values(params, where)


def check_precision(params: Params, where: Where) -> None:
    """bf16 autocast is the TRL trainers' (`bf16: true` in sft.training, rl.training for grpo,
    rl.draft.training, rl.ppo); reinforce and hybrid are this project's own loops and train in fp32."""
    if params.rl.method in ("reinforce", "hybrid") and params.rl.training.get("bf16"):
        raise ConfigError(f"{where(('rl', 'training', 'bf16'))}: 'rl.training.bf16' is not supported with rl.method "
                          f"{params.rl.method} (its loop trains in fp32; bf16 autocast runs in sft, grpo, draft and ppo)")


def check_padding_free(params: Params, where: Where) -> None:
    """TRL's SFTTrainer does not truncate padding-free batches and refuses a max_length beside them: say so
    when the params are read, not after the stage has loaded the model."""
    for section, training in ((("sft", "training"), params.sft.training),
                              (("rl", "draft", "training"), params.rl.draft.training)):
        if training.get("padding_free") and training.get("max_length") is not None:
            name = ".".join(section)
            raise ConfigError(f"{where(section + ('padding_free',))}: '{name}.padding_free: true' needs "
                              f"'{name}.max_length: null' (TRL does not truncate padding-free batches); "
                              f"set padding_free: false to keep max_length {training['max_length']}")


def _resolve_prompt_format(params: Params, where: Where) -> None:
    """A task with a `prompt_format` (chat) sets eval.prompt_style: the tokenizer's template or StrictBot's literal."""
    prompt_format = getattr(getattr(params.data, params.data.task), "prompt_format", None)
    if prompt_format is None:
        return
    wanted = {"chat_template": "chat", "strictbot": "strictbot"}[prompt_format]
    if params.eval.prompt_style not in ("chat", wanted):
        raise ConfigError(f"{where(('eval', 'prompt_style'))}: 'eval.prompt_style' is set by "
                          f"data.{params.data.task}.prompt_format ({prompt_format}) for the {params.data.task} "
                          f"task; leave it at chat, got {params.eval.prompt_style!r}")
    params.eval.prompt_style = wanted
    if wanted == "strictbot" and params.eval.system_prompt == "task":
        params.eval.system_prompt = ""  # StrictBot's prompt has no system turn: the persona is learnt from the data


def resolve_task_defaults(params: Params, where: Where) -> None:
    """Fill in what `task` stands for, from the task's declaration (posttrain/tasks/defaults.py):
    eval.system_prompt `task` is the task's own prompt, promote.metric `task` its default per-item pass, empty
    rl.rewards its default rewards (for PPO its `ppo_rewards`), rl.ppo fields left unset its PPO defaults,
    reward_model.kind `task` its kind (for PPO an LM reward model), `{task}` in the registered model's name the
    task's name, sft.training.max_steps `task` its quick SFT budget; a task with a `prompt_format` (chat) sets
    eval.prompt_style. Resolved here, once, so every stage, the protocol hash and MLflow see the values that
    were used."""
    task = TASKS[params.data.task]
    _resolve_prompt_format(params, where)
    if params.eval.system_prompt == "task":
        params.eval.system_prompt = getattr(params.data, params.data.task).system_prompt
    if params.sft.training.get("max_steps") == "task":
        params.sft.training["max_steps"] = task.sft_max_steps
    if params.promote.metric == "task":
        params.promote.metric = task.primary_metric
    if params.promote.metric not in task.metrics + task.scores:
        raise ConfigError(f"{where(('promote', 'metric'))}: 'promote.metric' must be task or one of "
                          f"{', '.join(task.metrics + task.scores)} (data.task {params.data.task}), "
                          f"got {params.promote.metric!r}")
    if not params.rl.rewards:
        ppo_own = params.rl.method == "ppo" and task.ppo_rewards is not None
        params.rl.rewards = dict(task.ppo_rewards if ppo_own else task.rewards)
    params.rl.ppo = dict(task.ppo) | params.rl.ppo
    if params.reward_model.kind == "task":
        params.reward_model.kind = task.ppo_reward_model_kind if params.rl.method == "ppo" else task.reward_model_kind
    if params.rl.method == "ppo" and params.reward_model.kind not in PPO_REWARD_MODEL_KINDS:
        raise ConfigError(f"{where(('reward_model', 'kind'))}: rl.method ppo scores the policy's tokens with an LM reward "
                          f"model: 'reward_model.kind' must be one of {', '.join(PPO_REWARD_MODEL_KINDS)}, "
                          f"got {params.reward_model.kind!r}")
    params.promote.registered_model = params.promote.registered_model.replace("{task}", params.data.task)


def to_dict(params: Params) -> dict:
    return dataclasses.asdict(params)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the shape MLflow params want."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


if __name__ == "__main__":
    try:
        print(yaml.safe_dump(to_dict(load_params(sys.argv[1] if len(sys.argv) > 1 else "params.yaml")), sort_keys=False))
    except ConfigError as err:
        sys.exit(f"error: {err}")
