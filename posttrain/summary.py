"""The end-of-run summary: pass rates per model, deltas, time per stage, gate decision, where to look.

The columns are the task's: every `accuracy_<metric>` the evaluation wrote (GSM8K: strict, flexible;
style: pass, style, content; chat: pass) and the task's extra figures (style: mean content cosine; chat: mean
judge margin and reply length in words)."""

from __future__ import annotations

from pathlib import Path

from posttrain import stages
from posttrain.io import read_json

MODELS = ("base", "sft", "rl")
EXTRAS = ("content_mean", "judge_p_poem_mean", "judge_margin_mean", "reply_words_mean")  # task figures beside the pass rates


def collect(root: str | Path = ".") -> dict:
    root = Path(root)
    out: dict = {"models": {}, "stage_seconds": {}}
    for model in MODELS:
        path = root / stages.REPORTS / f"eval_{model}.json"
        if path.exists():
            data = read_json(path)
            keep = [k for k in data if k.startswith("accuracy_")] + [k for k in EXTRAS if k in data]
            out["models"][model] = {k: data.get(k) for k in (
                *keep, "n_questions", "early_stop_rate", "gen_length_mean", "questions_per_s")}
    for name in ("reward_model", "judge"):
        path = root / stages.REPORTS / f"{name}.json"
        if path.exists():
            data = read_json(path)
            out[name] = ({"skipped": True} if data.get("skipped") else
                         {k: data.get(k) for k in ("val_accuracy", "val_pairwise_accuracy", "beats_chance") if k in data})
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
        for key in metrics:
            if key.startswith("accuracy_") and metrics.get(key) is not None:
                values[f"{model}_{key}"] = float(metrics[key])
    if "gate" in result:
        values["promoted"] = float(result["gate"]["decision"] == "promoted")
    return values


def render(result: dict) -> str:
    models = result.get("models", {})
    first = next(iter(models.values()), {})
    scores = [k for k in first if k.startswith("accuracy_")] + [k for k in EXTRAS if k in first]
    primary = scores[-1] if scores and scores[-1] == "accuracy_flexible" else (scores[0] if scores else None)
    names = [k.removeprefix("accuracy_").replace("_mean", "") for k in scores]
    delta_name = f"delta({primary.removeprefix('accuracy_')[:4]} vs base)" if primary else "delta"
    lines = ["", "model   " + "".join(f"{n:<10}" for n in names) + f"{delta_name:<21}early-stop  mean tokens  items"]
    base_primary = models.get("base", {}).get(primary)
    for model, m in models.items():
        delta = "" if base_primary is None or model == "base" else f"{m[primary] - base_primary:+.3f}"
        lines.append(
            f"{model:<7} " + "".join(f"{m[k]:<10.3f}" for k in scores) + f"{delta:<21}"
            f"{m['early_stop_rate']:<12.2f}{m['gen_length_mean']:<13.1f}{int(m['n_questions'])}"
        )
    for name, label in (("reward_model", "reward model"), ("judge", "judge")):
        info = result.get(name)
        if info is not None:
            lines.append(f"{label}: skipped (not needed)" if info.get("skipped") else
                         f"{label}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in info.items()))
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
