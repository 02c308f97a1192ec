"""The task layer: the registry, GSM8K pinned as it was, the style task's schema, split and reward model,
the DRaFT notebook's variant, and a stage that no method needs being skipped."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from posttrain.methods import draft
from posttrain.config.loader import line_index, load_params
from posttrain.config.schema import ConfigError
from posttrain.tasks.defaults import TASKS
from posttrain.io import DataError
from posttrain.evaluation.prompts import digest, protocol, rl_prompt, sft_example
from posttrain.tasks import registry, style
from tests.conftest import ROOT

GSM8K_RECORD = {"question": "Tom has 3 apples and buys 4 more. How many?",
                "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}


def test_the_registry_and_the_task_declarations_name_the_same_tasks_and_metrics():
    """posttrain/tasks/defaults.py (what params read without task code) and the registry's modules agree."""
    assert list(registry.TASKS) == list(TASKS)
    for name, module in registry.TASKS.items():
        assert module.NAME == name and module.DEFAULTS is TASKS[name] and module.METRICS == TASKS[name].metrics
        assert module.PRIMARY_METRIC in module.METRICS + module.SCORES
    with pytest.raises(KeyError, match="unknown task 'poems'"):
        registry.get("poems")


def test_gsm8k_protocol_hash_and_prompts_are_what_they_were_before_tasks():
    params = load_params(ROOT / "params.yaml")
    # The hash every GSM8K result was recorded under before the task layer (quick profile).
    assert digest(protocol(params.eval)) == "41548d399092d228"
    assert params.promote.metric == "flexible" and params.promote.registered_model == "gsm8k-policy"
    assert params.rl.rewards == {"exact_match": 1.0, "format": 0.2}
    system = "Solve the math problem step by step. End with a line '#### <number>'."
    assert sft_example(GSM8K_RECORD, params.eval) == {
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": GSM8K_RECORD["question"]}],
        "completion": [{"role": "assistant", "content": "He has 3 + 4 = 7 apples.\n#### 7"}]}
    row = rl_prompt(GSM8K_RECORD, params.eval)
    assert list(row) == ["prompt", "answer", "question", "solution"] and row["answer"] == "7"
    plain = dataclasses.replace(params.eval, prompt_style="plain")
    assert sft_example(GSM8K_RECORD, plain) == {"prompt": f"Question: {GSM8K_RECORD['question']}\nAnswer:",
                                                "completion": " He has 3 + 4 = 7 apples.\n#### 7\n"}


def test_task_defaults_follow_data_task_and_a_foreign_metric_is_refused(tmp_path):
    params = load_params(ROOT / "params.yaml", overrides=["data.task=style"])
    assert params.eval.system_prompt == params.data.style.system_prompt
    assert (params.promote.metric, params.promote.registered_model) == ("pass", "style-policy")
    assert params.rl.rewards == {"style": 1.0, "overlong": 1.0, "repetition": 0.5} and params.data.source == "data/style"
    assert digest(protocol(params.eval, style.protocol(params))) != "41548d399092d228"
    from posttrain.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"params.yaml:\d+: 'promote.metric' must be task or one of pass, style, "
                                          r"content, judge_p_poem \(data.task style\), got 'flexible'"):
        load_params(ROOT / "params.yaml", overrides=["data.task=style", "promote.metric=flexible"])
    with pytest.raises(ConfigError, match=r"'data.task' must be one of gsm8k, style"):
        load_params(ROOT / "params.yaml", overrides=["data.task=poems"])


# --------------------------------------------------------------------------- style: schema and split


def style_params(source, **style_fields):
    params = load_params(ROOT / "params.yaml", overrides=["data.task=style"])
    data = dataclasses.replace(params.data, style=dataclasses.replace(params.data.style, source=str(source),
                                                                      **style_fields))
    return dataclasses.replace(params, data=data)


def write_records(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def triple(i):
    return {"meaning": f"m{i}", "data": [{"poem": f"p{i}{k}", "normal": f"n{i}{k}"} for k in "abc"]}


def single(i):
    return {"meaning": f"s{i}", "data": [{"poem": f"sp{i}", "normal": f"sn{i}"}]}


@pytest.mark.parametrize("bad, message", [
    ({"meaning": " ", "data": [{"poem": "p", "normal": "n"}]}, r"expect_column_values_to_match_regex on 'meaning"),
    ({"meaning": "m", "data": [{"poem": "", "normal": "n"}]}, r"expect_column_values_to_be_between on 'data \(no "
                                                              r"pair with a non-empty poem and normal\)'"),
    ({"meaning": "m", "data": []}, r"on 'data"),
    ({"meaning": "m"}, r"on 'data"),
    ({"meaning": "m", "data": [{"poem": "p", "normal": "n0a"}]}, r"expect_column_values_to_be_unique on 'normal'"),
    # usable pairs beside an unusable one: not dropped in silence
    ({"meaning": "m", "data": [{"poem": "p1", "normal": "n1"}, {"poem": " ", "normal": "n2"}, {"poem": "p3", "normal": "n3"}]},
     r"expect_column_values_to_be_between on 'data \(a pair with an empty or missing poem or normal\)' \(1 records"),
])
def test_style_schema_errors_name_the_file_and_line(tmp_path, bad, message):
    from posttrain.stages import prepare

    src = write_records(tmp_path / "pairs.jsonl", [triple(0), triple(1), "", bad, triple(2)])
    with pytest.raises(DataError, match=rf"{tmp_path}/pairs.jsonl:4: failed .*{message}"):
        prepare.run(style_params(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_skip_invalid_counts_and_skips_instead(tmp_path, capsys):
    from posttrain.stages import prepare

    from posttrain.pipeline.summary import headline

    src = write_records(tmp_path / "pairs.jsonl", [triple(0), {"meaning": "", "data": []}, triple(1),
                                                   {"meaning": "m", "data": [{"poem": "p"}]},
                                                   {"meaning": "m2", "data": [{"poem": "p", "normal": "n"},
                                                                              {"poem": "", "normal": "n2"}]}])
    out = prepare.run(style_params(src, skip_invalid=True), tmp_path / "out")
    report = json.loads(out["report"].read_text())
    assert report["reports"]["skipped_invalid"] == 2 and report["reports"]["skipped_invalid_pairs"] == 1
    assert report["splits"] == {"train": 5, "val": 2, "test": 2}
    assert "skipped 2 invalid style records and 1 invalid pair" in capsys.readouterr().out
    # the stage's console line says so too
    assert headline(prepare.metrics(tmp_path / "out")) == ("5 train / 2 val / 2 test, skipped 2 invalid records "
                                                           "and 1 invalid pair")


def test_split_two_and_one_per_triple_and_a_seeded_ninety_ten_for_singles(tmp_path):
    files = tmp_path / "style"
    files.mkdir()
    write_records(files / "a_triples.jsonl", [triple(i) for i in range(10)])
    write_records(files / "b_singles.jsonl", [single(i) for i in range(40)])
    kept, _ = style.validate(style.read_records(str(files)), skip_invalid=False)
    train, val = style.split(kept, seed=3)
    # 10 triples -> 20 train + 10 val; 40 singles -> 36 train + 4 val
    assert (len(train), len(val)) == (56, 14)
    assert [r["normal"] for r in val[:10]] == [f"n{i}c" for i in range(10)]
    assert {r["normal"] for r in train if r["normal"].startswith("n")} == {f"n{i}{k}" for i in range(10) for k in "ab"}
    again_train, again_val = style.split(kept, seed=3)
    other_train, other_val = style.split(kept, seed=4)
    assert again_val == val and [r["normal"] for r in other_val[10:]] != [r["normal"] for r in val[10:]]
    assert all(r["source"].startswith(str(files)) for r in train + val)


def test_shipped_style_data_splits_and_reward_model_and_judge_never_share_a_record():
    params = load_params(ROOT / "params.yaml", overrides=["data.task=style"])
    splits, report = style.prepare(params)
    assert len(splits["train"]) >= 150 and splits["test"] == splits["val"]
    rm, judge = style.reward_model_records(splits["train"]), style.judge_records(splits["train"])
    assert rm and judge and not {r["group"] for r in rm} & {r["group"] for r in judge}
    assert not {r["normal"] for r in splits["train"]} & {r["normal"] for r in splits["val"]}
    examples = style.classifier_examples(rm, 10_000, seed=0)
    assert sorted(e["label"] for e in examples) == [0] * len(rm) + [1] * len(rm)


# --------------------------------------------------------------------------- the DRaFT notebook's variant


def tiny_classifier(num_labels=2):
    from posttrain.reward_models.training import load_encoder

    model, _ = load_encoder("tiny", seed=0, num_labels=num_labels)
    return model


def test_draft_notebook_variant_reaches_adapters_projection_and_new_layer_norm_but_not_the_classifier(tiny_base):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.training.trainer import lora_config

    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), lora_config({"r": 4}))
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would hide a broken path into A
            torch.nn.init.normal_(p, std=0.1)
    rm = tiny_classifier()
    reward = draft.DraftNotebookSoftTokenReward(rm, policy.get_input_embeddings().weight.shape[1])
    input_ids = torch.randint(3, 50, (2, 10))
    labels = input_ids.clone()
    labels[:, :4] = -100
    soft, mask = draft.response_soft_tokens(policy(input_ids=input_ids).logits, labels, 1.0, False, reward.max_positions)
    value = reward(soft, policy.get_input_embeddings().weight, mask)
    # the raw class-1 logit: what the classifier head gives on the pooled states, unbounded
    assert value.shape == (2,)
    (-value.mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_" in n)
    for part in (reward.projection, reward.layer_norm):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in rm.parameters()), "the classifier must stay frozen"
    assert sorted(reward.trainable.state_dict()) == ["layer_norm.bias", "layer_norm.weight", "projection.bias",
                                                     "projection.weight"]
    # it bypasses the embedding block: the classifier's own LayerNorm and word embeddings are not used
    rm.base_model.embeddings.LayerNorm.weight.data.mul_(5.0)
    assert torch.allclose(reward(soft, policy.get_input_embeddings().weight, mask), value)


@pytest.mark.parametrize("name", ["draft_notebook", "seed"])
def test_the_draft_notebook_variant_by_its_name_and_by_its_old_name(capsys, name):
    params = load_params(ROOT / "params.yaml", overrides=["rl.method=draft", f"rl.draft.variant={name}"])
    warned = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    line = line_index((ROOT / "params.yaml").read_text())[("rl", "draft", "variant")]
    assert warned == ([f"warning: {ROOT / 'params.yaml'}:{line}: 'rl.draft.variant: seed' is deprecated, use "
                       "'draft_notebook' (the same setting; the old name will be refused in the next release)"]
                      if name == "seed" else [])
    # the stage builds its reward from this value: the old name gets the same class
    assert params.rl.draft.variant == "draft_notebook"
    assert draft.VARIANTS[params.rl.draft.variant] is draft.DraftNotebookSoftTokenReward
    with pytest.raises(ConfigError, match=r"'rl.draft.variant' must be one of project, draft_notebook, got 'notebook'"):
        load_params(ROOT / "params.yaml", overrides=["rl.draft.variant=notebook"])


def test_draft_notebook_beta_ramp_and_raw_logit_reward():
    assert draft.beta_at(0, 0.1, 50) == 0.0 and draft.beta_at(25, 0.1, 50) == pytest.approx(0.05)
    assert draft.beta_at(50, 0.1, 50) == pytest.approx(0.1) and draft.beta_at(80, 0.1, 50) == pytest.approx(0.1)
    logits = torch.tensor([[0.3, 2.5], [1.0, -4.0]])
    assert torch.allclose(draft.class_one_probability(logits), torch.softmax(logits, -1)[:, 1])
    assert draft.DraftNotebookSoftTokenReward.min_tokens == 2 and draft.SoftTokenReward.min_tokens == 1


# --------------------------------------------------------------------------- stages that nothing needs


def test_a_reward_model_nothing_reads_is_skipped_with_a_reason(params, prepared, tmp_path, capsys):
    from posttrain.stages import judge
    from posttrain.reward_models.training import why_not_needed
    from posttrain.stages import reward_model

    out = reward_model.run(params, prepared / "train.jsonl", prepared / "val.jsonl", tmp_path / "rm",
                           checkpoint_dir=tmp_path / "ckpt")
    assert json.loads((out["model"] / "skipped.json").read_text())["skipped"] is True
    assert not list(out["model"].glob("*.safetensors")) and reward_model.metrics(out["model"]) == {"skipped": 1.0}
    assert "reward_model: skipped (not needed: rl.method is not draft or ppo" in capsys.readouterr().out
    written = json.loads((out["model"] / "skipped.json").read_text())["reason"]
    hybrid = dataclasses.replace(params, rl=dataclasses.replace(params.rl, method="hybrid"))
    out = reward_model.run(hybrid, prepared / "train.jsonl", prepared / "val.jsonl", tmp_path / "rm_hybrid")
    # the same output for another method that does not read it: DVC then reruns nothing after it
    assert (out["model"] / "skipped.json").read_bytes() == (tmp_path / "rm" / "skipped.json").read_bytes(), written
    assert "rl.method hybrid" in capsys.readouterr().out
    out = judge.run(params, prepared / "train.jsonl", prepared / "val.jsonl", tmp_path / "judge")
    assert "gsm8k task is scored without a judge" in json.loads((out["model"] / "skipped.json").read_text())["reason"]
    for method, rewards in (("draft", {}), ("grpo", {"verifier": 1.0}), ("grpo", {"type": "weighted_sum", "components": [
            {"type": "style", "weight": 1.0}]})):
        needing = dataclasses.replace(params, rl=dataclasses.replace(params.rl, method=method,
                                                                     rewards=rewards or params.rl.rewards))
        assert why_not_needed(needing) is None


def test_chance_check_is_loud_below_significance(capsys):
    from posttrain.reward_models.training import chance_check

    assert chance_check(0.5, 40, "reward model")["beats_chance"] is False
    assert "WARNING: the reward model does NOT beat chance" in capsys.readouterr().out
    assert chance_check(0.8, 40, "judge")["beats_chance"] is True and not capsys.readouterr().out
