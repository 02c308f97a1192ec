"""Verdicts that match the outputs: loops, cut-offs and copies fail the text tasks, the gate reads scores with
Wilcoxon, never promotes a candidate that degenerates more than its baseline, and says what RL added over SFT."""

from pathlib import Path

import pytest

from posttrain.config.loader import load_params
from posttrain.evaluation.evaluator import check_well_formed
from posttrain.io import write_json, write_jsonl
from posttrain.release.gate import decide_scores, harm_reasons, paired_decision
from posttrain.tasks import chat, gsm8k, style

ROOT = Path(__file__).resolve().parents[1]
LOOP = "The train's delayed again, and nobody knows why;\n" * 14
NORMAL = "The train is delayed again and nobody knows why."
POEM = "The train is late, the platform cold,\nwe wait as stories long since told;\nno word of why, no word of when."


def params_for(task: str):
    return load_params(ROOT / "params.yaml", overrides=[f"data.task={task}"])


def judged_records(task, items, replies, ended):
    """What task.score gives when its judge passes everything: the worst case, a judge fooled by every shortcut."""
    return [{"question": task.prompt_and_reference(item)[0], "generation": reply, "stopped_early": stop,
             **{f"correct_{m}": True for m in task.METRICS}} for item, reply, stop in zip(items, replies, ended)]


@pytest.mark.parametrize("task, item", [
    (style, {"normal": NORMAL, "poem": POEM}),
    (chat, {"input": NORMAL, "output": "Which quantity do you know already? What does it tell you?"}),
])
def test_looping_truncated_and_copied_replies_fail_every_text_task(task, item):
    replies = [LOOP, POEM[:30], task.prompt_and_reference(item)[0], POEM, task.prompt_and_reference(item)[1]]
    ended = [True, False, True, True, True]
    records = check_well_formed(judged_records(task, [item] * 5, replies, ended), [item] * 5, task,
                                params_for(task.NAME).eval)
    passed = [all(r[f"correct_{m}"] for m in task.METRICS) for r in records]
    assert passed[:3] == [False, False, False]  # loop, cut off, copied: failed whatever the judge said
    assert [r["loops"] for r in records][0] and not records[1]["ended"] and records[2]["copied_input"]
    assert passed[4]  # the reference itself passes
    assert records[3]["degenerate"] is False


def test_gsm8k_records_the_rates_but_keeps_its_verdicts():
    item = {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}
    records = check_well_formed(judged_records(gsm8k, [item], [LOOP], [False]), [item], gsm8k, params_for("gsm8k").eval)
    assert records[0]["degenerate"] and records[0]["correct_flexible"] is True


def test_a_score_gate_promotes_a_consistent_margin_gain_and_names_the_metric_and_test():
    baseline = [-12.0 + 0.1 * i for i in range(40)]
    candidate = [b + 2.0 + 0.05 * (i % 7) for i, b in enumerate(baseline)]
    decision = decide_scores(candidate, baseline, metric="judge_margin")
    assert decision.promote and decision.ci_low > 0 and decision.wilcoxon_p < 1e-6
    assert "judge_margin" in decision.reason and "Wilcoxon signed-rank" in decision.reason
    noise = [b + (0.5 if i % 2 else -0.5) for i, b in enumerate(baseline)]
    assert not decide_scores(noise, baseline, metric="judge_margin").promote


def eval_report(path: Path, records: list[dict], task: str = "chat") -> tuple[dict, list[dict]]:
    metrics = {"n_questions": len(records), "protocol_hash": "p", "question_set_hash": "q", "protocol": {},
               "judge_margin_mean": sum(r["judge_margin"] for r in records) / len(records),
               "accuracy_pass": sum(r["correct_pass"] for r in records) / len(records)}
    write_jsonl(path / "records.jsonl", records)
    write_json(path / "metrics.json", metrics)
    return metrics, records


def chat_records(margins, ended=True, loops=False):
    return [{"question": f"q{i}", "generation": "g", "judge_margin": float(m), "correct_pass": m > 0,
             "ended": ended, "loops": loops, "copied_input": False} for i, m in enumerate(margins)]


def test_chat_gate_sees_a_margin_gain_that_pass_cannot(tmp_path):
    """Every reply stays below the reference (pass 0/40 on both sides) while the margin moves by +3."""
    base = eval_report(tmp_path / "b", chat_records([-12.0 + 0.1 * i for i in range(40)]))
    cand = eval_report(tmp_path / "c", chat_records([-9.0 + 0.1 * i for i in range(40)]))
    assert not paired_decision(cand, base, "pass")["promote"]
    decision = paired_decision(cand, base, "judge_margin")
    assert decision["promote"] and decision["test"] == "Wilcoxon signed-rank"


def test_do_no_harm_refuses_a_candidate_that_loops_more_whatever_its_metric(tmp_path):
    from posttrain.release.registry import gate_decision

    params = params_for("chat")
    base = eval_report(tmp_path / "b", chat_records([-12.0 + 0.1 * i for i in range(40)]))
    looping = chat_records([-9.0 + 0.1 * i for i in range(40)])
    for record in looping[:20]:
        record |= {"loops": True, "ended": False}
    cand = eval_report(tmp_path / "c", looping)
    assert len(harm_reasons(cand[1], base[1])) == 2  # cut off and loops, each beyond the noise
    decision = gate_decision(params.promote, params.seed, cand, base, "base model")
    assert not decision["promote"] and "loops more often than its baseline" in decision["reason"]
    assert harm_reasons(base[1], base[1]) == []


def test_summary_says_whether_rl_helped_over_sft_and_show_prints_replies_with_verdicts(tmp_path):
    from posttrain.pipeline.summary import collect, render, show
    from posttrain.release.registry import stage_gain

    params = params_for("chat")
    sft = eval_report(tmp_path / "reports/eval/sft", chat_records([-12.0 + 0.1 * i for i in range(40)]))
    rl_records = chat_records([-10.0 + 0.1 * i for i in range(40)])
    rl_records[0] |= {"generation": LOOP, "loops": True, "ended": False}
    rl = eval_report(tmp_path / "reports/eval/rl", rl_records)
    gain = stage_gain(params.promote, params.seed, rl, sft)
    assert gain["rl_vs_sft_ci_low"] > 0 and gain["rl_vs_sft_test"] == "Wilcoxon signed-rank"
    write_json(tmp_path / "reports/promotion.json", {"promote": False, "reason": "r", "baseline": "base model",
                                                     "metric": "judge_margin", **gain})
    result = collect(tmp_path)
    text = render(result)
    from posttrain.pipeline.summary import numeric

    assert numeric(result)["rl_vs_sft_difference"] == pytest.approx(2.0)  # logged on the parent run by the flow
    assert "RL vs SFT: 2% of replies changed, judge_margin +2.000" in text and "RL helped" in text
    shown = show(tmp_path, 2)
    assert "[1/40]" in shown and "[2/40]" in shown and "[3/40]" not in shown
    assert "judge_margin -10.000 (cut off, loops)" in shown and "judge_margin -12.000" in shown


def test_chat_defaults_to_the_judge_margin_and_text_tasks_record_the_thresholds_in_their_protocol():
    from posttrain.evaluation.evaluator import task_protocol
    from posttrain.evaluation.prompts import digest, protocol

    assert params_for("chat").promote.metric == "judge_margin"

    def hash_of(task, overrides=()):
        params = load_params(ROOT / "params.yaml", overrides=[f"data.task={task.NAME}", *overrides])
        return digest(protocol(params.eval, task_protocol(task, params, params.eval)))

    assert hash_of(style) != hash_of(style, ["eval.max_repeated_ngrams=0.3"])
    assert hash_of(gsm8k) == hash_of(gsm8k, ["eval.max_repeated_ngrams=0.3"]) == "41548d399092d228"


def test_a_model_card_longer_than_the_registry_column_is_cut_with_a_pointer():
    from posttrain.release.registry import DESCRIPTION_LIMIT, card_for_registry

    assert card_for_registry("short") == "short"
    cut = card_for_registry("x" * 9000)
    assert len(cut) == DESCRIPTION_LIMIT and cut.endswith("model/MODEL_CARD.md artifact)")


def test_eval_records_are_logged_as_an_mlflow_table_with_the_replies_and_verdicts(tmp_path, monkeypatch):
    import mlflow

    from posttrain.pipeline.runner import log_records_table

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    records = chat_records([-1.0, 2.0])
    records[0] |= {"generation": LOOP, "loops": True, "nested": {"a": 1}}
    write_jsonl(tmp_path / "records.jsonl", records)
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            log_records_table(tmp_path / "records.jsonl", "eval_rl/replies.json")
        logged = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/eval_rl/replies.json")
    finally:
        mlflow.set_tracking_uri(None)
    rows = [dict(zip(logged["columns"], row)) for row in logged["data"]]  # MLflow's table format
    assert [r["generation"] for r in rows] == [LOOP, "g"] and [r["loops"] for r in rows] == [True, False]
    assert rows[0]["nested"] == '{"a": 1}'  # nested values shown as their JSON text
