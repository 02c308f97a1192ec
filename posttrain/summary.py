"""The end-of-run summary: accuracy per model, deltas, time per stage, gate decision, where to look."""

from __future__ import annotations

from pathlib import Path

from posttrain import stages
from posttrain.io import read_json

MODELS = ("base", "sft", "rl")


def collect(root: str | Path = ".") -> dict:
    root = Path(root)
    out: dict = {"models": {}, "stage_seconds": {}}
    for model in MODELS:
        path = root / stages.REPORTS / f"eval_{model}.json"
        if path.exists():
            data = read_json(path)
            out["models"][model] = {k: data.get(k) for k in (
                "accuracy_strict", "accuracy_flexible", "n_questions", "early_stop_rate", "gen_length_mean", "questions_per_s")}
    for stage in stages.STAGES:
        if stage.metrics and (root / stage.metrics).exists():
            out["stage_seconds"][stage.name] = read_json(root / stage.metrics).get("stage_seconds")
    promotion = root / stages.REPORTS / "promotion.json"
    if promotion.exists():
        data = read_json(promotion)
        out["gate"] = {
            "decision": "promoted" if data.get("promote") else "rejected", "reason": data.get("reason"),
            "baseline": data.get("baseline"), "model_version": data.get("model_version"),
            "ci_low": data.get("ci_low"), "ci_high": data.get("ci_high"), "mcnemar_p": data.get("mcnemar_p"),
        }
    return out


def numeric(result: dict) -> dict[str, float]:
    values = {}
    for model, metrics in result.get("models", {}).items():
        for key in ("accuracy_strict", "accuracy_flexible"):
            if metrics.get(key) is not None:
                values[f"{model}_{key}"] = float(metrics[key])
    if "gate" in result:
        values["promoted"] = float(result["gate"]["decision"] == "promoted")
    return values


def render(result: dict) -> str:
    lines = ["", "model   strict  flexible  delta(flex vs base)  early-stop  mean tokens  questions"]
    base_flex = result.get("models", {}).get("base", {}).get("accuracy_flexible")
    for model, m in result.get("models", {}).items():
        delta = "" if base_flex is None or model == "base" else f"{m['accuracy_flexible'] - base_flex:+.3f}"
        lines.append(
            f"{model:<7} {m['accuracy_strict']:.3f}   {m['accuracy_flexible']:.3f}     {delta:<20} "
            f"{m['early_stop_rate']:.2f}        {m['gen_length_mean']:<12.1f} {int(m['n_questions'])}"
        )
    if result.get("stage_seconds"):
        lines.append("")
        lines.append("stage time: " + ", ".join(
            f"{name} {sec:.0f}s" for name, sec in result["stage_seconds"].items() if sec is not None))
    gate = result.get("gate")
    if gate:
        lines.append("")
        lines.append(f"gate: {gate['decision'].upper()} (vs {gate['baseline']}, model version {gate['model_version']})")
        lines.append(f"      {gate['reason']}")
    if "mlflow" in result:
        m = result["mlflow"]
        lines.append("")
        lines.append(f"MLflow: run {m['run_id']} in experiment {m['experiment_id']} at {m['tracking_uri']}")
        lines.append("        open it with: posttrain ui")
    return "\n".join(lines)
