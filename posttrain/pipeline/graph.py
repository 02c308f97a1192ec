"""THE stage graph: the one definition that dvc.yaml is generated from and the Prefect flow runs.

    posttrain dvc-yaml               # rewrite dvc.yaml from STAGES (a test checks they agree)

Each stage names its task module, the keyword paths its `run()` takes, what it depends on and
what it writes. DVC decides what is stale; the flow asks DVC to reproduce each stage in order.
A stage's code deps are derived, not listed: its task module and every project module it imports
(`code_deps`), so changed code reruns exactly the stages that run it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PREPARED = "data/prepared"
MODELS = "models"
REPORTS = "reports"
PLOTS = "plots"
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("posttrain",)  # the project's own code; anything else is an installed library
# `python -m posttrain stage <name>` (cli.py) calls the runner for every stage; it writes each stage's metrics file.
RUNNER = "posttrain/pipeline/runner.py"
# What the runner loads every stage's params with: the values a stage runs on (`task` resolved, checks) come from it.
PARAMS_LOADER = "posttrain/config/loader.py"
# One module per stage: posttrain/stages/<Stage.module>.py, with run(params, **inputs, **outputs).
STAGE_PACKAGE = "posttrain/stages"


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # posttrain.stages.<module>.run(params, **inputs, **outputs)
    inputs: dict[str, str] = field(default_factory=dict)  # run() kwarg -> path it reads
    outputs: dict[str, str] = field(default_factory=dict)  # run() kwarg -> path it writes (DVC-cached)
    params: tuple[str, ...] = ()  # params.yaml keys it reads
    extra_deps: tuple[str, ...] = ()  # data/model deps that are not run() arguments (code deps are derived)
    metrics: str | None = None  # JSON metrics file the runner writes from the module's metrics()
    retries: int = 0  # Prefect retries: for stages that touch the network or the registry
    plots: bool = False  # outputs are `dvc plots` (not cached) instead of `outs`
    data_parallel: bool = False  # every rank trains under a launcher (posttrain/training/distributed.py); else rank 0 only


# What every stage that builds prompts or reads the task's records depends on, beside its own section.
TASK_PARAMS = ("data.task", "data.gsm8k", "data.style", "data.chat", "eval.prompt_style", "eval.system_prompt")


def _eval_stage(model: str) -> Stage:
    return Stage(
        name=f"eval_{model}", module="evaluate",
        inputs={"model_dir": f"{MODELS}/{model}", "test_path": f"{PREPARED}/test.jsonl",
                "train_path": f"{PREPARED}/train.jsonl", "judge_dir": f"{MODELS}/judge"},
        outputs={"out_dir": f"{REPORTS}/eval/{model}"},
        params=("eval", "data.task", "data.gsm8k", "data.style", "data.chat", "base.source"),
        metrics=f"{REPORTS}/eval_{model}.json",
    )


STAGES: list[Stage] = [
    Stage("prepare", "prepare", outputs={"out_dir": PREPARED}, params=("seed", "data"),
          # every task's source: whichever data.task picks (DVC cannot choose one by a param)
          extra_deps=("${data.gsm8k.source}", "${data.style.source}", "${data.chat.source}"),
          metrics=f"{REPORTS}/prepare.json", retries=2),
    Stage("base", "base_model", outputs={"out_dir": f"{MODELS}/base"}, params=("seed", "base"),
          metrics=f"{REPORTS}/base.json", retries=2),
    Stage("reward_model", "reward_model",
          # base_dir: kinds pairwise and mlp_head start from the base LM (and share its tokenizer with the policy);
          # preferences_path: the task's preference pairs (chat), empty for the others
          inputs={"train_path": f"{PREPARED}/train.jsonl", "val_path": f"{PREPARED}/val.jsonl",
                  "base_dir": f"{MODELS}/base", "preferences_path": f"{PREPARED}/preferences.jsonl"},
          # rl.method and rl.rewards decide whether it is needed at all (else it is skipped, saying why)
          outputs={"out_dir": f"{MODELS}/reward_model"},
          params=("seed", "reward_model", "rl.method", "rl.rewards", *TASK_PARAMS),
          metrics=f"{REPORTS}/reward_model.json"),
    Stage("judge", "judge", inputs={"train_path": f"{PREPARED}/train.jsonl", "val_path": f"{PREPARED}/val.jsonl",
                                    "base_dir": f"{MODELS}/base", "preferences_path": f"{PREPARED}/preferences.jsonl"},
          outputs={"out_dir": f"{MODELS}/judge"}, params=("seed", "reward_model", *TASK_PARAMS),
          metrics=f"{REPORTS}/judge.json"),
    Stage("sft", "sft", inputs={"train_path": f"{PREPARED}/train.jsonl", "base_dir": f"{MODELS}/base"},
          outputs={"out_dir": f"{MODELS}/sft_adapter"}, params=("seed", "sft", *TASK_PARAMS),
          metrics=f"{REPORTS}/sft.json", data_parallel=True),
    Stage("merge", "merge", inputs={"base_dir": f"{MODELS}/base", "adapter_dir": f"{MODELS}/sft_adapter"},
          outputs={"out_dir": f"{MODELS}/sft"}),
    Stage("rl", "rl", inputs={"train_path": f"{PREPARED}/train.jsonl", "model_dir": f"{MODELS}/sft"},
          outputs={"out_dir": f"{MODELS}/rl"}, params=("seed", "rl", *TASK_PARAMS),
          extra_deps=(f"{MODELS}/reward_model",),
          metrics=f"{REPORTS}/rl.json", data_parallel=True),
    _eval_stage("base"),
    _eval_stage("sft"),
    _eval_stage("rl"),
    Stage("promote", "promote",
          inputs={"candidate_dir": f"{MODELS}/rl", "candidate_eval": f"{REPORTS}/eval/rl",
                  "base_eval": f"{REPORTS}/eval/base", "sft_eval": f"{REPORTS}/eval/sft"},
          params=("promote", "data.task"), metrics=f"{REPORTS}/promotion.json", retries=2),
    Stage("report", "report",
          inputs={"sft_log": f"{MODELS}/sft_adapter/train_log.json", "rl_log": f"{MODELS}/rl/train_log.json",
                  "rm_log": f"{MODELS}/reward_model/train_log.json", "eval_base": f"{REPORTS}/eval_base.json",
                  "eval_sft": f"{REPORTS}/eval_sft.json", "eval_rl": f"{REPORTS}/eval_rl.json",
                  "promotion": f"{REPORTS}/promotion.json"},
          outputs={"out_dir": PLOTS}, plots=True),
]

BY_NAME = {stage.name: stage for stage in STAGES}


def get(name: str) -> Stage:
    if name not in BY_NAME:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def _imported_modules(path: Path) -> set[str]:
    """Dotted names of the project modules a file imports, at module level or inside functions (this
    codebase imports heavy or method-specific modules lazily, e.g. posttrain/stages/rl.py imports posttrain.methods.ppo
    only when rl.method is ppo)."""
    module = path.relative_to(ROOT).with_suffix("").parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from .x import y`: relative to the file's package
                base = ".".join([*module[:-node.level], *([base] if base else [])])
            # `from posttrain.rewards import composition` imports the module posttrain.rewards.composition; `from posttrain.io
            # import read_json` imports posttrain.io (posttrain/io/read_json.py does not exist: dropped later)
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] in PACKAGES}


def code_deps(path: str) -> list[str]:
    """The project files that run when `path` runs: the file and, transitively, every posttrain/,
    module it imports (module level and function level), sorted.

    Why: a stage's outputs depend on all the code it executes, not only on its task module, so that
    code must be a DVC dep, or changed extraction or loss code leaves stale models and metrics behind
    while `dvc status` says "up to date". It is read with `ast`, never imported: generating dvc.yaml
    stays cheap and gives the same answer whatever is installed. It over-approximates on purpose
    (posttrain/stages/rl.py depends on every RL method's module, whichever rl.method is set). Package
    __init__.py files are left out: they are empty. Dynamic imports (importlib) are not seen.
    """
    seen: set[Path] = set()
    todo = [ROOT / path]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        for name in _imported_modules(file):
            candidate = ROOT / (name.replace(".", "/") + ".py")
            if candidate.is_file():  # else a package (empty __init__) or a name defined inside a module
                todo.append(candidate)
    return sorted(file.relative_to(ROOT).as_posix() for file in seen)


def stage_code_deps(stage: Stage) -> list[str]:
    """The stage module's closure, the runner itself and the params loader's closure.

    The runner loads every stage's params (posttrain/config/loader.py resolves what `task` stands for), so
    the loader's closure is a dep of every stage. The runner's other imports are not followed: io.py is in
    every stage's closure anyway; tracking.py (and training.history_metrics) only log to MLflow;
    distributed.py is in the closure of the stages that train in parallel; graph.py is what dvc.yaml is
    generated from, so a change there shows up in dvc.yaml itself, stage by stage, instead of rerunning every
    stage. Nor is cli.py (with __main__.py): it only dispatches, and it imports most of the project lazily for its
    other commands (`posttrain eval` pulls in the evaluator), which would make every stage depend on
    almost everything.
    """
    return sorted({*code_deps(f"{STAGE_PACKAGE}/{stage.module}.py"), RUNNER, *code_deps(PARAMS_LOADER)})


def dvc_stages() -> dict:
    """The `stages:` mapping of dvc.yaml."""
    out = {}
    for stage in STAGES:
        entry: dict = {"cmd": f"python -m posttrain stage {stage.name}"}
        deps = [*stage_code_deps(stage), *stage.extra_deps, *dict.fromkeys(stage.inputs.values())]
        entry["deps"] = deps
        if stage.params:
            entry["params"] = list(stage.params)
        if stage.outputs and stage.plots:
            entry["outs"] = [{path: {"cache": False}} for path in stage.outputs.values()]
        elif stage.outputs:
            entry["outs"] = list(stage.outputs.values())
        if stage.metrics:
            entry["metrics"] = [{stage.metrics: {"cache": False}}]
        out[stage.name] = entry
    return out


HEADER = "# Generated from posttrain/pipeline/graph.py by `posttrain dvc-yaml`: edit that file, not this one.\n"


def dvc_plots() -> list:
    """Top-level `plots:` of dvc.yaml: `dvc plots show` / `dvc plots diff` read these."""
    return [
        {f"{PLOTS}/sft_loss.json": {"x": "step", "y": "loss", "title": "SFT loss"}},
        {f"{PLOTS}/rl_reward.json": {"x": "step", "y": "reward", "title": "RL reward"}},
        {f"{PLOTS}/rl_kl.json": {"x": "step", "y": "kl", "title": "RL KL to reference"}},
        {f"{PLOTS}/accuracy.json": {"x": "model", "y": "pass_rate", "template": "bar_horizontal",
                                    "title": "pass rate (promote.metric)"}},
        f"{PLOTS}/training.png",
        f"{PLOTS}/accuracy.png",
    ]


def dvc_yaml_text() -> str:
    return HEADER + yaml.safe_dump({"stages": dvc_stages(), "plots": dvc_plots()}, sort_keys=False, width=120)


def write_dvc_yaml(root: str | Path = ".") -> Path:
    path = Path(root) / "dvc.yaml"
    path.write_text(dvc_yaml_text())
    return path
