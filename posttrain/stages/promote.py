"""Stage `promote`: register the candidate and move alias `champion` to it only on evidence.

    posttrain stage promote          # or: dvc repro promote ; posttrain gate (exit code = decision)

The baseline is the current champion (its per-question results are cached by version, protocol
and question-set hash, so it is never re-evaluated), or the base model when there is no champion
yet. The decision, the interval, the p-value and the paired counts go to MLflow (metrics of this
stage's run, tags on the model version) and to reports/promotion.json. The registry side:
posttrain/release/registry.py; the decision: posttrain/release/gate.py.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import Params
from posttrain.release.registry import (CACHE_DIR, baseline_results, gate_decision, read_eval, register_candidate,
                                        stage_gain)


def run(params: Params, candidate_dir: str | Path, candidate_eval: str | Path, base_eval: str | Path,
        sft_eval: str | Path, cache_dir: Path = CACHE_DIR, register: bool = True) -> dict:
    from mlflow import MlflowClient

    cfg = params.promote
    candidate_eval = Path(candidate_eval)
    candidate = read_eval(candidate_eval, cfg.metric)
    client = MlflowClient()
    baseline_name, *baseline = baseline_results(client, cfg, Path(base_eval), Path(cache_dir))
    decision = gate_decision(cfg, params.seed, candidate, tuple(baseline), baseline_name)
    if (Path(sft_eval) / "metrics.json").exists():  # what the RL stage added over the model it started from
        decision |= stage_gain(cfg, params.seed, candidate, read_eval(sft_eval, cfg.metric))
    version = None
    if register:
        version = register_candidate(client, params, Path(candidate_dir), candidate_eval, candidate[0], decision,
                                     baseline_name, Path(cache_dir))
    decision["model_version"] = version
    return {"metrics": dict(decision)}
