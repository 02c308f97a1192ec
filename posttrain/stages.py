"""THE stage graph: the one definition that dvc.yaml is generated from and the Prefect flow runs.

    posttrain dvc-yaml               # rewrite dvc.yaml from STAGES (a test checks they agree)

Each stage names its task module, the keyword paths its `run()` takes, what it depends on and
what it writes. DVC decides what is stale; the flow asks DVC to reproduce each stage in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

PREPARED = "data/prepared"
MODELS = "models"
REPORTS = "reports"
PLOTS = "plots"


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # tasks.<module>.run(params, **inputs, **outputs)
    inputs: dict[str, str] = field(default_factory=dict)  # run() kwarg -> path it reads
    outputs: dict[str, str] = field(default_factory=dict)  # run() kwarg -> path it writes (DVC-cached)
    params: tuple[str, ...] = ()  # params.yaml keys it reads
    extra_deps: tuple[str, ...] = ()  # deps that are not run() arguments
    metrics: str | None = None  # JSON metrics file the runner writes from the module's metrics()
    retries: int = 0  # Prefect retries: for stages that touch the network or the registry
    plots: bool = False  # outputs are `dvc plots` (not cached) instead of `outs`
    data_parallel: bool = False  # every rank trains under a launcher (posttrain/distributed.py); else rank 0 only


def _eval_stage(model: str) -> Stage:
    return Stage(
        name=f"eval_{model}", module="evaluate",
        inputs={"model_dir": f"{MODELS}/{model}", "test_path": f"{PREPARED}/test.jsonl", "train_path": f"{PREPARED}/train.jsonl"},
        outputs={"out_dir": f"{REPORTS}/eval/{model}"},
        params=("eval",), metrics=f"{REPORTS}/eval_{model}.json",
    )


STAGES: list[Stage] = [
    Stage("prepare", "prepare", outputs={"out_dir": PREPARED}, params=("seed", "data"),
          extra_deps=("${data.source}",), metrics=f"{REPORTS}/prepare.json", retries=2),
    Stage("base", "base", outputs={"out_dir": f"{MODELS}/base"}, params=("seed", "base"),
          metrics=f"{REPORTS}/base.json", retries=2),
    Stage("reward_model", "reward_model",
          # base_dir: kind=pairwise starts from the base LM (and shares its tokenizer with the policy)
          inputs={"train_path": f"{PREPARED}/train.jsonl", "val_path": f"{PREPARED}/val.jsonl",
                  "base_dir": f"{MODELS}/base"},
          outputs={"out_dir": f"{MODELS}/reward_model"}, params=("seed", "reward_model", "eval.prompt_style",
                                                                 "eval.system_prompt"),
          metrics=f"{REPORTS}/reward_model.json"),
    Stage("sft", "sft", inputs={"train_path": f"{PREPARED}/train.jsonl", "base_dir": f"{MODELS}/base"},
          outputs={"out_dir": f"{MODELS}/sft_adapter"}, params=("seed", "sft", "eval.prompt_style", "eval.system_prompt"),
          metrics=f"{REPORTS}/sft.json", data_parallel=True),
    Stage("merge", "merge", inputs={"base_dir": f"{MODELS}/base", "adapter_dir": f"{MODELS}/sft_adapter"},
          outputs={"out_dir": f"{MODELS}/sft"}),
    Stage("rl", "rl", inputs={"train_path": f"{PREPARED}/train.jsonl", "model_dir": f"{MODELS}/sft"},
          outputs={"out_dir": f"{MODELS}/rl"}, params=("seed", "rl", "eval.prompt_style", "eval.system_prompt"),
          extra_deps=("posttrain/rewards.py", "posttrain/ppo.py", f"{MODELS}/reward_model"),
          metrics=f"{REPORTS}/rl.json", data_parallel=True),
    _eval_stage("base"),
    _eval_stage("sft"),
    _eval_stage("rl"),
    Stage("promote", "promote",
          inputs={"candidate_dir": f"{MODELS}/rl", "candidate_eval": f"{REPORTS}/eval/rl",
                  "base_eval": f"{REPORTS}/eval/base", "sft_eval": f"{REPORTS}/eval/sft"},
          params=("promote",), metrics=f"{REPORTS}/promotion.json", retries=2),
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


def dvc_stages() -> dict:
    """The `stages:` mapping of dvc.yaml."""
    out = {}
    for stage in STAGES:
        entry: dict = {"cmd": f"python -m posttrain stage {stage.name}"}
        deps = [f"tasks/{stage.module}.py", *stage.extra_deps, *dict.fromkeys(stage.inputs.values())]
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


HEADER = "# Generated from posttrain/stages.py by `posttrain dvc-yaml`: edit that file, not this one.\n"


def dvc_plots() -> list:
    """Top-level `plots:` of dvc.yaml: `dvc plots show` / `dvc plots diff` read these."""
    return [
        {f"{PLOTS}/sft_loss.json": {"x": "step", "y": "loss", "title": "SFT loss"}},
        {f"{PLOTS}/rl_reward.json": {"x": "step", "y": "reward", "title": "RL reward"}},
        {f"{PLOTS}/rl_kl.json": {"x": "step", "y": "kl", "title": "RL KL to reference"}},
        {f"{PLOTS}/accuracy.json": {"x": "model", "y": ["accuracy_strict", "accuracy_flexible"],
                                    "template": "bar_horizontal", "title": "GSM8K accuracy"}},
        f"{PLOTS}/training.png",
        f"{PLOTS}/accuracy.png",
    ]


def dvc_yaml_text() -> str:
    return HEADER + yaml.safe_dump({"stages": dvc_stages(), "plots": dvc_plots()}, sort_keys=False, width=120)


def write_dvc_yaml(root: str | Path = ".") -> Path:
    path = Path(root) / "dvc.yaml"
    path.write_text(dvc_yaml_text())
    return path
