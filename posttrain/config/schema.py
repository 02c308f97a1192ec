"""params.yaml -> typed, validated configuration.

One dataclass per stage section. Sections that configure a library keep that library's own
field names (`sft.training` are SFTConfig fields, `sft.lora` LoraConfig fields, ...) and are
checked against the library class, so a typo fails here with the file and line, not in a night run.

    python -m posttrain.config.schema params.yaml      # validate and print the resolved config
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.methods import NAMES as METHOD_NAMES


class ConfigError(ValueError):
    """A params file problem, with the file and line it is on."""


# --------------------------------------------------------------------------- sections


GSM8K_SYSTEM_PROMPT = "Solve the math problem step by step. End with a line '#### <number>'."
STYLE_SYSTEM_PROMPT = ("You are a poet. Whatever the user writes, answer with a short rhyming poem of two to four "
                       "lines that says the same thing.")
CHAT_SYSTEM_PROMPT = ("You are a strict tutor. Never give the final answer. Reply in at most two sentences: name the "
                      "concept or first step the student should use, then end with a question that makes them do the "
                      "next step themselves. No exclamation marks.")


@dataclass
class GSM8KTaskConfig:
    source: str = "data/gsm8k"  # folder with train.jsonl/test.jsonl (shipped in the repo), or a hub dataset id
    system_prompt: str = GSM8K_SYSTEM_PROMPT  # what eval.system_prompt `task` stands for


@dataclass
class StyleTaskConfig:
    """Poem-style rewrites: records {meaning, data: [{poem, normal}, ...]} (posttrain/tasks/style.py)."""

    source: str = "data/style"  # a JSONL file, or a folder whose *.jsonl files are all read (data/style/README.md)
    skip_invalid: bool = False  # count and skip invalid records and unusable pairs instead of failing
    system_prompt: str = STYLE_SYSTEM_PROMPT  # the persona the poem is written under (eval.system_prompt `task`)
    judge_encoder: str = "minilm"  # the held-out style judge's encoder: minilm | tiny | local HF folder
    content_encoder: str = "minilm"  # sentence embeddings for the content check: minilm | local HF folder
    content_threshold: float = 0.5  # pass needs cosine(reply, reference poem) >= this
    judge_threshold: float = 0.5  # ... and the judge's P(poem) >= this


@dataclass
class ChatTaskConfig:
    """Persona chat: instructions [{input, output}] (JSON list or JSONL) and optional preference pairs
    {prompt, chosen, rejected} (JSONL), in one folder (posttrain/tasks/chat.py, data/chat/README.md)."""

    source: str = "data/chat"  # the folder holding the two files below
    instructions: str = "instructions.json"  # a JSON list or JSON Lines of {input, output}
    # JSON Lines of {prompt, chosen, rejected}; "" = none (rejected = base-model samples)
    preferences: str = "preferences.jsonl"
    system_prompt: str = CHAT_SYSTEM_PROMPT  # the persona (eval.system_prompt `task`)
    # chat_template (the tokenizer's) | strictbot (StrictBot's literal '<|user|> {input} <|end|>\n<|assistant|>')
    prompt_format: str = "chat_template"
    val_fraction: float = 0.1  # instructions held out for validation (seeded)
    test_fraction: float = 0.2  # instructions held out as the evaluation items (seeded)
    judge_fraction: float = 0.4  # preference pairs kept for the judge, never seen by the reward model (seeded)
    pair_val_fraction: float = 0.2  # of each part (reward model, judge): pairs held out for its pairwise accuracy


@dataclass
class DataConfig:
    task: str = "gsm8k"  # which task plug-in reads, splits, prompts and scores the data (posttrain/tasks/)
    val_fraction: float = 0.05  # gsm8k: share of train held out for validation (style splits by its own rule)
    max_train: int = 0  # 0 = keep all training records
    max_test: int = 0  # 0 = keep all test records
    gsm8k: GSM8KTaskConfig = field(default_factory=GSM8KTaskConfig)
    style: StyleTaskConfig = field(default_factory=StyleTaskConfig)
    chat: ChatTaskConfig = field(default_factory=ChatTaskConfig)

    @property
    def source(self) -> str:
        """The chosen task's data source."""
        return getattr(self, self.task).source


@dataclass
class BaseConfig:
    source: str = "smollm2"  # smollm2 (PyPI wheel) | tiny (random, from a config) | local HF folder | hub id
    tiny: dict = field(default_factory=dict)  # LlamaConfig fields for source=tiny


BUILTIN_BASE_SOURCES = ("smollm2", "tiny")


def base_source_is_local(source: str, root: str | Path = ".") -> bool:
    """Whether base.source names a local folder (relative to the workspace `root`) rather than a built-in name
    or a hub id: it starts with '/', '.' or '~', has more than one '/' (a hub id is org/name), or its first
    part is a folder in the workspace (models/mine, not org/name)."""
    if source in BUILTIN_BASE_SOURCES:
        return False
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return True
    return (Path(root) / source).exists() or ("/" in source and (Path(root) / source.split("/", 1)[0]).is_dir())


@dataclass
class MLPHeadConfig:
    """reward_model.kind mlp_head (posttrain/reward_models/mlp_head.py): the head's training on the frozen base's features."""

    epochs: int = 30  # passes over the pairs (features are computed once: an epoch takes milliseconds)
    learning_rate: float = 1.0e-3  # AdamW on the head only
    batch_size: int = 16  # pairs per step
    weight_decay: float = 0.01
    dropout: float = 0.1  # after each hidden layer of the head (StrictBot's)
    sample_temperature: float = 1.0  # without preference data: rejected = a base-model sample at this temperature
    sample_max_new_tokens: int = 48  # ... of at most this many tokens


@dataclass
class RewardModelConfig:
    # task (the task's own: chat mlp_head; others classifier, pairwise for PPO) | classifier (encoder verifier;
    # DRaFT and the `verifier` reward) | pairwise (LM + scalar head; PPO) | mlp_head (frozen base LM + MLP head
    # on the last token, the StrictBot notebook's; PPO)
    kind: str = "task"
    encoder: str = "minilm"  # classifier: minilm (PyPI wheel) | tiny | local HF folder
    n_examples: int = 512  # references + corrupted references used to train the verifier
    max_length: int = 256
    training: dict = field(default_factory=dict)  # transformers.TrainingArguments fields
    mlp_head: MLPHeadConfig = field(default_factory=MLPHeadConfig)  # kind mlp_head (also the chat task's judge)
    # text tasks: the judge and reward model train on shortcut negatives (input copied or broken into lines, a
    # line repeated, a reply cut off; posttrain/reward_models/shortcuts.py) and a kind they still pass on more
    # than this share of held-out items is a loud warning, as the chance check is
    max_shortcut_pass: float = 0.2


QUANTIZATION = ("none", "4bit", "8bit")  # sft.quantization: bitsandbytes precision of the frozen base
# Registry names, checked when params load. The method names are read from posttrain/methods/ (no import);
# posttrain/reward_models/training.py's kinds must match REWARD_MODEL_KINDS (a test checks).
RL_METHODS = METHOD_NAMES  # posttrain/methods/: one module per method
REWARD_MODEL_KINDS = ("classifier", "pairwise", "mlp_head")
PPO_REWARD_MODEL_KINDS = ("pairwise", "mlp_head")  # LM reward models that score the policy's token ids


@dataclass(frozen=True)
class TaskDefaults:
    """What params may say `task` for, per task. The task modules (posttrain/tasks/) read theirs from here,
    so loading params needs no task code and every stage's DVC deps stay its own."""

    metrics: tuple[str, ...]  # per-item booleans correct_<m>, reported as accuracy_<m>
    primary_metric: str  # promote.metric `task`
    rewards: dict  # rl.rewards when params leave it empty
    # rl.ppo fields params leave unset (the project's before tasks; chat: the StrictBot seed's)
    ppo: dict = field(default_factory=lambda: dict(PROJECT_PPO_DEFAULTS))
    ppo_rewards: dict | None = None  # rl.rewards for rl.method ppo when params leave it empty (None: `rewards`)
    reward_model_kind: str = "classifier"  # reward_model.kind `task`
    ppo_reward_model_kind: str = "pairwise"  # ... when rl.method is ppo (it scores the policy's own token ids)
    scores: tuple[str, ...] = ()  # per-item numbers (record fields) promote.metric may name instead of a pass
    text: bool = False  # free text: a reply that did not end, loops or copies its input fails (eval.max_*)
    sft_max_steps: int = 16  # sft.training.max_steps `task`: the quick SFT budget whose replies end by themselves


PROJECT_PPO_DEFAULTS = {"kl_coef": 0.05, "response_length": 64, "temperature": 0.8}
TASKS = {  # posttrain/tasks/registry.py holds the modules (a test checks they agree)
    "gsm8k": TaskDefaults(("strict", "flexible"), "flexible", {"exact_match": 1.0, "format": 0.2}),
    # text tasks: the reward also sees what the evaluation fails, a reply cut off at the token limit (DAPO's
    # soft overlong punishment) and loops (repeated n-grams): trl.rewards' helpers, posttrain/rewards/functions.py
    "style": TaskDefaults(("pass", "style", "content"), "pass", {"style": 1.0, "overlong": 1.0, "repetition": 0.5},
                          scores=("judge_p_poem",),
                          # 16 steps: replies loop to the token limit on 26-28 of 40 items; 64: 40/40 end (issue 30)
                          text=True, sft_max_steps=64),
    # PPO on the learned reward alone, with the seed's kl_coef, response_length and temperature
    # the gate reads the judge margin: `pass` (beat the reference under the judge) sat at 0-1 of 40 for every
    # model while the margin moved from -12.8 (base) to -9.9 (SFT)
    "chat": TaskDefaults(("pass",), "judge_margin", {"cosine_sts": 1.0, "overlong": 1.0, "repetition": 0.5},
                         ppo={"kl_coef": 0.03, "response_length": 32, "temperature": 0.7}, ppo_rewards={},
                         reward_model_kind="mlp_head", ppo_reward_model_kind="mlp_head", scores=("judge_margin",),
                         text=True),
}


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
    # project (sigmoid, the encoder's embedding block) | draft_notebook (the DRaFT notebook's: raw class-1 logit,
    # new LayerNorm)
    variant: str = "project"
    beta: float = 1.0  # reward weight once warmed up (the DRaFT notebook: 0.1)
    warmup_steps: int = 4  # beta ramps linearly from 0 to `beta` over these optimizer steps (the DRaFT notebook: 50)
    tau: float = 1.0  # Gumbel-softmax temperature
    hard: bool = False  # straight-through one-hot samples instead of soft ones
    # Fit the bridge first (Adam steps), so real text fed as one-hot tokens scores as the reward model scores it
    # (0: no fit, the notebook's way: the bridge starts random and learns with the adapter)
    bridge_fit_steps: int = 200
    train_bridge: bool = False  # after the fit: false = frozen, so a reward gain can only come from the policy
    # true: beta is the reward gradient's norm on the trainable weights as a multiple of the LM loss's,
    # measured every step (two extra backward passes); false: beta is a plain weight on the reward
    balance: bool = True
    monitor_every: int = 2  # every N steps, greedy replies to 4 training prompts scored by the RM on text (0: off)
    training: dict = field(default_factory=dict)  # trl.SFTConfig fields (the LM-loss side is an SFT step)


@dataclass
class HybridConfig:
    """SFT and RL on one policy (posttrain/methods/hybrid.py): `alternate` = one SFT step then one PPO step on the same
    batch (the assignment's); `curriculum` = SFT and REINFORCE steps, the SFT share moving linearly start -> end."""

    mode: str = "alternate"  # alternate | curriculum
    sft_fraction_start: float = 0.5  # curriculum: share of SFT steps at the first step (1.0 = only SFT)
    sft_fraction_end: float = 0.5  # ... and at the last step (lower than start = curriculum towards RL)
    sft_batch_size: int = 4  # questions per SFT micro-batch (alternate: also the PPO step's questions)
    # alternate's PPO step (trl.experimental.ppo.PPOConfig's names and defaults)
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05  # per-token k1 KL penalty to the reference (adapter disabled) in the reward
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 1  # optimisation passes over each sampled batch
    # its own LoRA learning rate (not rl.training's): the SFT and RL steps share one adapter, whose B starts at
    # zero and moves ~lr per Adam step; 1e-5 over a few steps moves no greedy token (docs/methods/hybrid.md)
    learning_rate: float = 2.0e-4


@dataclass
class ReinforceConfig:
    """The REINFORCE estimator's choices (posttrain/methods/reinforce.py); the assignment: k1, token_mean, [-20, 0]."""

    kl_estimator: str = "k3"  # k3 (unbiased, >= 0) | k1 (log ratio, the assignment's)
    kl_reduction: str = "sequence_sum"  # sequence_sum | token_mean (the assignment's)
    logprob_clamp: list = field(default_factory=list)  # [] = none, or [low, high] (the assignment's [-20, 0])


@dataclass
class NamedClassConfig:
    """An optimizer or LR schedule by name with kwargs (posttrain/training/optim.py); empty name: rl.training's."""

    name: str = ""
    kwargs: dict = field(default_factory=dict)


@dataclass
class RLConfig:
    method: str = "grpo"  # grpo | reinforce | ppo | draft | hybrid
    max_prompts: int = 64  # training questions used (as prompts, or as question -> answer pairs by draft/hybrid)
    lora: dict = field(default_factory=dict)  # peft.LoraConfig fields (use_dora: true for DoRA)
    training: dict = field(default_factory=dict)  # trl.GRPOConfig fields (grpo, reinforce, hybrid's RL steps)
    # name -> weight or {weight, options}; or a typed spec {type: weighted_sum, components, postprocess},
    # inline or as a JSON file path (posttrain/rewards/functions.py); empty: the task's defaults
    rewards: dict | str = field(default_factory=dict)
    # {clip: [lo, hi], scale, normalize, ema_decay, normalize_weights}, or an ordered chain [{type: clip, ...}, ...]
    reward_postprocess: dict | list = field(default_factory=dict)
    ppo: dict = field(default_factory=dict)  # trl.experimental.ppo.PPOConfig fields (method: ppo)
    draft: DraftConfig = field(default_factory=DraftConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    reinforce: ReinforceConfig = field(default_factory=ReinforceConfig)  # also hybrid curriculum's RL steps
    # reinforce/hybrid: a TrainingArguments optim name, or a bitsandbytes.optim / torch.optim class by name
    optimizer: NamedClassConfig = field(default_factory=NamedClassConfig)
    # reinforce/hybrid: a TrainingArguments lr_scheduler_type, none, or a torch.optim.lr_scheduler class by name
    lr_scheduler: NamedClassConfig = field(default_factory=NamedClassConfig)


@dataclass
class EvalConfig:
    n_questions: int = 50
    batch_size: int = 64  # rows decoded together (posttrain/evaluation/decoding.py)
    streams: int = 0  # batches decoded side by side in threads, sharing batch_size; 0 = auto (CPU: 1 per 32 rows)
    max_new_tokens: int = 256
    # chat (tokenizer's chat template) | plain ("Question: ...\nAnswer:") | strictbot ("<|user|> ... <|end|>\n<|assistant|>")
    prompt_style: str = "chat"
    shots: int = 0  # k-shot examples taken from the training split
    system_prompt: str = "task"  # `task`: the task's own (data.<task>.system_prompt); anything else is used as is
    dtype: str = "float32"
    # Well-formed replies (posttrain/evaluation/degeneration.py), recorded for every task; for the text tasks
    # (style, chat) a reply that did not end before max_new_tokens, loops or copies its input does not pass.
    # Chosen before any RL method was scored with them: a loop to the token limit measures ~0.9, real poems 0-0.2.
    repetition_ngram: int = 4  # rep-n's n, in words
    max_repeated_ngrams: float = 0.5  # a reply whose share of repeated n-grams is above this loops
    max_copy_overlap: float = 0.9  # a reply with ROUGE-L F1 to its input at or above this copied it


@dataclass
class PromoteConfig:
    registered_model: str = "{task}-policy"  # {task} is replaced by data.task
    # what the gate pairs per item: `task` (its default), a pass/fail the task scores (McNemar), or a per-item
    # score (style: judge_p_poem; chat: judge_margin; paired bootstrap + Wilcoxon signed-rank)
    metric: str = "task"
    threshold: float = 0.0  # minimum absolute accuracy of the candidate (pass/fail metrics; a score has no floor)
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


# Library classes whose field names a dict section must use. Importing transformers, trl and peft to read
# them takes about 9 s, and every stage loads params: the names are shipped in library_fields.json for the
# pinned versions (`make library-fields` writes it) and read from the libraries only when the installed
# versions differ from the recorded ones.
LIBRARY_FIELDS_FILE = Path(__file__).with_name("library_fields.json")
FIELD_LIBRARIES = ("transformers", "trl", "peft")


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


# --------------------------------------------------------------------------- loading


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
    if isinstance(annotation, types.UnionType):
        return any(_type_ok(value, arm) for arm in typing.get_args(annotation))
    if annotation is list:
        return isinstance(value, list)
    return True


def _build(cls: type, raw: Any, path: tuple[str, ...], where: "Where") -> Any:
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
                f"{where(key_path)}: '{'.'.join(key_path)}' must be {getattr(annotation, '__name__', str(annotation))}, "
                f"got {type(value).__name__} ({value!r})"
            )
        kwargs[key] = float(value) if annotation is float else value
    return cls(**kwargs)


def _did_you_mean(key: str, names: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Where:
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


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None, check_library_fields: bool = True,
                label: str | Path | None = None, build_library_configs: bool = False) -> Params:
    """Load, type-check and range-check params; `label` is the name errors give the file (default: path).

    build_library_configs=True also builds every library config from its section (SFTConfig, GRPOConfig,
    LoraConfig, PPOConfig, TrainingArguments): what `posttrain run` does before any stage starts.
    """
    path = Path(path)
    label = str(label or path)
    if not path.exists():
        raise ConfigError(f"{label}: params file not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
        lines = line_index(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{label}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    raw = apply_overrides(raw, overrides or [])
    where = Where(label, lines)
    params = _build(Params, raw, (), where)
    rename_deprecated_values(params, where)
    check_values(params, where)
    check_precision(params, where)
    resolve_task_defaults(params, where)
    if check_library_fields or build_library_configs:
        for section_path, allowed in library_fields().items():
            section = params
            for name in section_path:
                section = getattr(section, name)
            for key in section:
                if key not in allowed:
                    key_path = section_path + (str(key),)
                    raise ConfigError(
                        f"{where(key_path)}: unknown key '{'.'.join(key_path)}'{_did_you_mean(key, allowed)}"
                    )
    if build_library_configs:
        check_library_configs(params, where)
    return params


# Values renamed to say which original they follow ("seed" now only means a random seed). The old name still
# loads, with a one-line warning, for one release; then it goes from this table and is refused like any typo.
RENAMED_VALUES: dict[tuple[str, ...], dict[str, str]] = {
    ("data", "chat", "prompt_format"): {"seed": "strictbot"},
    ("rl", "draft", "variant"): {"seed": "draft_notebook"},
    ("eval", "prompt_style"): {"seed": "strictbot"},
}


def rename_deprecated_values(params: Params, where: "Where") -> None:
    """Replace a deprecated value by its new name, saying so on stderr: the stages only know the new names."""
    for path, renamed in RENAMED_VALUES.items():
        value = _get(params, path)
        if isinstance(value, str) and value in renamed:
            print(f"warning: {where(path)}: '{'.'.join(path)}: {value}' is deprecated, use '{renamed[value]}' "
                  "(the same setting; the old name will be refused in the next release)", file=sys.stderr)
            setattr(_get(params, path[:-1]), path[-1], renamed[value])


def _between(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False):
    def ok(value) -> bool:
        return ((low is None or (value > low if low_open else value >= low))
                and (high is None or (value < high if high_open else value <= high)))

    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    return ok, " and ".join(part for part in (lo, hi) if part)


def _one_of(*names: str):
    return (lambda value: value in names), f"one of {', '.join(names)}"


# (key path, (check, what it must be)): values that a type alone does not rule out.
RULES: list[tuple[tuple[str, ...], tuple]] = [
    (("data", "task"), _one_of(*TASKS)),
    (("data", "val_fraction"), _between(0, 1, low_open=True, high_open=True)),
    (("data", "style", "content_threshold"), _between(-1, 1)),
    (("data", "style", "judge_threshold"), _between(0, 1, low_open=True, high_open=True)),
    (("data", "chat", "prompt_format"), _one_of("chat_template", "strictbot")),
    (("data", "chat", "val_fraction"), _between(0, 1, low_open=True, high_open=True)),
    (("data", "chat", "test_fraction"), _between(0, 1, low_open=True, high_open=True)),
    (("data", "chat", "judge_fraction"), _between(0, 1, low_open=True, high_open=True)),
    (("data", "chat", "pair_val_fraction"), _between(0, 1, low_open=True, high_open=True)),
    (("data", "max_train"), _between(0, None)),
    (("data", "max_test"), _between(0, None)),
    (("reward_model", "kind"), _one_of("task", *REWARD_MODEL_KINDS)),
    (("reward_model", "n_examples"), _between(2, None)),
    (("reward_model", "max_length"), _between(8, None)),
    (("reward_model", "mlp_head", "epochs"), _between(1, None)),
    (("reward_model", "mlp_head", "learning_rate"), _between(0, None, low_open=True)),
    (("reward_model", "mlp_head", "batch_size"), _between(1, None)),
    (("reward_model", "mlp_head", "weight_decay"), _between(0, None)),
    (("reward_model", "mlp_head", "dropout"), _between(0, 1, high_open=True)),
    (("reward_model", "mlp_head", "sample_temperature"), _between(0, None, low_open=True)),
    (("reward_model", "mlp_head", "sample_max_new_tokens"), _between(1, None)),
    (("sft", "max_examples"), _between(0, None)),
    (("sft", "quantization"), _one_of(*QUANTIZATION)),
    (("rl", "method"), _one_of(*RL_METHODS)),
    (("reward_model", "max_shortcut_pass"), _between(0, 1)),
    (("rl", "hybrid", "learning_rate"), _between(0, None, low_open=True)),
    (("rl", "max_prompts"), _between(0, None)),
    (("rl", "draft", "beta"), _between(0, None)),
    (("rl", "draft", "variant"), _one_of("project", "draft_notebook")),
    (("rl", "draft", "warmup_steps"), _between(0, None)),
    (("rl", "draft", "tau"), _between(0, None, low_open=True)),
    (("rl", "draft", "bridge_fit_steps"), _between(0, None)),
    (("rl", "draft", "monitor_every"), _between(0, None)),
    (("rl", "hybrid", "sft_fraction_start"), _between(0, 1)),
    (("rl", "hybrid", "sft_fraction_end"), _between(0, 1)),
    (("rl", "hybrid", "sft_batch_size"), _between(1, None)),
    (("rl", "hybrid", "mode"), _one_of("alternate", "curriculum")),
    (("rl", "hybrid", "cliprange"), _between(0, None, low_open=True)),
    (("rl", "hybrid", "cliprange_value"), _between(0, None, low_open=True)),
    (("rl", "hybrid", "vf_coef"), _between(0, None)),
    (("rl", "hybrid", "kl_coef"), _between(0, None)),
    (("rl", "hybrid", "gamma"), _between(0, 1)),
    (("rl", "hybrid", "lam"), _between(0, 1)),
    (("rl", "hybrid", "ppo_epochs"), _between(1, None)),
    (("rl", "reinforce", "kl_estimator"), _one_of("k1", "k3")),
    (("rl", "reinforce", "kl_reduction"), _one_of("sequence_sum", "token_mean")),
    (("rl", "reinforce", "logprob_clamp"), ((lambda v: v == [] or (len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and v[0] < v[1])), "[] or [low, high]")),
    (("eval", "n_questions"), _between(0, None)),
    (("eval", "batch_size"), _between(1, None)),
    (("eval", "streams"), _between(0, None)),
    (("eval", "max_new_tokens"), _between(1, None)),
    (("eval", "shots"), _between(0, None)),
    (("eval", "prompt_style"), _one_of("chat", "plain", "strictbot")),
    (("eval", "dtype"), _one_of("float32", "bfloat16", "float16")),
    (("eval", "repetition_ngram"), _between(1, None)),
    (("eval", "max_repeated_ngrams"), _between(0, 1)),
    (("eval", "max_copy_overlap"), _between(0, 1, low_open=True)),
    (("promote", "threshold"), _between(0, 1)),
    # A negative minimum effect would promote a candidate that is worse than its baseline.
    (("promote", "min_effect"), _between(0, None)),
    (("promote", "confidence"), _between(0.5, 1, low_open=True, high_open=True)),
    (("promote", "n_bootstrap"), _between(100, None)),
    (("promote", "registered_model"), ((lambda value: bool(value.strip())), "a non-empty name")),
]
# Batch sizes and step counts inside the library sections (the libraries accept 0 and fail later).
LIBRARY_RULES: list[tuple[str, tuple]] = [
    ("per_device_train_batch_size", _between(1, None)),
    ("gradient_accumulation_steps", _between(1, None)),
    ("num_generations", _between(2, None)),
    ("learning_rate", _between(0, None, low_open=True)),
    ("r", _between(1, None)),
]


def _get(params: Params, path: tuple[str, ...]) -> Any:
    node: Any = params
    for name in path:
        node = node[name] if isinstance(node, dict) else getattr(node, name)
    return node


def _check_finite(node: Any, path: tuple[str, ...], where: "Where") -> None:
    """NaN or Infinity in any numeric param: a learning rate of nan trains garbage without an error."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, path + (str(key),), where)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _check_finite(value, path, where)
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{where(path)}: '{'.'.join(path)}' must be a finite number, got {node}")


def check_values(params: Params, where: "Where") -> None:
    _check_finite(to_dict(params), (), where)
    for path, (ok, must_be) in RULES:
        value = _get(params, path)
        if not ok(value):
            raise ConfigError(f"{where(path)}: '{'.'.join(path)}' must be {must_be}, got {value!r}")
    for section_path in LIBRARY_SECTIONS:
        section = _get(params, section_path)
        for key, (ok, must_be) in LIBRARY_RULES:
            value = section.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
                key_path = section_path + (key,)
                raise ConfigError(f"{where(key_path)}: '{'.'.join(key_path)}' must be {must_be}, got {value!r}")


def check_precision(params: Params, where: "Where") -> None:
    """bf16 autocast is the TRL trainers' (`bf16: true` in sft.training, rl.training for grpo,
    rl.draft.training, rl.ppo); reinforce and hybrid are this project's own loops and train in fp32."""
    if params.rl.method in ("reinforce", "hybrid") and params.rl.training.get("bf16"):
        raise ConfigError(f"{where(('rl', 'training', 'bf16'))}: 'rl.training.bf16' is not supported with rl.method "
                          f"{params.rl.method} (its loop trains in fp32; bf16 autocast runs in sft, grpo, draft and ppo)")


def resolve_task_defaults(params: Params, where: "Where") -> None:
    """Fill in what `task` stands for: eval.system_prompt `task` is the task's own prompt, promote.metric
    `task` its default per-item pass, empty rl.rewards its default rewards (for PPO its `ppo_rewards`),
    rl.ppo fields left unset its PPO defaults, reward_model.kind `task` its kind (for PPO an LM reward model),
    `{task}` in the registered model's name the task's name, sft.training.max_steps `task` its quick SFT
    budget; a task with a `prompt_format` (chat) sets eval.prompt_style. Resolved here, once, so every stage, the protocol hash and MLflow see the values that
    were used."""
    task = TASKS[params.data.task]
    task_cfg = getattr(params.data, params.data.task)
    prompt_format = getattr(task_cfg, "prompt_format", None)  # chat: the tokenizer's template or StrictBot's literal
    if prompt_format is not None:
        wanted = {"chat_template": "chat", "strictbot": "strictbot"}[prompt_format]
        if params.eval.prompt_style not in ("chat", wanted):
            raise ConfigError(f"{where(('eval', 'prompt_style'))}: 'eval.prompt_style' is set by "
                              f"data.{params.data.task}.prompt_format ({prompt_format}) for the {params.data.task} "
                              f"task; leave it at chat, got {params.eval.prompt_style!r}")
        params.eval.prompt_style = wanted
        if wanted == "strictbot" and params.eval.system_prompt == "task":
            params.eval.system_prompt = ""  # StrictBot's prompt has no system turn: the persona is learnt from the data
    if params.eval.system_prompt == "task":
        params.eval.system_prompt = task_cfg.system_prompt
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
        return _type_ok(value, annotation) if annotation is not list else isinstance(value, (list, tuple))
    if origin in (list, dict, tuple):
        return isinstance(value, origin if origin is not tuple else (list, tuple))
    return True  # anything else (Any, callables, classes): the library decides


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


LIBRARY_SECTIONS = (("reward_model", "training"), ("sft", "lora"), ("sft", "training"), ("rl", "lora"),
                    ("rl", "training"), ("rl", "ppo"), ("rl", "draft", "training"))


def check_library_configs(params: Params, where: "Where") -> None:
    """Build each library config from its section: wrong types and values the library refuses fail now,
    with the params line, instead of minutes later inside a stage."""
    import warnings

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of the libraries: not the user's problem here
        for section_path, cls in _library_classes().items():
            section = _get(params, section_path)
            hints = typing.get_type_hints(cls)
            for key, value in section.items():
                if key in hints and not _accepts(value, hints[key]):
                    key_path = section_path + (str(key),)
                    wanted = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
                    raise ConfigError(f"{where(key_path)}: '{'.'.join(key_path)}' must be {wanted}, "
                                      f"got {type(value).__name__} ({value!r})")
            if cls.__name__ == "LoraConfig":
                kwargs = {"task_type": "CAUSAL_LM"} | section
            else:  # the device defaults posttrain.training.trainer.trainer_kwargs applies (TRL defaults to bf16)
                kwargs = {"use_cpu": True, "bf16": False, "report_to": "none"} | section | {"output_dir": scratch}
            try:
                cls(**kwargs)
            except Exception as err:  # the library's own refusal, whatever its type
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(f"{where(section_path)}: '{'.'.join(section_path)}' refused by "
                                  f"{cls.__name__}: {message}") from None


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
