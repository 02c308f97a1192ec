"""The end-of-run summary: pass rates per model, deltas, time per stage, gate decision, where to look.

The columns are the task's: every `accuracy_<metric>` the evaluation wrote (GSM8K: strict, flexible;
style: pass, style, content; chat: pass) and the task's extra figures (style: mean content cosine; chat: mean
judge margin and reply length in words)."""

from __future__ import annotations

from pathlib import Path

from posttrain.pipeline import graph
from posttrain.config.schema import TASKS
from posttrain.io import read_json

MODELS = ("base", "sft", "rl")
LABELS = {"content_mean": "mean cos", "judge_p_poem_mean": "P(poem)", "judge_margin_mean": "margin",
          "reply_words_mean": "words"}  # column names of the task figures
EXTRAS = ("content_mean", "judge_p_poem_mean", "judge_margin_mean", "reply_words_mean")  # task figures beside the pass rates


def collect(root: str | Path = ".") -> dict:
    root = Path(root)
    out: dict = {"models": {}, "stage_seconds": {}}
    prepared = root / graph.PREPARED / "validation.json"
    out["task"] = read_json(prepared).get("task", "gsm8k") if prepared.exists() else "gsm8k"
    for model in MODELS:
        path = root / graph.REPORTS / f"eval_{model}.json"
        if path.exists():
            data = read_json(path)
            keep = [k for k in data if k.startswith("accuracy_")] + [k for k in EXTRAS if k in data]
            out["models"][model] = {k: data.get(k) for k in (
                *keep, "n_questions", "early_stop_rate", "gen_length_mean", "questions_per_s")}
    for name in ("reward_model", "judge"):
        path = root / graph.REPORTS / f"{name}.json"
        if path.exists():
            data = read_json(path)
            out[name] = ({"skipped": True} if data.get("skipped") else
                         {k: data.get(k) for k in ("val_accuracy", "val_pairwise_accuracy") if k in data}
                         | ({"beats chance": "yes" if data["beats_chance"] else "NO"} if "beats_chance" in data else {}))
    for stage in graph.STAGES:
        if stage.metrics and (root / stage.metrics).exists():
            out["stage_seconds"][stage.name] = read_json(root / stage.metrics).get("stage_seconds")
    promotion = root / graph.REPORTS / "promotion.json"
    if promotion.exists():
        data = read_json(promotion)
        out["gate"] = {
            "decision": "promoted" if data.get("promote") else "rejected", "reason": data.get("reason"),
            "baseline": data.get("baseline"), "model_version": data.get("model_version"),
            "ci_low": data.get("ci_low"), "ci_high": data.get("ci_high"), "mcnemar_p": data.get("mcnemar_p"),
            "metric": data.get("metric"),
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
    task = TASKS.get(result.get("task", "gsm8k"), TASKS["gsm8k"])
    rates = [f"accuracy_{m}" for m in task.metrics if f"accuracy_{m}" in first]
    scores = rates + [k for k in EXTRAS if k in first]
    primary = f"accuracy_{result.get('gate', {}).get('metric') or task.primary_metric}"
    primary = primary if primary in first else (rates[0] if rates else None)
    names = [k.removeprefix("accuracy_") if k in rates else LABELS.get(k, k) for k in scores]
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
        experiment = f"{m['experiment_name']} (id {m['experiment_id']})" if m.get("experiment_name") else m["experiment_id"]
        lines.append(f"MLflow: run {m['run_id']} in experiment {experiment} at {m['tracking_uri']}")
        lines.append("        open it with: posttrain ui (it prints the address of the runs table)")
    return "\n".join(lines)


def headline(values: dict) -> str:
    """A stage's figure for its console line: accuracy, loss, reward, sizes, the gate's decision."""
    if not values:
        return ""
    if values.get("skipped"):
        return "skipped (not needed)"
    if "promote" in values:
        version = values.get("model_version")
        return (f"{'PROMOTED' if values['promote'] else 'rejected'}"
                + (f" (model version {version}, vs {values.get('baseline')})" if version is not None else ""))
    accuracies = {k.removeprefix("accuracy_"): v for k, v in values.items() if k.startswith("accuracy_")}
    if accuracies:
        return ", ".join(f"{name} {value:.3f}" for name, value in accuracies.items()) + (
            f" on {int(values['n_questions'])} items" if "n_questions" in values else "")
    for key, label in (("reward_last", "reward"), ("val_accuracy", "val accuracy"),
                       ("val_pairwise_accuracy", "val pairwise accuracy"), ("loss_last", "loss")):
        if isinstance(values.get(key), (int, float)):
            return f"{label} {values[key]:.4g}"
    if "n_train" in values:
        skipped = [f"{int(values[key])} invalid {what}{'s' * (int(values[key]) != 1)}"
                   for key, what in (("skipped_invalid", "record"), ("skipped_invalid_pairs", "pair")) if values.get(key)]
        return " / ".join(f"{int(values[k])} {k[2:]}" for k in ("n_train", "n_val", "n_test") if k in values) + (
            f", skipped {' and '.join(skipped)}" if skipped else "")
    if "n_parameters" in values:
        return f"{values['n_parameters'] / 1e6:.1f}M parameters"
    return ""
