"""`posttrain compare A B`: two models on the same items, paired, item by item: "why did the gate say no?"

    posttrain compare models:/gsm8k-policy@champion models:/gsm8k-policy/3
    posttrain compare reports/eval/base reports/eval/rl        # eval report folders (metrics.json + records.jsonl)
    posttrain compare models/sft models/rl                     # model folders: evaluated now under params.yaml's protocol

Each side is an eval report folder, a model folder, or a registered version (`models:/<name>/<version>` or
`models:/<name>@<alias>`: the eval report its promote run logged). Both must be judged under the same protocol
on the same items, else it refuses in one line. It prints the paired table on promote.metric, the paired
bootstrap interval of A - B and the exact McNemar p (posttrain/release/gate.py), and the first items where they differ
with both answers.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from posttrain.release.gate import (GateRefused, bootstrap_interval, check_same_protocol, decide_scores, mcnemar_exact,
                                    paired_counts, pair_records, record_key, summary_key)
from posttrain.io import DataError


@dataclass
class Side:
    label: str
    metrics: dict
    records: list[dict]


def _registered(spec: str, metric: str) -> tuple[dict, list[dict]]:
    """models:/name/version or models:/name@alias -> the eval report logged by the run that registered it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from posttrain.release.registry import CACHE_DIR, champion_results

    body = spec.removeprefix("models:/")
    name, sep, alias = body.partition("@")
    if not sep:
        name, _, version = body.rpartition("/")
        if not name or not version.isdigit():
            raise DataError(f"{spec}: a registered version is models:/<name>/<version> or models:/<name>@<alias>")
    client = MlflowClient()
    try:
        found = client.get_model_version_by_alias(name, alias) if sep else client.get_model_version(name, version)
    except MlflowException as err:
        raise DataError(f"{spec}: not in the model registry ({str(err.message).splitlines()[0][:200]})") from None
    metrics, records = champion_results(client, name, found, CACHE_DIR)
    if summary_key(metrics, metric) not in metrics:
        raise DataError(f"{spec}: its eval report has no accuracy_{metric}")
    return metrics, records


def _model_folder(folder: Path, params, root: Path) -> tuple[dict, list[dict]]:
    """Evaluate a model folder now, exactly as the eval stages do (params.yaml's eval section, its items)."""
    from posttrain.evaluation.evaluator import evaluate_folder
    from posttrain.release.registry import read_eval

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval"
        evaluate_folder(params, folder, root / "data/prepared/test.jsonl", root / "data/prepared/train.jsonl", out,
                     judge_dir=root / "models/judge")
        return read_eval(out, params.promote.metric)


def load_side(spec: str, params, root: Path = Path(".")) -> Side:
    from posttrain.release.modelstore import is_model_folder
    from posttrain.release.registry import read_eval

    metric = params.promote.metric
    path = Path(spec)
    if spec.startswith("models:/"):
        metrics, records = _registered(spec, metric)
    elif (path / "metrics.json").exists():
        metrics, records = read_eval(path, metric)
    elif is_model_folder(path):  # a plain HF folder, or an adapter folder such as models/rl
        metrics, records = _model_folder(path, params, root)
    else:
        raise DataError(f"{spec}: neither an eval report folder (metrics.json), a model folder (config.json) nor "
                        "models:/<name>/<version> | models:/<name>@<alias>")
    return Side(spec, metrics, records)


def _one_line(text, width: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def compare(a: Side, b: Side, metric: str, confidence: float = 0.95, n_bootstrap: int = 2000, seed: int = 0,
            show: int = 5) -> str:
    """The report; GateRefused when the two were judged under different protocols or on different items."""
    try:
        check_same_protocol(a.metrics, b.metrics)
    except GateRefused as refused:
        raise GateRefused(str(refused).replace("candidate", "A").replace("baseline", "B")) from None
    key, kind = record_key(a.metrics, metric)
    if kind is float:
        return compare_scores(a, b, metric, confidence, n_bootstrap, seed, show)
    right_a, right_b = pair_records(a.records, b.records, key)
    counts = paired_counts(right_a, right_b)
    low, high = bootstrap_interval(right_a, right_b, confidence, n_bootstrap, seed)
    p_value = mcnemar_exact(counts.only_candidate, counts.only_baseline)
    n = counts.n
    acc_a, acc_b = sum(right_a) / n, sum(right_b) / n
    lines = [f"A  {a.label}: {metric} {acc_a:.3f}", f"B  {b.label}: {metric} {acc_b:.3f}",
             f"{n} items, protocol {a.metrics['protocol_hash']}, paired on correct_{metric}:", "",
             f"{'':<10}{'B right':>9}{'B wrong':>9}",
             f"{'A right':<10}{counts.both_right:>9}{counts.only_candidate:>9}",
             f"{'A wrong':<10}{counts.only_baseline:>9}{counts.both_wrong:>9}", "",
             f"both right {counts.both_right}, only A {counts.only_candidate}, only B {counts.only_baseline}, "
             f"both wrong {counts.both_wrong}",
             f"A - B = {acc_a - acc_b:+.3f}, {confidence:.0%} paired bootstrap interval [{low:+.3f}, {high:+.3f}], "
             f"McNemar p = {p_value:.3g}"]
    by_question = {r["question"]: r for r in b.records}
    differ = [(r, by_question[r["question"]]) for r in a.records if bool(r[key]) != bool(by_question[r["question"]][key])]
    if differ:
        lines += ["", f"first {min(show, len(differ))} of {len(differ)} items where they differ:"]
    for i, (ra, rb) in enumerate(differ[:show], 1):
        who = "only A right" if ra[key] else "only B right"
        gold = f" (reference: {_one_line(ra['gold'], 40)})" if "gold" in ra else ""
        lines.append(f"{i}. [{who}] {_one_line(ra['question'], 110)}{gold}")
        for side, record in (("A", ra), ("B", rb)):
            extracted = record.get(f"prediction_{metric}")
            lines.append(f"   {side}: {_one_line(record.get('generation', ''), 110)}"
                         + (f"  -> {extracted}" if extracted is not None else ""))
    return "\n".join(lines)


def compare_scores(a: Side, b: Side, metric: str, confidence: float, n_bootstrap: int, seed: int, show: int) -> str:
    """The report on a per-item score (a judge margin, P(poem)): means, the paired interval, Wilcoxon, and the
    items where the two differ most."""
    scores_a, scores_b = pair_records(a.records, b.records, metric, float)
    paired = decide_scores(scores_a, scores_b, 0.0, confidence, n_bootstrap, seed, metric)
    lines = [f"A  {a.label}: mean {metric} {paired.candidate_mean:.3f}",
             f"B  {b.label}: mean {metric} {paired.baseline_mean:.3f}",
             f"{paired.n} items, protocol {a.metrics['protocol_hash']}, paired on {metric}: A higher on "
             f"{paired.n_better}, B higher on {paired.n_worse}",
             f"A - B = {paired.difference:+.3f}, {confidence:.0%} paired bootstrap interval [{paired.ci_low:+.3f}, "
             f"{paired.ci_high:+.3f}], Wilcoxon signed-rank p = {paired.wilcoxon_p:.3g}"]
    by_question = {r["question"]: r for r in b.records}
    ranked = sorted(a.records, key=lambda r: -abs(float(r[metric]) - float(by_question[r["question"]][metric])))
    lines += ["", f"the {min(show, len(ranked))} items where they differ most:"]
    for i, ra in enumerate(ranked[:show], 1):
        rb = by_question[ra["question"]]
        lines.append(f"{i}. [{metric} A {float(ra[metric]):+.3f}, B {float(rb[metric]):+.3f}] {_one_line(ra['question'], 100)}")
        for side, record in (("A", ra), ("B", rb)):
            lines.append(f"   {side}: {_one_line(record.get('generation', ''), 110)}")
    return "\n".join(lines)
