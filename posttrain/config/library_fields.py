"""The library sections of params: `sft.training` holds trl.SFTConfig's own field names, `sft.lora` peft's
LoraConfig's, and so on. Checked here: the names (a typo fails with its line), batch sizes and step counts
the libraries accept but fail on later, and, before a run, each library config built from its section.

Importing transformers, trl and peft to read their field names takes about 9 s, and every stage loads
params: the names are shipped in library_fields.json for the pinned versions (`make library-fields` writes
it) and read from the libraries only when the installed versions differ from the recorded ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable

from posttrain.config.schema import ConfigError, Params, between, did_you_mean, section, type_name, value_has_type

Where = Callable[[tuple[str, ...]], str]  # key path -> 'params.yaml:line' (posttrain/config/loader.py)
LIBRARY_FIELDS_FILE = Path(__file__).with_name("library_fields.json")
FIELD_LIBRARIES = ("transformers", "trl", "peft")
LIBRARY_SECTIONS = (("reward_model", "training"), ("sft", "lora"), ("sft", "training"), ("rl", "lora"),
                    ("rl", "training"), ("rl", "ppo"), ("rl", "draft", "training"))
# Batch sizes and step counts inside the library sections (the libraries accept 0 and fail later).
LIBRARY_RULES = [
    ("per_device_train_batch_size", between(1, None)),
    ("gradient_accumulation_steps", between(1, None)),
    ("num_generations", between(2, None)),
    ("learning_rate", between(0, None, low_open=True)),
    ("r", between(1, None)),
]


def _library_classes() -> dict[tuple[str, ...], type]:
    # Imported lazily: transformers/trl/peft take seconds to import.
    from peft import LoraConfig
    from transformers import TrainingArguments
    from trl import GRPOConfig
    from trl import SFTConfig as TRLSFTConfig
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental in TRL 1.12 (STACK.md)
    from trl.experimental.ppo import PPOConfig

    return {
        ("reward_model", "training"): TrainingArguments,
        ("sft", "lora"): LoraConfig,
        ("sft", "training"): TRLSFTConfig,
        ("rl", "lora"): LoraConfig,
        ("rl", "training"): GRPOConfig,
        ("rl", "ppo"): PPOConfig,
        ("rl", "draft", "training"): TRLSFTConfig,
    }


def installed_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in FIELD_LIBRARIES}


def library_fields_from_the_libraries() -> dict[tuple[str, ...], set[str]]:
    from transformers import LlamaConfig

    fields = {path: {f.name for f in dataclasses.fields(cls)} for path, cls in _library_classes().items()}
    return {("base", "tiny"): set(LlamaConfig().to_dict()) | {"vocab_size"}, **fields}


def write_library_fields(path: Path = LIBRARY_FIELDS_FILE) -> Path:
    """Record the installed libraries' field names, with their versions."""
    from posttrain.io import write_json

    fields = {".".join(k): sorted(v) for k, v in library_fields_from_the_libraries().items()}
    write_json(path, {"versions": installed_versions(), "fields": fields})
    return path


def library_fields() -> dict[tuple[str, ...], set[str]]:
    try:
        shipped = json.loads(LIBRARY_FIELDS_FILE.read_text())
        if shipped["versions"] == installed_versions():
            return {tuple(k.split(".")): set(v) for k, v in shipped["fields"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: the libraries themselves answer
    return library_fields_from_the_libraries()


def check_field_names(params: Params, where: Where) -> None:
    """Every key of a library section is a field of its library class (or of LlamaConfig for base.tiny)."""
    for section_path, allowed in library_fields().items():
        for key in section(params, section_path):
            if key not in allowed:
                key_path = section_path + (str(key),)
                raise ConfigError(f"{where(key_path)}: unknown key '{'.'.join(key_path)}'{did_you_mean(key, allowed)}")


def check_library_values(params: Params, where: Where) -> None:
    """LIBRARY_RULES on every library section that sets one of those keys to a number."""
    for section_path in LIBRARY_SECTIONS:
        values = section(params, section_path)
        for key, (ok, must_be) in LIBRARY_RULES:
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
                key_path = section_path + (key,)
                raise ConfigError(f"{where(key_path)}: '{'.'.join(key_path)}' must be {must_be}, got {value!r}")


def _accepts(value: Any, annotation: Any) -> bool:
    """Whether a library dataclass field typed `annotation` takes `value` (only what can be told apart)."""
    import enum

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, arm) for arm in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation} or isinstance(value, annotation)
    if annotation in (int, float, bool, str, dict, list):
        return value_has_type(value, annotation) if annotation is not list else isinstance(value, (list, tuple))
    if origin in (list, dict, tuple):
        return isinstance(value, origin if origin is not tuple else (list, tuple))
    return True  # anything else (Any, callables, classes): the library decides


def _check_types(values: dict, hints: dict, section_path: tuple[str, ...], where: Where) -> None:
    for key, value in values.items():
        if key in hints and not _accepts(value, hints[key]):
            key_path = section_path + (str(key),)
            raise ConfigError(f"{where(key_path)}: '{'.'.join(key_path)}' must be {type_name(hints[key])}, "
                              f"got {type(value).__name__} ({value!r})")


def check_library_configs(params: Params, where: Where) -> None:
    """Build each library config from its section: wrong types and values the library refuses fail now,
    with the params line, instead of minutes later inside a stage."""
    import warnings

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of the libraries: not the user's problem here
        for section_path, cls in _library_classes().items():
            values = section(params, section_path)
            _check_types(values, typing.get_type_hints(cls), section_path, where)
            if cls.__name__ == "LoraConfig":
                kwargs = {"task_type": "CAUSAL_LM"} | values
            else:  # the device defaults posttrain.training.trainer.trainer_kwargs applies (TRL defaults to bf16)
                kwargs = {"use_cpu": True, "bf16": False, "report_to": "none"} | values | {"output_dir": scratch}
            try:
                cls(**kwargs)
            except Exception as err:  # the library's own refusal, whatever its type
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(f"{where(section_path)}: '{'.'.join(section_path)}' refused by "
                                  f"{cls.__name__}: {message}") from None
