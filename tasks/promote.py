"""Stage `promote`: register the candidate and move alias `champion` to it only on evidence.

    posttrain stage promote          # or: dvc repro promote ; posttrain gate (exit code = decision)

The baseline is the current champion (its per-question results are cached by version, protocol
and question-set hash, so it is never re-evaluated), or the base model when there is no champion
yet. The decision, the interval, the p-value and the paired counts go to MLflow (metrics of this
stage's run, tags on the model version) and to reports/promotion.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from posttrain.config import Params, to_dict
from posttrain.gate import GateRefused, check_same_protocol, decide, pair_records
from posttrain.io import atomic_path, read_json, read_jsonl

CHAMPION = "champion"
CACHE_DIR = Path(".cache/champion_evals")


def champion_results(client, name: str, version, cache_dir: Path) -> tuple[dict, list[dict]]:
    """The champion's eval metrics and per-question records, from the local cache or its run."""
    tags = version.tags
    key = f"v{version.version}-{tags.get('protocol_hash', 'na')}-{tags.get('question_set_hash', 'na')}"
    cached = cache_dir / key
    if not (cached / "records.jsonl").exists():
        import mlflow

        with atomic_path(cached, is_dir=True) as tmp:
            mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="eval", dst_path=str(tmp))
            for item in (tmp / "eval").iterdir():
                shutil.move(str(item), tmp / item.name)
    return read_json(cached / "metrics.json"), read_jsonl(cached / "records.jsonl")


def model_card(params: Params, candidate_metrics: dict, decision: dict, data_hash: str) -> str:
    cfg = to_dict(params)
    return "\n".join([
        f"# {params.promote.registered_model}",
        "",
        f"- base model: `{params.base.source}`",
        f"- data: GSM8K from `{params.data.source}`, prepared train split sha256 `{data_hash}`",
        f"- method: SFT ({'DoRA' if params.sft.lora.get('use_dora') else 'LoRA'}) -> merge -> {params.rl.method}",
        f"- accuracy: strict {candidate_metrics['accuracy_strict']:.3f}, flexible {candidate_metrics['accuracy_flexible']:.3f} "
        f"on {candidate_metrics['n_questions']} GSM8K test questions",
        f"- protocol `{candidate_metrics['protocol_hash']}`: `{json.dumps(candidate_metrics['protocol'])}`",
        f"- gate: {'promoted' if decision['promote'] else 'rejected'}: {decision['reason']}",
        "",
        "## Params",
        "```json",
        json.dumps({k: cfg[k] for k in ("seed", "sft", "rl", "eval", "promote")}, indent=2),
        "```",
    ])


def _file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "unknown"


def run(params: Params, candidate_dir: str | Path, candidate_eval: str | Path, base_eval: str | Path,
        sft_eval: str | Path, cache_dir: Path = CACHE_DIR, register: bool = True) -> dict:
    import mlflow
    from mlflow import MlflowClient

    cfg = params.promote
    key = f"correct_{cfg.metric}"
    candidate_eval, base_eval = Path(candidate_eval), Path(base_eval)
    cand_metrics, cand_records = read_json(candidate_eval / "metrics.json"), read_jsonl(candidate_eval / "records.jsonl")
    client = MlflowClient()
    try:
        champion = client.get_model_version_by_alias(cfg.registered_model, CHAMPION)
    except Exception:  # no registered model or no alias yet
        champion = None
    if champion is not None:
        baseline_name = f"champion v{champion.version}"
        base_metrics, base_records = champion_results(client, cfg.registered_model, champion, Path(cache_dir))
    else:
        baseline_name = "base model"
        base_metrics, base_records = read_json(base_eval / "metrics.json"), read_jsonl(base_eval / "records.jsonl")

    try:
        check_same_protocol(cand_metrics, base_metrics)
        cand, base = pair_records(cand_records, base_records, key)
        result = decide(cand, base, cfg.threshold, cfg.min_effect, cfg.confidence, cfg.n_bootstrap, params.seed)
        decision = result.as_dict()
    except GateRefused as refused:
        decision = {"promote": False, "reason": f"refused: {refused}"}
    decision |= {"baseline": baseline_name, "metric": cfg.metric, "promoted": float(decision["promote"])}

    version = None
    if register:
        run = mlflow.active_run()
        card = model_card(params, cand_metrics, decision, _file_sha(Path("data/prepared/train.jsonl")))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "MODEL_CARD.md").write_text(card)
            mlflow.log_artifact(str(Path(tmp) / "MODEL_CARD.md"), artifact_path="model")
        mlflow.log_artifacts(str(candidate_dir), artifact_path="model")
        for small in ("metrics.json", "records.jsonl"):
            mlflow.log_artifact(str(candidate_eval / small), artifact_path="eval")
        # The model is a plain HF folder of artifacts, not an MLflow "logged model": register it by location.
        try:
            client.create_registered_model(cfg.registered_model)
        except mlflow.exceptions.MlflowException:
            pass  # already exists
        model_version = client.create_model_version(
            cfg.registered_model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        )
        version = model_version.version
        tags = {
            "protocol_hash": cand_metrics["protocol_hash"],
            "question_set_hash": cand_metrics["question_set_hash"],
            "accuracy_strict": cand_metrics["accuracy_strict"],
            "accuracy_flexible": cand_metrics["accuracy_flexible"],
            "gate.decision": "promoted" if decision["promote"] else "rejected",
            "gate.reason": decision["reason"],
            "gate.baseline": baseline_name,
        }
        for field in ("ci_low", "ci_high", "mcnemar_p", "count_both_right", "count_only_candidate",
                      "count_only_baseline", "count_both_wrong"):
            if field in decision:
                tags[f"gate.{field}"] = decision[field]
        for tag, value in tags.items():
            client.set_model_version_tag(cfg.registered_model, version, tag, str(value))
        client.update_model_version(cfg.registered_model, version, description=card)
        if decision["promote"]:
            client.set_registered_model_alias(cfg.registered_model, CHAMPION, version)
        mlflow.set_tags({"gate.decision": tags["gate.decision"], "gate.reason": decision["reason"][:5000]})
    decision["model_version"] = version
    return {"metrics": {k: v for k, v in decision.items()}}
