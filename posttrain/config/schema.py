"""params.yaml's schema: one dataclass per stage section, each field with its help and its check beside it.

As in TRL's config dataclasses, a field is `field(default=..., metadata={"help": ..., "check": ...})`:
`help` is what `posttrain params` prints, `check` (from `between` or `one_of`, or a custom pair) is the
range or choice that a type alone does not rule out; posttrain/config/loader.py applies every check when
params load, with the file and line. Sections that configure a library (`sft.training` are SFTConfig
fields, `sft.lora` LoraConfig fields, ...) stay dicts of that library's own field names, checked in
posttrain/config/library_fields.py.

    posttrain params                 # every field with its default, its check and its help
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from posttrain.methods import NAMES as METHOD_NAMES
from posttrain.tasks.defaults import TASKS


class ConfigError(ValueError):
    """A params file problem, with the file and line it is on."""


def did_you_mean(key: str, names: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


Check = tuple[Callable[[Any], bool], str]  # (is the value allowed, what it must be: "one of ...", ">= 0 and < 1")


def between(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> Check:
    def ok(value) -> bool:
        return ((low is None or (value > low if low_open else value >= low))
                and (high is None or (value < high if high_open else value <= high)))

    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    return ok, " and ".join(part for part in (lo, hi) if part)


def one_of(*names: str) -> Check:
    return (lambda value: value in names), f"one of {', '.join(names)}"


FRACTION = between(0, 1, low_open=True, high_open=True)
AT_LEAST_0, AT_LEAST_1, POSITIVE = between(0, None), between(1, None), between(0, None, low_open=True)
QUANTIZATION = ("none", "4bit", "8bit")  # sft.quantization: bitsandbytes precision of the frozen base
# Registry names, checked when params load. The method names are read from posttrain/methods/ (no import);
# posttrain/reward_models/training.py's kinds must match REWARD_MODEL_KINDS (a test checks).
RL_METHODS = METHOD_NAMES  # posttrain/methods/: one module per method
REWARD_MODEL_KINDS = ("classifier", "pairwise", "mlp_head")
PPO_REWARD_MODEL_KINDS = ("pairwise", "mlp_head")  # LM reward models that score the policy's token ids


def _logprob_clamp_ok(value) -> bool:
    return value == [] or (len(value) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   for x in value) and value[0] < value[1])


# --------------------------------------------------------------------------- data


@dataclass
class GSM8KTaskConfig:
    source: str = field(default="data/gsm8k", metadata={
        "help": "folder with train.jsonl/test.jsonl (shipped in the repo), or a hub dataset id"})
    system_prompt: str = field(default=TASKS["gsm8k"].system_prompt, metadata={
        "help": "what eval.system_prompt `task` stands for"})


@dataclass
class StyleTaskConfig:
    """Poem-style rewrites: records {meaning, data: [{poem, normal}, ...]} (posttrain/tasks/style.py)."""

    source: str = field(default="data/style", metadata={
        "help": "a JSONL file, or a folder whose *.jsonl files are all read (data/style/README.md)"})
    skip_invalid: bool = field(default=False, metadata={
        "help": "count and skip invalid records and unusable pairs instead of failing"})
    system_prompt: str = field(default=TASKS["style"].system_prompt, metadata={
        "help": "the persona the poem is written under (eval.system_prompt `task`)"})
    judge_encoder: str = field(default="minilm", metadata={
        "help": "the held-out style judge's encoder: minilm | tiny | local HF folder"})
    content_encoder: str = field(default="minilm", metadata={
        "help": "sentence embeddings for the content check: minilm | local HF folder"})
    content_threshold: float = field(default=0.5, metadata={
        "help": "pass needs cosine(reply, reference poem) >= this", "check": between(-1, 1)})
    judge_threshold: float = field(default=0.5, metadata={
        "help": "... and the judge's P(poem) >= this", "check": FRACTION})


@dataclass
class ChatTaskConfig:
    """Persona chat: instructions [{input, output}] (JSON list or JSONL) and optional preference pairs
    {prompt, chosen, rejected} (JSONL), in one folder (posttrain/tasks/chat.py, data/chat/README.md)."""

    source: str = field(default="data/chat", metadata={"help": "the folder holding the two files below"})
    instructions: str = field(default="instructions.json", metadata={
        "help": "a JSON list or JSON Lines of {input, output}"})
    preferences: str = field(default="preferences.jsonl", metadata={
        "help": "JSON Lines of {prompt, chosen, rejected}; \"\" = none (rejected = base-model samples)"})
    system_prompt: str = field(default=TASKS["chat"].system_prompt, metadata={
        "help": "the persona (eval.system_prompt `task`)"})
    prompt_format: str = field(default="chat_template", metadata={
        "help": "chat_template (the tokenizer's) | strictbot (StrictBot's literal "
                "'<|user|> {input} <|end|>\\n<|assistant|>')", "check": one_of("chat_template", "strictbot")})
    val_fraction: float = field(default=0.1, metadata={
        "help": "instructions held out for validation (seeded)", "check": FRACTION})
    test_fraction: float = field(default=0.2, metadata={
        "help": "instructions held out as the evaluation items (seeded)", "check": FRACTION})
    judge_fraction: float = field(default=0.4, metadata={
        "help": "preference pairs kept for the judge, never seen by the reward model (seeded)", "check": FRACTION})
    pair_val_fraction: float = field(default=0.2, metadata={
        "help": "of each part (reward model, judge): pairs held out for its pairwise accuracy", "check": FRACTION})


@dataclass
class DataConfig:
    task: str = field(default="gsm8k", metadata={
        "help": "which task plug-in reads, splits, prompts and scores the data (posttrain/tasks/)",
        "check": one_of(*TASKS)})
    val_fraction: float = field(default=0.05, metadata={
        "help": "gsm8k: share of train held out for validation (style splits by its own rule)", "check": FRACTION})
    max_train: int = field(default=0, metadata={"help": "0 = keep all training records", "check": AT_LEAST_0})
    max_test: int = field(default=0, metadata={"help": "0 = keep all test records", "check": AT_LEAST_0})
    gsm8k: GSM8KTaskConfig = field(default_factory=GSM8KTaskConfig, metadata={
        "help": "the gsm8k task's data (posttrain/tasks/gsm8k.py)"})
    style: StyleTaskConfig = field(default_factory=StyleTaskConfig, metadata={
        "help": "the style task's data (posttrain/tasks/style.py)"})
    chat: ChatTaskConfig = field(default_factory=ChatTaskConfig, metadata={
        "help": "the chat task's data (posttrain/tasks/chat.py)"})

    @property
    def source(self) -> str:
        """The chosen task's data source."""
        return getattr(self, self.task).source


# --------------------------------------------------------------------------- base model, reward model, SFT


@dataclass
class BaseConfig:
    source: str = field(default="smollm2", metadata={
        "help": "smollm2 (PyPI wheel) | tiny (random, from a config) | local HF folder | hub id"})
    tiny: dict = field(default_factory=dict, metadata={"help": "LlamaConfig fields for source=tiny"})


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

    epochs: int = field(default=30, metadata={
        "help": "passes over the pairs (features are computed once: an epoch takes milliseconds)", "check": AT_LEAST_1})
    learning_rate: float = field(default=1.0e-3, metadata={"help": "AdamW on the head only", "check": POSITIVE})
    batch_size: int = field(default=16, metadata={"help": "pairs per step", "check": AT_LEAST_1})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW's weight decay", "check": AT_LEAST_0})
    dropout: float = field(default=0.1, metadata={
        "help": "after each hidden layer of the head (StrictBot's)", "check": between(0, 1, high_open=True)})
    sample_temperature: float = field(default=1.0, metadata={
        "help": "without preference data: rejected = a base-model sample at this temperature", "check": POSITIVE})
    sample_max_new_tokens: int = field(default=48, metadata={
        "help": "... of at most this many tokens", "check": AT_LEAST_1})


@dataclass
class RewardModelConfig:
    kind: str = field(default="task", metadata={
        "help": "task (the task's own: chat mlp_head; others classifier, pairwise for PPO) | classifier (encoder "
                "verifier; DRaFT and the `verifier` reward) | pairwise (LM + scalar head; PPO) | mlp_head (frozen "
                "base LM + MLP head on the last token, the StrictBot notebook's; PPO)",
        "check": one_of("task", *REWARD_MODEL_KINDS)})
    encoder: str = field(default="minilm", metadata={"help": "classifier: minilm (PyPI wheel) | tiny | local HF folder"})
    n_examples: int = field(default=512, metadata={
        "help": "references + corrupted references used to train the verifier", "check": between(2, None)})
    max_length: int = field(default=256, metadata={
        "help": "tokens of a text the reward model reads (longer ones are truncated)", "check": between(8, None)})
    training: dict = field(default_factory=dict, metadata={"help": "transformers.TrainingArguments fields"})
    mlp_head: MLPHeadConfig = field(default_factory=MLPHeadConfig, metadata={
        "help": "kind mlp_head (also the chat task's judge)"})
    max_shortcut_pass: float = field(default=0.2, metadata={
        "help": "text tasks: the judge and reward model train on shortcut negatives (input copied or broken into "
                "lines, a line repeated, a reply cut off; posttrain/reward_models/shortcuts.py) and a kind they "
                "still pass on more than this share of held-out items is a loud warning, as the chance check is",
        "check": between(0, 1)})


@dataclass
class SFTConfig:
    max_examples: int = field(default=256, metadata={"help": "training records SFT uses (0 = all)", "check": AT_LEAST_0})
    quantization: str = field(default="none", metadata={
        "help": "none | 4bit (QLoRA: nf4 base, bitsandbytes) | 8bit: the frozen base's precision",
        "check": one_of(*QUANTIZATION)})
    lora: dict = field(default_factory=dict, metadata={"help": "peft.LoraConfig fields (use_dora: true for DoRA)"})
    training: dict = field(default_factory=dict, metadata={
        "help": "trl.SFTConfig fields; max_steps `task`: the task's quick budget"})


# --------------------------------------------------------------------------- RL


@dataclass
class DraftConfig:
    """DRaFT: loss = LM loss - beta_t * reward(Gumbel-softmax soft tokens -> frozen encoder reward model)."""

    reward_model: str = field(default="models/reward_model", metadata={
        "help": "frozen encoder classifier (reward_model.kind: classifier)"})
    variant: str = field(default="project", metadata={
        "help": "project (sigmoid, the encoder's embedding block) | draft_notebook (the DRaFT notebook's: raw "
                "class-1 logit, new LayerNorm)", "check": one_of("project", "draft_notebook")})
    beta: float = field(default=1.0, metadata={
        "help": "once warmed up, with balance: the reward gradient's norm as a multiple of the LM loss's; "
                "without: the reward's plain weight (the DRaFT notebook: 0.1, a plain weight)", "check": AT_LEAST_0})
    warmup_steps: int = field(default=4, metadata={
        "help": "beta ramps linearly from 0 to `beta` over these optimizer steps (the DRaFT notebook: 50)",
        "check": AT_LEAST_0})
    tau: float = field(default=1.0, metadata={"help": "Gumbel-softmax temperature", "check": POSITIVE})
    hard: bool = field(default=False, metadata={"help": "straight-through one-hot samples instead of soft ones"})
    bridge_fit_steps: int = field(default=100, metadata={
        "help": "fit the bridge first (Adam steps), so real text fed as one-hot tokens scores as the reward model "
                "scores it (0: no fit, the notebook's way: the bridge starts random and learns with the adapter; "
                "style: held-out error 0.278 -> 0.027 in 100 steps, 18 s on 2 cores, 0.019 in 200)",
        "check": AT_LEAST_0})
    train_bridge: bool = field(default=False, metadata={
        "help": "after the fit: false = frozen, so a reward gain can only come from the policy; true = trained "
                "with the adapter"})
    balance: bool = field(default=True, metadata={
        "help": "true: beta is the reward gradient's norm on the trainable weights as a multiple of the LM loss's, "
                "measured every step (two extra backward passes); false: beta is a plain weight on the reward"})
    monitor_every: int = field(default=2, metadata={
        "help": "every N steps, greedy replies to 4 training prompts scored by the reward model on their text "
                "(decoded_reward; 0: off)", "check": AT_LEAST_0})
    training: dict = field(default_factory=dict, metadata={
        "help": "trl.SFTConfig fields (the LM-loss side is an SFT step)"})


@dataclass
class HybridConfig:
    """SFT and RL on one policy (posttrain/methods/hybrid.py): `alternate` = one SFT step then one PPO step on the same
    batch (the assignment's); `curriculum` = SFT and REINFORCE steps, the SFT share moving linearly start -> end."""

    mode: str = field(default="alternate", metadata={
        "help": "alternate | curriculum", "check": one_of("alternate", "curriculum")})
    sft_fraction_start: float = field(default=0.5, metadata={
        "help": "curriculum: share of SFT steps at the first step (1.0 = only SFT)", "check": between(0, 1)})
    sft_fraction_end: float = field(default=0.5, metadata={
        "help": "... and at the last step (lower than start = curriculum towards RL)", "check": between(0, 1)})
    sft_batch_size: int = field(default=4, metadata={
        "help": "questions per SFT micro-batch (alternate: also the PPO step's questions)", "check": AT_LEAST_1})
    # alternate's PPO step: trl.experimental.ppo.PPOConfig's names and defaults
    cliprange: float = field(default=0.2, metadata={"help": "PPO's clip range of the policy ratio", "check": POSITIVE})
    cliprange_value: float = field(default=0.2, metadata={
        "help": "PPO's clip range of the value loss", "check": POSITIVE})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss", "check": AT_LEAST_0})
    kl_coef: float = field(default=0.05, metadata={
        "help": "per-token k1 KL penalty to the reference (adapter disabled) in the reward", "check": AT_LEAST_0})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount", "check": between(0, 1)})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda", "check": between(0, 1)})
    ppo_epochs: int = field(default=1, metadata={
        "help": "optimisation passes over each sampled batch", "check": AT_LEAST_1})
    learning_rate: float = field(default=2.0e-4, metadata={
        "help": "its own LoRA learning rate (not rl.training's): the SFT and RL steps share one adapter, whose B "
                "starts at zero and moves ~lr per Adam step; 1e-5 over a few steps moves no greedy token "
                "(docs/methods/hybrid.md)", "check": POSITIVE})


@dataclass
class ReinforceConfig:
    """The REINFORCE estimator's choices (posttrain/methods/reinforce.py); the assignment: k1, token_mean, [-20, 0]."""

    kl_estimator: str = field(default="k3", metadata={
        "help": "k3 (unbiased, >= 0) | k1 (log ratio, the assignment's)", "check": one_of("k1", "k3")})
    kl_reduction: str = field(default="sequence_sum", metadata={
        "help": "sequence_sum | token_mean (the assignment's)", "check": one_of("sequence_sum", "token_mean")})
    logprob_clamp: list = field(default_factory=list, metadata={
        "help": "[] = none, or [low, high] (the assignment's [-20, 0])",
        "check": (_logprob_clamp_ok, "[] or [low, high]")})


@dataclass
class NamedClassConfig:
    """An optimizer or LR schedule by name with kwargs (posttrain/training/optim.py); empty name: rl.training's."""

    name: str = field(default="", metadata={"help": "the class's name; empty: rl.training's choice"})
    kwargs: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the class"})


@dataclass
class RLConfig:
    method: str = field(default="grpo", metadata={
        "help": "grpo | reinforce | ppo | draft | hybrid (posttrain/methods/)", "check": one_of(*RL_METHODS)})
    max_prompts: int = field(default=64, metadata={
        "help": "training questions used (as prompts, or as question -> answer pairs by draft/hybrid)",
        "check": AT_LEAST_0})
    lora: dict = field(default_factory=dict, metadata={"help": "peft.LoraConfig fields (use_dora: true for DoRA)"})
    training: dict = field(default_factory=dict, metadata={
        "help": "trl.GRPOConfig fields (grpo, reinforce, hybrid's RL steps)"})
    rewards: dict | str = field(default_factory=dict, metadata={
        "help": "name -> weight or {weight, options}; or a typed spec {type: weighted_sum, components, "
                "postprocess}, inline or as a JSON file path (posttrain/rewards/); empty: the task's defaults"})
    reward_postprocess: dict | list = field(default_factory=dict, metadata={
        "help": "{clip: [lo, hi], scale, normalize, ema_decay, normalize_weights}, or an ordered chain "
                "[{type: clip, ...}, ...]"})
    ppo: dict = field(default_factory=dict, metadata={
        "help": "trl.experimental.ppo.PPOConfig fields (method: ppo); unset kl_coef, response_length, "
                "temperature: the task's"})
    value_learning_rate: float = field(default=0.0, metadata={
        "help": "method ppo: the value model's learning rate; 0 = mlp_head: the rate its head trained at "
                "(reward_model.mlp_head.learning_rate), pairwise: rl.ppo.learning_rate",
        "check": AT_LEAST_0})
    draft: DraftConfig = field(default_factory=DraftConfig, metadata={"help": "method draft"})
    hybrid: HybridConfig = field(default_factory=HybridConfig, metadata={"help": "method hybrid"})
    reinforce: ReinforceConfig = field(default_factory=ReinforceConfig, metadata={
        "help": "method reinforce, also hybrid curriculum's RL steps"})
    optimizer: NamedClassConfig = field(default_factory=NamedClassConfig, metadata={
        "help": "reinforce/hybrid: a TrainingArguments optim name, or a bitsandbytes.optim / torch.optim class by name"})
    lr_scheduler: NamedClassConfig = field(default_factory=NamedClassConfig, metadata={
        "help": "reinforce/hybrid: a TrainingArguments lr_scheduler_type, none, or a torch.optim.lr_scheduler class "
                "by name"})


# --------------------------------------------------------------------------- evaluation, gate


@dataclass
class EvalConfig:
    n_questions: int = field(default=50, metadata={"help": "test items scored (0 = all)", "check": AT_LEAST_0})
    batch_size: int = field(default=64, metadata={
        "help": "rows decoded together (posttrain/evaluation/decoding.py)", "check": AT_LEAST_1})
    streams: int = field(default=0, metadata={
        "help": "batches decoded side by side in threads, sharing batch_size; 0 = auto (CPU: 1 per 32 rows)",
        "check": AT_LEAST_0})
    max_new_tokens: int = field(default=256, metadata={"help": "the reply's token limit", "check": AT_LEAST_1})
    prompt_style: str = field(default="chat", metadata={
        "help": "chat (tokenizer's chat template) | plain (\"Question: ...\\nAnswer:\") | strictbot "
                "(\"<|user|> ... <|end|>\\n<|assistant|>\")", "check": one_of("chat", "plain", "strictbot")})
    shots: int = field(default=0, metadata={"help": "k-shot examples taken from the training split", "check": AT_LEAST_0})
    system_prompt: str = field(default="task", metadata={
        "help": "`task`: the task's own (data.<task>.system_prompt); anything else is used as is"})
    dtype: str = field(default="float32", metadata={
        "help": "the evaluated model's precision", "check": one_of("float32", "bfloat16", "float16")})
    # Well-formed replies (posttrain/evaluation/degeneration.py), recorded for every task; for the text tasks
    # (style, chat) a reply that did not end before max_new_tokens, loops or copies its input does not pass.
    # Chosen before any RL method was scored with them: a loop to the token limit measures ~0.9, real poems 0-0.2.
    repetition_ngram: int = field(default=4, metadata={"help": "rep-n's n, in words", "check": AT_LEAST_1})
    max_repeated_ngrams: float = field(default=0.5, metadata={
        "help": "a reply whose share of repeated n-grams is above this loops", "check": between(0, 1)})
    max_copy_overlap: float = field(default=0.9, metadata={
        "help": "a reply with ROUGE-L F1 to its input at or above this copied it", "check": between(0, 1, low_open=True)})


@dataclass
class PromoteConfig:
    registered_model: str = field(default="{task}-policy", metadata={
        "help": "the registered model's name; {task} is replaced by data.task",
        "check": ((lambda value: bool(value.strip())), "a non-empty name")})
    metric: str = field(default="task", metadata={
        "help": "what the gate pairs per item: `task` (its default), a pass/fail the task scores (McNemar), or a "
                "per-item score (style: judge_p_poem; chat: judge_margin; paired bootstrap + Wilcoxon signed-rank)"})
    threshold: float = field(default=0.0, metadata={
        "help": "minimum absolute accuracy of the candidate (pass/fail metrics; a score has no floor)",
        "check": between(0, 1)})
    # A negative minimum effect would promote a candidate that is worse than its baseline.
    min_effect: float = field(default=0.0, metadata={
        "help": "the lower CI bound of (candidate - baseline) must exceed this", "check": AT_LEAST_0})
    confidence: float = field(default=0.95, metadata={
        "help": "confidence of the interval", "check": between(0.5, 1, low_open=True, high_open=True)})
    n_bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples", "check": between(100, None)})


@dataclass
class Params:
    seed: int = field(default=42, metadata={"help": "the random seed of every stage"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "stage prepare: the task and its data"})
    base: BaseConfig = field(default_factory=BaseConfig, metadata={"help": "stage base: the model everything starts from"})
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig, metadata={
        "help": "stages reward_model and judge"})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "stage sft: LoRA/DoRA SFT, prompt masked"})
    rl: RLConfig = field(default_factory=RLConfig, metadata={"help": "stage rl: the method, its rewards and budget"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={
        "help": "stages eval_base, eval_sft, eval_rl: the protocol is recorded with each result"})
    promote: PromoteConfig = field(default_factory=PromoteConfig, metadata={"help": "stage promote: the evidence gate"})


# --------------------------------------------------------------------------- reading the metadata


def section(params: Params, path: tuple[str, ...]) -> Any:
    """The value at a key path: params.rl.draft for ('rl', 'draft'), a library section's key inside its dict."""
    node: Any = params
    for name in path:
        node = node[name] if isinstance(node, dict) else getattr(node, name)
    return node


class Described(typing.NamedTuple):
    path: tuple[str, ...]  # ('rl', 'hybrid', 'mode')
    value: Any
    declaration: dataclasses.Field  # its metadata holds `help` and, where a type does not say it all, `check`
    annotation: Any


def described_fields(node: Any = None, prefix: tuple[str, ...] = ()) -> Iterator[Described]:
    """Every field of `node` (default: the defaults, Params()) and of its sections, depth first in declaration order."""
    node = Params() if node is None else node
    hints = typing.get_type_hints(type(node))
    for item in dataclasses.fields(node):
        value = getattr(node, item.name)
        yield Described(prefix + (item.name,), value, item, hints[item.name])
        if dataclasses.is_dataclass(value):
            yield from described_fields(value, prefix + (item.name,))


def check_fields(params: Params, where: Callable[[tuple[str, ...]], str]) -> None:
    """Every field's `check`: the first value outside its range or choices fails, naming its line."""
    for path, value, item, _ in described_fields(params):
        if "check" in item.metadata:
            ok, must_be = item.metadata["check"]
            if not ok(value):
                raise ConfigError(f"{where(path)}: '{'.'.join(path)}' must be {must_be}, got {value!r}")


def type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def help_text(prefix: str = "", width: int = 100) -> str:
    """Every field under `prefix` (e.g. `rl.hybrid`; all when empty): key, type, default and check, then its help."""
    lines = []
    for path, value, item, annotation in described_fields():
        name = ".".join(path)
        if prefix and not (name == prefix or name.startswith(prefix + ".")):
            continue
        if dataclasses.is_dataclass(value):
            lines += ["", f"{name}:"]
        else:
            check = item.metadata.get("check")
            lines.append(f"{name} ({type_name(annotation)}) = {value!r}" + (f"   [{check[1]}]" if check else ""))
        lines += textwrap.wrap(item.metadata.get("help", ""), width, initial_indent="    ", subsequent_indent="    ",
                               break_on_hyphens=False)
    return "\n".join(lines).strip("\n")


def value_has_type(value: Any, annotation: Any) -> bool:
    """Whether a params value fits a field's annotation (only what YAML can give: numbers, strings, bools, ...)."""
    if annotation in (Any, "Any"):
        return True
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, dict, bool, list):
        return isinstance(value, annotation)
    if isinstance(annotation, types.UnionType):
        return any(value_has_type(value, arm) for arm in typing.get_args(annotation))
    return True
