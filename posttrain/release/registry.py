"""The model registry side of promotion: eval reports read back, the champion and its cached results, the
candidate registered with its model card and gate tags, and alias `champion` moved on evidence.

Used by the promote stage (posttrain/stages/promote.py) and `posttrain compare` (posttrain/release/compare.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from posttrain.config.loader import to_dict
from posttrain.config.schema import Params
from posttrain.release.gate import (GateRefused, harm_reasons, pair_records, paired_decision, record_key,
                                    summary_key)
from posttrain.io import DataError, atomic_path, read_json, read_jsonl
from posttrain.release.tracking import PARENT_ENV, RegistryError

CHAMPION = "champion"
CACHE_DIR = Path(".cache/champion_evals")
EVAL_FILES = ("metrics.json", "records.jsonl")
METRIC_KEYS = ("n_questions", "protocol_hash", "question_set_hash")  # and accuracy_<metric> or <score>_mean


def read_eval(folder: str | Path, metric: str) -> tuple[dict, list[dict]]:
    """An eval report (metrics.json + records.jsonl), checked: a missing or corrupt one is a DataError."""
    folder = Path(folder)
    path = folder / "metrics.json"
    if not path.exists():
        raise DataError(f"{path}: eval report not found (run its eval stage first)")
    try:
        metrics = read_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: corrupt eval report ({str(err).splitlines()[0]})") from None
    missing = [key for key in METRIC_KEYS if not isinstance(metrics, dict) or key not in metrics]
    if not missing and summary_key(metrics, metric) not in metrics:
        missing = [f"accuracy_{metric}"]
    if missing:
        raise DataError(f"{path}: corrupt eval report (missing {', '.join(missing)})")
    key, kind = record_key(metrics, metric)
    records = read_jsonl(folder / "records.jsonl", required={"question": str, key: kind})
    return metrics, records


def _cache_key(version: str, protocol_hash: str, question_set_hash: str) -> str:
    return f"v{version}-{protocol_hash}-{question_set_hash}"


def champion_results(client, name: str, version, cache_dir: Path) -> tuple[dict, list[dict]]:
    """The champion's eval metrics and per-question records, from the local cache or its run."""
    tags = version.tags
    cached = cache_dir / _cache_key(version.version, tags.get("protocol_hash", "na"), tags.get("question_set_hash", "na"))
    if not (cached / "records.jsonl").exists():
        import mlflow

        with atomic_path(cached, is_dir=True) as tmp:
            mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="eval", dst_path=str(tmp))
            for item in (tmp / "eval").iterdir():
                shutil.move(str(item), tmp / item.name)
    return read_json(cached / "metrics.json"), read_jsonl(cached / "records.jsonl")


def _accuracies(metrics: dict) -> dict[str, float]:
    return {key.removeprefix("accuracy_"): value for key, value in metrics.items() if key.startswith("accuracy_")}


def well_formed_line(metrics: dict) -> str:
    """The evaluation's degeneration rates in one line (posttrain/evaluation/degeneration.py)."""
    if "truncation_rate" not in metrics:
        return "not measured (an eval report from before the checks)"
    return (f"cut off at the token limit {metrics['truncation_rate']:.3f}, looping {metrics['repetition_rate']:.3f}, "
            f"input copied {metrics['copy_rate']:.3f} of items"
            + (f", median length {metrics['length_ratio_median']:.2f}x the reference"
               if metrics.get("length_ratio_median") is not None else ""))


def stage_gain_line(decision: dict) -> str:
    changed = decision.get("rl_changed_replies")
    return ((f"{changed:.0%} of greedy replies changed; " if changed is not None else "")
            + f"{decision['metric']} {decision['rl_vs_sft_difference']:+.3f}, {decision.get('confidence', 0.95):.0%} "
            f"paired interval [{decision['rl_vs_sft_ci_low']:+.3f}, {decision['rl_vs_sft_ci_high']:+.3f}], "
            f"{decision['rl_vs_sft_test']} p={decision['rl_vs_sft_p_value']:.3g}")


def model_card(params: Params, candidate_metrics: dict, decision: dict, data_hash: str) -> str:
    cfg = to_dict(params)
    scores = ", ".join(f"{name} {value:.3f}" for name, value in _accuracies(candidate_metrics).items())
    return "\n".join([
        f"# {params.promote.registered_model}",
        "",
        f"- base model: `{params.base.source}`",
        f"- data: task {params.data.task} from `{params.data.source}`, prepared train split sha256 `{data_hash}`",
        f"- method: SFT ({'DoRA' if params.sft.lora.get('use_dora') else 'LoRA'}) -> merge -> {params.rl.method}",
        f"- pass rates: {scores} on {candidate_metrics['n_questions']} held-out {params.data.task} items",
        f"- protocol `{candidate_metrics['protocol_hash']}`: `{json.dumps(candidate_metrics['protocol'])}`",
        f"- well-formed replies: {well_formed_line(candidate_metrics)}",
        f"- gate: {'promoted' if decision['promote'] else 'rejected'}: {decision['reason']}",
        *([f"- RL against SFT: {stage_gain_line(decision)}"] if "rl_vs_sft_difference" in decision else []),
        "",
        "## Params",
        "```json",
        json.dumps({k: cfg[k] for k in ("seed", "data", "sft", "rl", "eval", "promote")}, indent=2),
        "```",
    ])


DESCRIPTION_LIMIT = 5000  # MLflow's model_versions.description column


def card_for_registry(card: str) -> str:
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    note = "\n\n... (cut to fit the registry: the whole card is the run's model/MODEL_CARD.md artifact)"
    return card[: DESCRIPTION_LIMIT - len(note)] + note


def _file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "unknown"


def candidate_hash(candidate_dir: Path, candidate_eval: Path) -> str:
    """sha256 over the candidate's files and its eval report: the same model judged the same way."""
    import hashlib

    digest = hashlib.sha256()
    for folder in (Path(candidate_dir), Path(candidate_eval)):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode())
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:32]


def current_champion(client, name: str):
    """The version holding the champion alias, or None when the model or the alias does not exist.

    Only "not found" means "no champion": any other registry error (auth, timeout, a 500) fails the
    stage, since comparing against the base model instead could promote a model worse than the champion.
    """
    from mlflow.exceptions import MlflowException

    try:
        # Ask for the model first: stores report a missing alias with different codes (sqlite says
        # INVALID_PARAMETER_VALUE), a missing model is RESOURCE_DOES_NOT_EXIST everywhere.
        registered = client.get_registered_model(name)
        if CHAMPION not in (registered.aliases or {}):
            return None
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(f"model registry: cannot read alias '{CHAMPION}' of '{name}' "
                            f"({err.error_code}: {str(err.message).splitlines()[0][:300]}); nothing registered") from None
    except Exception as err:  # connection refused, timeouts, ...: the registry cannot be read
        raise RegistryError(f"model registry: cannot read alias '{CHAMPION}' of '{name}' "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); nothing registered") from None


def find_version(client, name: str, tags: dict[str, str]):
    """The version registered earlier with exactly these identifying tags (a retried promote), else None."""
    for version in client.search_model_versions(f"name = '{name}'"):
        if all(version.tags.get(key) == value for key, value in tags.items()):
            return version
    return None


def remember_champion_eval(cache_dir: Path, version: str, metrics: dict, candidate_eval: Path) -> None:
    """The new champion's results are already here: cache them so the next gate downloads nothing."""
    target = Path(cache_dir) / _cache_key(version, metrics["protocol_hash"], metrics["question_set_hash"])
    with atomic_path(target, is_dir=True) as tmp:
        for name in EVAL_FILES:
            shutil.copy(Path(candidate_eval) / name, tmp / name)


def log_model_files(candidate_dir: Path, base_source: str) -> dict | None:
    """Log the candidate under the run's `model/`: its adapters and a pointer to the base model when it is
    an adapter folder (posttrain/release/modelstore.py: a few MB), else the folder as it is. Returns the pointer."""
    import mlflow

    from posttrain.release.modelstore import pack

    with tempfile.TemporaryDirectory() as tmp:
        base_pointer = pack(candidate_dir, Path(tmp) / "model", source=base_source)
        mlflow.log_artifacts(str(Path(tmp) / "model") if base_pointer else str(candidate_dir), artifact_path="model")
    return base_pointer


def base_tags(base_pointer: dict | None) -> dict[str, str]:
    """What `posttrain gc` must keep for a version to load: the base's sha256 and its DVC cache entry."""
    from posttrain.release.modelstore import TAG_BASE_DVC, TAG_BASE_SHA

    if not base_pointer:
        return {}
    return {TAG_BASE_SHA: base_pointer["sha256"],
            **({TAG_BASE_DVC: base_pointer["dvc_md5"]} if base_pointer.get("dvc_md5") else {})}


def baseline_results(client, cfg, base_eval: Path, cache_dir: Path) -> tuple[str, dict, list[dict]]:
    """What the candidate is compared with: the current champion (cached results), else the base model's eval."""
    champion = current_champion(client, cfg.registered_model)
    if champion is not None:
        return (f"champion v{champion.version}",
                *champion_results(client, cfg.registered_model, champion, Path(cache_dir)))
    return ("base model", *read_eval(base_eval, cfg.metric))


def gate_decision(cfg, seed: int, candidate: tuple[dict, list[dict]], baseline: tuple[dict, list[dict]],
                  baseline_name: str) -> dict:
    """The gate's decision (posttrain/release/gate.py) as a dict; a refusal (other protocol, other items) rejects."""
    try:
        decision = paired_decision(candidate, baseline, cfg.metric, cfg.threshold, cfg.min_effect, cfg.confidence,
                                   cfg.n_bootstrap, seed)
        harmed = harm_reasons(candidate[1], baseline[1], cfg.confidence, cfg.n_bootstrap, seed)
        if harmed:  # do no harm: whatever the metric says
            decision |= {"promote": False, "reason": "refused: " + "; ".join(harmed) + f" (the metric said: "
                                                                                   f"{decision['reason']})"}
    except GateRefused as refused:
        decision = {"promote": False, "reason": f"refused: {refused}"}
    return decision | {"baseline": baseline_name, "metric": cfg.metric, "promoted": float(decision["promote"])}


def stage_gain(cfg, seed: int, candidate: tuple[dict, list[dict]], before: tuple[dict, list[dict]]) -> dict:
    """What a stage added: the candidate against the model it started from (RL against SFT), paired on
    promote.metric, as `rl_vs_sft_*` fields (the difference, its interval, the test's p)."""
    try:
        paired = paired_decision(candidate, before, cfg.metric, 0.0, cfg.min_effect, cfg.confidence,
                                 cfg.n_bootstrap, seed)
    except GateRefused as refused:
        return {"rl_vs_sft_refused": str(refused)}
    gain = {"rl_vs_sft_difference": paired["difference"], "rl_vs_sft_ci_low": paired["ci_low"],
            "rl_vs_sft_ci_high": paired["ci_high"], "rl_vs_sft_p_value": paired["p_value"],
            "rl_vs_sft_test": paired["test"]}
    # Reports written without the replies (an older eval, or scores imported from elsewhere) still get the gain.
    if all("generation" in record for record in (*candidate[1], *before[1])):
        replies, replies_before = pair_records(candidate[1], before[1], "generation", str)
        gain["rl_changed_replies"] = sum(r != earlier for r, earlier in zip(replies, replies_before)) / len(replies)
    return gain


def register_candidate(client, params: Params, candidate_dir: Path, candidate_eval: Path, candidate_metrics: dict,
                       decision: dict, baseline_name: str, cache_dir: Path) -> str:
    """Register the candidate (once per pipeline run), tag it with the gate's verdict, move `champion` if promoted.
    Returns the version."""
    import mlflow

    cfg = params.promote
    run = mlflow.active_run()
    card = model_card(params, candidate_metrics, decision, _file_sha(Path("data/prepared/train.jsonl")))
    # A retry of this pipeline run's promote (say after a crash between registering and moving the
    # alias) finds the version it registered for the same candidate instead of adding a second one.
    identity = {"posttrain.candidate_hash": candidate_hash(candidate_dir, candidate_eval),
                "posttrain.pipeline_run": os.environ.get(PARENT_ENV, "")}
    try:
        client.create_registered_model(cfg.registered_model)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_version = find_version(client, cfg.registered_model, identity)
    if model_version is None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "MODEL_CARD.md").write_text(card)
            mlflow.log_artifact(str(Path(tmp) / "MODEL_CARD.md"), artifact_path="model")
        base_pointer = log_model_files(candidate_dir, params.base.source)
        for small in EVAL_FILES:
            mlflow.log_artifact(str(candidate_eval / small), artifact_path="eval")
        # The model is a folder of artifacts, not an MLflow "logged model": register it by location.
        model_version = client.create_model_version(
            cfg.registered_model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
            tags=identity | base_tags(base_pointer),
        )
    else:
        print(f"promote: version {model_version.version} already registers this candidate for this run: reusing it")
    version = model_version.version
    tags = {
        "protocol_hash": candidate_metrics["protocol_hash"],
        "question_set_hash": candidate_metrics["question_set_hash"],
        **{f"accuracy_{name}": value for name, value in _accuracies(candidate_metrics).items()},
        "gate.decision": "promoted" if decision["promote"] else "rejected",
        "gate.reason": decision["reason"],
        "gate.baseline": baseline_name,
    }
    for field in ("ci_low", "ci_high", "mcnemar_p", "test", "p_value", "count_both_right", "count_only_candidate",
                  "count_only_baseline", "count_both_wrong", "rl_vs_sft_difference", "rl_vs_sft_ci_low",
                  "rl_vs_sft_ci_high", "rl_vs_sft_p_value", "rl_changed_replies"):
        if field in decision:
            tags[f"gate.{field}"] = decision[field]
    for tag, value in tags.items():
        client.set_model_version_tag(cfg.registered_model, version, tag, str(value))
    # MLflow stores a description in varchar(5000) on PostgreSQL: the whole card is the run's model/MODEL_CARD.md
    client.update_model_version(cfg.registered_model, version, description=card_for_registry(card))
    if decision["promote"]:
        client.set_registered_model_alias(cfg.registered_model, CHAMPION, version)
        remember_champion_eval(Path(cache_dir), version, candidate_metrics, candidate_eval)
    mlflow.set_tags({"gate.decision": tags["gate.decision"], "gate.reason": decision["reason"][:5000]})
    return version
