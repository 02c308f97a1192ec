"""The end-of-run summary: pass rates per model, deltas, time per stage, gate decision, where to look.

The columns are the task's: every `accuracy_<metric>` the evaluation wrote (GSM8K: strict, flexible;
style: pass, style, content; chat: pass) and the task's extra figures (style: mean content cosine; chat: mean
judge margin and reply length in words)."""

from __future__ import annotations

from pathlib import Path

from posttrain.pipeline import graph
from posttrain.tasks.defaults import TASKS
from posttrain.io import read_json

MODELS = ("base", "sft", "rl")
LABELS = {"content_mean": "mean cos", "judge_p_poem_mean": "P(poem)", "judge_margin_mean": "margin",
          "reply_words_mean": "words"}  # column names of the task figures
EXTRAS = ("content_mean", "judge_p_poem_mean", "judge_margin_mean", "reply_words_mean")  # task figures beside the pass rates
# Well-formed replies (posttrain/evaluation/degeneration.py): the share of items cut off at the token limit,
# looping, copying their input. Reports from before the checks lack them: shown as "-".
WELL_FORMED = {"truncation_rate": "cut off", "repetition_rate": "loops", "copy_rate": "copied"}


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
                *keep, "n_questions", "early_stop_rate", "gen_length_mean", "questions_per_s", *WELL_FORMED)}
    for name in ("reward_model", "judge"):
        path = root / graph.REPORTS / f"{name}.json"
        if path.exists():
            data = read_json(path)
            out[name] = ({"skipped": True} if data.get("skipped") else
                         {k: data.get(k) for k in ("val_accuracy", "val_pairwise_accuracy") if k in data}
                         | ({"beats chance": "yes" if data["beats_chance"] else "NO"} if "beats_chance" in data else {})
                         | ({"beats shortcuts": "yes" if data["beats_shortcuts"] else "NO"}
                            if "beats_shortcuts" in data else {}))
    rl_report = root / graph.REPORTS / "rl.json"
    if rl_report.exists():  # how far the RL stage moved the adapter (posttrain/training/trainer.py)
        out["rl_moved"] = {k: v for k, v in read_json(rl_report).items() if k in ("adapter_update_norm", "kl_last")}
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
            "metric": data.get("metric"), "test": data.get("test"), "p_value": data.get("p_value"),
            "confidence": data.get("confidence", 0.95),
            **{k: v for k, v in data.items() if k.startswith("rl_")},  # rl_vs_sft_*, rl_changed_replies
        }
    return out


def numeric(result: dict) -> dict[str, float]:
    values = {}
    for model, metrics in result.get("models", {}).items():
        for key in metrics:
            if (key.startswith("accuracy_") or key in WELL_FORMED or key in EXTRAS) and metrics.get(key) is not None:
                values[f"{model}_{key}"] = float(metrics[key])
    if "gate" in result:
        values["promoted"] = float(result["gate"]["decision"] == "promoted")
        # what RL added over SFT, on the parent run too (the same numbers as the summary's `RL vs SFT` line)
        values |= {key: float(value) for key, value in result["gate"].items()
                   if key.startswith("rl_") and isinstance(value, (int, float)) and not isinstance(value, bool)}
    values |= {f"rl_{key}": float(value) for key, value in (result.get("rl_moved") or {}).items()}
    return values


def render(result: dict) -> str:
    models = result.get("models", {})
    first = next(iter(models.values()), {})
    task = TASKS.get(result.get("task", "gsm8k"), TASKS["gsm8k"])
    rates = [f"accuracy_{m}" for m in task.metrics if f"accuracy_{m}" in first]
    scores = rates + [k for k in EXTRAS if k in first]
    metric = result.get("gate", {}).get("metric") or task.primary_metric
    primary = next((k for k in (f"accuracy_{metric}", f"{metric}_mean") if k in first), rates[0] if rates else None)
    names = [k.removeprefix("accuracy_") if k in rates else LABELS.get(k, k) for k in scores]
    delta_name = f"delta({primary.removeprefix('accuracy_')[:4]} vs base)" if primary else "delta"
    lines = ["", "model   " + "".join(f"{n:<10}" for n in names) + f"{delta_name:<21}"
             + "".join(f"{label:<9}" for label in WELL_FORMED.values()) + "mean tokens  items"]
    base_primary = models.get("base", {}).get(primary)
    for model, m in models.items():
        delta = "" if base_primary is None or model == "base" else f"{m[primary] - base_primary:+.3f}"
        lines.append(
            f"{model:<7} " + "".join(f"{m[k]:<10.3f}" for k in scores) + f"{delta:<21}"
            + "".join(f"{m[k]:<9.2f}" if m.get(k) is not None else f"{'-':<9}" for k in WELL_FORMED)
            + f"{m['gen_length_mean']:<13.1f}{int(m['n_questions'])}"
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
        if gate.get("rl_vs_sft_difference") is not None:
            lines.append(rl_vs_sft_line(gate))
        moved = result.get("rl_moved") or {}
        if moved:
            lines.append("RL moved the adapter: " + ", ".join(
                f"{label} {moved[key]:.4g}" for key, label in (("adapter_update_norm", "update norm ||dW||"),
                                                              ("kl_last", "KL to SFT (last step)")) if key in moved))
        if gate.get("rl_changed_replies") == 0:
            lines.append("WARNING: RL changed no greedy reply of SFT's: the RL stage did not move the model "
                         "(docs/methods/index.md: LoRA RL budgets)")
    if "mlflow" in result:
        m = result["mlflow"]
        lines.append("")
        experiment = f"{m['experiment_name']} (id {m['experiment_id']})" if m.get("experiment_name") else m["experiment_id"]
        lines.append(f"MLflow: run {m['run_id']} in experiment {experiment} at {m['tracking_uri']}")
        lines.append("        open it with: posttrain ui (it prints the address of the runs table)")
    return "\n".join(lines)


def rl_vs_sft_line(gate: dict) -> str:
    """Did RL help over SFT? The paired difference on the gate's metric, its interval and the test's p."""
    low, high, p = gate["rl_vs_sft_ci_low"], gate["rl_vs_sft_ci_high"], gate["rl_vs_sft_p_value"]
    verdict = ("RL helped" if low > 0 else "RL hurt" if high < 0 else "no evidence RL changed the metric")
    changed = gate.get("rl_changed_replies")
    return (f"RL vs SFT: {'' if changed is None else f'{changed:.0%} of replies changed, '}"
            f"{gate['metric']} {gate['rl_vs_sft_difference']:+.3f}, {gate.get('confidence') or 0.95:.0%} "
            f"paired interval [{low:+.3f}, "
            f"{high:+.3f}], {gate['rl_vs_sft_test']} p={p:.3g}: {verdict}")


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
    moved = (f", adapter moved ||dW|| {values['adapter_update_norm']:.3g}"
             + (" (NOT AT ALL)" if values["adapter_update_norm"] == 0 else "")) if "adapter_update_norm" in values else ""
    for key, label in (("reward_last", "reward"), ("val_accuracy", "val accuracy"),
                       ("val_pairwise_accuracy", "val pairwise accuracy"), ("loss_last", "loss")):
        if isinstance(values.get(key), (int, float)):
            return f"{label} {values[key]:.4g}{moved}"
    if "n_train" in values:
        skipped = [f"{int(values[key])} invalid {what}{'s' * (int(values[key]) != 1)}"
                   for key, what in (("skipped_invalid", "record"), ("skipped_invalid_pairs", "pair")) if values.get(key)]
        return " / ".join(f"{int(values[k])} {k[2:]}" for k in ("n_train", "n_val", "n_test") if k in values) + (
            f", skipped {' and '.join(skipped)}" if skipped else "")
    if "n_parameters" in values:
        return f"{values['n_parameters'] / 1e6:.1f}M parameters"
    return ""


def verdict(record: dict, metric: str) -> str:
    """One item's verdict as the gate sees it, with why a degenerate reply failed."""
    why = [label for flag, label in (("loops", "loops"), ("copied_input", "copied input")) if record.get(flag)]
    if record.get("ended") is False:
        why.insert(0, "cut off")
    if f"correct_{metric}" in record:
        head = "PASS" if record[f"correct_{metric}"] else "fail"
    else:
        head = f"{metric} {float(record.get(metric, float('nan'))):+.3f}"
    return head + (f" ({', '.join(why)})" if why else "")


def show(root: str | Path = ".", n: int = 5, width: int = 100) -> str:
    """`posttrain summary --show N`: the first N items side by side, the input, the reference and each
    model's reply with its verdict: what the pass rates above were computed from."""
    import textwrap

    from posttrain.io import read_jsonl

    root = Path(root)
    records = {model: read_jsonl(path) for model in MODELS
               if (path := root / graph.REPORTS / "eval" / model / "records.jsonl").exists()}
    if not records:
        return "no per-item records yet (reports/eval/<model>/records.jsonl): run the pipeline first"
    promotion = root / graph.REPORTS / "promotion.json"
    first = next(iter(records.values()))
    metric = (read_json(promotion).get("metric") if promotion.exists() else None) or next(
        k.removeprefix("correct_") for k in first[0] if k.startswith("correct_"))
    by_model = {model: {r["question"]: r for r in rows} for model, rows in records.items()}

    def block(label: str, text: str) -> list[str]:
        wrapped = textwrap.wrap(" ".join(str(text).split()) or "(empty)", width - 12) or [""]
        shown = wrapped[:4] + (["..."] if len(wrapped) > 4 else [])
        return [f"  {label:<9} {shown[0]}"] + [f"  {'':<9} {line}" for line in shown[1:]]

    lines = []
    for i, item in enumerate(first[:n], 1):
        lines += ["", f"[{i}/{len(first)}]"] + block("input", item["question"])
        if item.get("reference") or item.get("gold"):
            lines += block("reference", item.get("reference") or item.get("gold"))
        for model, rows in by_model.items():
            record = rows.get(item["question"])
            if record is not None:
                lines += block(model, record.get("generation", "")) + [f"  {'':<9} -> {verdict(record, metric)}"]
    return "\n".join(lines[1:])
