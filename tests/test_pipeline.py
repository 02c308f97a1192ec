"""The stage graph, the evaluator's stop rule, the gate stage, and the whole flow on tiny settings."""

import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_in
from posttrain.pipeline import graph

DVC = str(Path(sys.executable).parent / "dvc")


def test_dvc_yaml_is_generated_from_the_stage_graph():
    assert (ROOT / "dvc.yaml").read_text() == graph.dvc_yaml_text(), "run `posttrain dvc-yaml`"


def test_stage_graph_is_ordered_and_every_input_has_a_producer():
    produced = set()
    for stage in graph.STAGES:
        for path in stage.inputs.values():
            assert any(path == out or path.startswith(out + "/") for out in produced), (stage.name, path)
        produced |= set(stage.outputs.values()) | ({stage.metrics} if stage.metrics else set())
        import importlib

        assert hasattr(importlib.import_module(f"posttrain.stages.{stage.module}"), "run")


@pytest.fixture(scope="module")
def varied_tiny_model():
    """A tiny random Llama whose greedy text varies with position and context (the default init
    repeats one token, which would hide position or cache mistakes)."""
    from posttrain.training.base_models import build_tiny_model

    model, tokenizer = build_tiny_model({"initializer_range": 0.3}, seed=42)
    return model.eval(), tokenizer


def test_evaluator_generations_match_the_straightforward_loop(varied_tiny_model):
    """Dropping finished rows and stopping after the answer line only cut text after the answer."""
    import torch

    from posttrain.evaluation.evaluator import AnswerLineStop, generate, generate_straightforward

    model, tokenizer = varied_tiny_model
    prompts = [f"Question: what is {i} + {i}?" + " Think." * (i % 4) + "\nAnswer:" for i in range(7)]
    reference = generate_straightforward(model, tokenizer, prompts, 12, batch_size=1, progress=False)
    for batch_size in (1, 2, 3, 7):
        fast = generate(model, tokenizer, prompts, 12, batch_size=batch_size, progress=False)
        assert fast.texts == reference.texts and fast.n_tokens == reference.n_tokens
    stop = AnswerLineStop(tokenizer)
    rows = [tokenizer("ab#### 12\n").input_ids, tokenizer("ab 12\n").input_ids, tokenizer("#### 12 x").input_ids]
    newest = torch.tensor([row[-1] for row in rows])
    assert stop(newest, lambda row: torch.tensor(rows[row])).tolist() == [True, False, False]


# A shared start (as the chat template and system prompt give every GSM8K prompt), then different lengths.
PROMPTS = ["Solve it. " + q for q in ("Q: 22?", "Question: 1 + 1?\nAnswer:", "Question: what is seven times eight, please?\nAnswer:",
                                      "Question: 3 apples and 4 pears: how many fruits?\nAnswer:", "Q: 5 x 5?\nA:",
                                      "Question: 9 - 2?\nAnswer:")]


def _first_hit_lengths(tokens, hit, max_new_tokens):
    return [next((k + 1 for k, t in enumerate(row) if hit(t)), max_new_tokens) for row in tokens.tolist()]


def test_continuous_batching_gives_each_row_its_own_decode(varied_tiny_model, monkeypatch):
    """Rows leave at different steps, waiting prompts are merged in (with more or less padding) and the
    shared prompt start is computed once; every row still gets exactly the tokens it gets when decoded alone."""
    import torch

    from posttrain.evaluation import decoding

    model, tokenizer = varied_tiny_model
    assert decoding.shared_prefix_length([tokenizer(p).input_ids for p in PROMPTS]) >= 3
    # Cache buffers are allocated uninitialised: fill them with NaN, so a column read before it is
    # written (padding left unzeroed by a merge, say) turns the row's logits into NaN.
    real_empty = decoding.PreallocatedLayer.new_buffer
    monkeypatch.setattr(decoding.PreallocatedLayer, "new_buffer",
                        lambda self, states, rows=None: real_empty(self, states, rows).fill_(float("nan")))
    alone, alone_lengths = decoding.greedy_generate(model, tokenizer, PROMPTS, 16, batch_size=1, eos_ids=set(),
                                                    share_prefix=False)
    assert alone_lengths == [16] * len(PROMPTS)
    trimmed = []
    real_leading_padding = decoding.leading_padding
    monkeypatch.setattr(decoding, "leading_padding", lambda mask: trimmed.append(real_leading_padding(mask)) or trimmed[-1])

    # An end-of-sequence token that rows write at different steps.
    eos = int(alone[1, 4])
    expected = _first_hit_lengths(alone, lambda t: t == eos, 16)
    assert len(set(expected)) > 1
    for batch_size, share_prefix in ((2, True), (3, True), (4, True), (3, False)):
        tokens, lengths = decoding.greedy_generate(model, tokenizer, PROMPTS, 16, batch_size, eos_ids={eos},
                                                   share_prefix=share_prefix)
        assert lengths == expected, batch_size
        for row, length in enumerate(lengths):
            assert torch.equal(tokens[row, :length], alone[row, :length]) and not tokens[row, length:].any()
    assert max(trimmed) > 0  # some merge or drop freed leading columns, and they were cut

    # Two streams in threads, each with its share of the prompts and of torch's threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tokens, lengths = decoding.parallel_greedy_generate(model, tokenizer, PROMPTS, 16, 4, {eos},
                                                            stop_rule_for=lambda tok: None, streams=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert lengths == expected
    for row, length in enumerate(lengths):
        assert torch.equal(tokens[row, :length], alone[row, :length]) and not tokens[row, length:].any()

    # A stop rule (the evaluator's is the `#### n` line; a tiny random model writes none): stop after `marker`.
    marker = int(alone[2, 6])
    tokens, lengths = decoding.greedy_generate(model, tokenizer, PROMPTS, 16, 3, eos_ids=set(),
                                               stop_rule=lambda newest, so_far: newest == marker)
    assert lengths == _first_hit_lengths(alone, lambda t: t == marker, 16) and lengths[2] <= 7
    for row, length in enumerate(lengths):
        assert torch.equal(tokens[row, :length], alone[row, :length])


def test_sliding_window_models_fall_back_to_transformers_generate(capsys):
    """Continuous batching needs full-attention caches; other models still evaluate, with a warning."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from posttrain.evaluation import decoding
    from posttrain.evaluation.evaluator import generate, generate_straightforward
    from posttrain.training.base_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, initializer_range=0.3,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = MistralForCausalLM(config).eval()
    assert not decoding.supports(model)
    result = generate(model, tokenizer, PROMPTS[:3], 8, batch_size=2, progress=False)
    assert "sliding-window" in capsys.readouterr().err
    reference = generate_straightforward(model, tokenizer, PROMPTS[:3], 8, batch_size=1, stop_at_eos=True, progress=False)
    assert result.texts == reference.texts


def expected_decision(ws: Path):
    """posttrain.release.gate.decide on the paired per-question records of the workspace's eval reports."""
    from posttrain.config.loader import load_params
    from posttrain.release.gate import decide, harm_reasons, pair_records

    params = load_params(ws / "params.yaml")
    cfg = params.promote
    reports = {name: [json.loads(line) for line in (ws / f"reports/eval/{name}/records.jsonl").open()]
               for name in ("rl", "base")}
    metrics = json.loads((ws / "reports/eval/rl/metrics.json").read_text())
    cand, base = pair_records(reports["rl"], reports["base"], f"correct_{cfg.metric}")
    assert sum(cand) / len(cand) == pytest.approx(metrics[f"accuracy_{cfg.metric}"])
    # do no harm did not step in: the tiny random models are cut off at the limit on every item, both of them
    assert harm_reasons(reports["rl"], reports["base"], cfg.confidence, cfg.n_bootstrap, params.seed) == []
    return decide(cand, base, cfg.threshold, cfg.min_effect, cfg.confidence, cfg.n_bootstrap, params.seed, cfg.metric)


@pytest.mark.slow
@pytest.mark.integration
def test_full_flow_on_tiny_settings_then_dvc_repro_is_a_noop(reproduced_workspace, workspace_copy):
    # The session's workspace: a fresh tiny workspace after `posttrain -q run --run-name tiny` (exit 0), which
    # printed run.stdout (tests/conftest.py reproduced_workspace); this test works on a private copy of it.
    ws = workspace_copy
    out = (reproduced_workspace.parent / "run.stdout").read_text()
    assert "gate:" in out and "MLflow: run" in out and "base" in out and "rl" in out
    for report in ("eval_base.json", "eval_sft.json", "eval_rl.json", "promotion.json"):
        assert (ws / "reports" / report).exists()
    records = [json.loads(l) for l in (ws / "reports/eval/rl/records.jsonl").open()]
    assert len(records) == 6 and {"question", "generation", "gold", "correct_flexible"} <= set(records[0])

    status = run_in(ws, [DVC, "status"])
    assert "up to date" in status.stdout, status.stdout
    again = run_in(ws, [DVC, "repro"])
    assert again.returncode == 0 and "Running stage" not in again.stdout

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs(client.get_experiment_by_name("posttrain-gsm8k").experiment_id)
    parent = [r for r in runs if r.data.tags.get("posttrain.pipeline") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and {r.data.tags["posttrain.stage"] for r in children} == {s.name for s in graph.STAGES}
    version = client.get_model_version("gsm8k-policy", "1")
    assert "protocol_hash" in version.tags and "# gsm8k-policy" in version.description  # the model card

    # The gate decided what the data determine (no champion yet, so the base model is the baseline), and
    # `champion` moved iff so.
    want = expected_decision(ws)
    decision = json.loads((ws / "reports/promotion.json").read_text())
    assert decision["baseline"] == "base model" and decision["model_version"] in ("1", 1)
    assert decision["promote"] is want.promote and decision["reason"] == want.reason, (decision, want)
    assert [decision[f"count_{k}"] for k in ("both_right", "only_candidate", "only_baseline", "both_wrong")] == [
        want.counts.both_right, want.counts.only_candidate, want.counts.only_baseline, want.counts.both_wrong]
    assert version.tags["gate.decision"] == ("promoted" if want.promote else "rejected")
    aliases = client.get_registered_model("gsm8k-policy").aliases or {}
    assert ("champion" in aliases) is want.promote and (not want.promote or str(aliases["champion"]) == "1")

    # Changing one eval knob reruns only the eval stages and the gate.
    changed = run_in(ws, [sys.executable, "-m", "posttrain", "-q", "run", "-S", "eval.max_new_tokens=10"])
    assert changed.returncode == 0, changed.stderr[-2000:]
    from posttrain.pipeline.console import STAGE_LINE  # one console line per stage: name, ran | reused, time, figure

    lines = [STAGE_LINE.match(line) for line in changed.stdout.splitlines()]
    ran = {m.group(1) for m in lines if m and m.group(2) == "ran"}
    assert {"eval_rl", "promote"} <= ran and not {"sft", "rl"} & ran, changed.stdout
    second = json.loads((ws / "reports/promotion.json").read_text())
    if want.promote:  # the champion was judged under max_new_tokens 12: not comparable, so refused
        assert second["baseline"] == "champion v1" and second["promote"] is False
        assert second["reason"].startswith("refused: refusing to compare results under a different protocol")
    else:  # still no champion: the new eval reports against the base model's, decided by the data again
        again_want = expected_decision(ws)
        assert second["baseline"] == "base model" and second["promote"] is again_want.promote
        assert second["reason"] == again_want.reason
