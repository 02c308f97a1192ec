"""The pairwise LM reward model (reward_model.kind: pairwise) and PPO (rl.method: ppo) on tiny models.

    .venv/bin/python -m pytest tests/test_ppo.py -q
"""

import dataclasses
import hashlib
import json

import pytest
import torch

from posttrain.io import read_jsonl
from posttrain.release.modelstore import save_merged
from posttrain.reward_models import training as reward_training
from posttrain.stages import reward_model
from posttrain.stages import rl


def with_section(params, name, **changes):
    return dataclasses.replace(params, **{name: dataclasses.replace(getattr(params, name), **changes)})


def folder_hash(path):
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def pairwise_params(params, **training):
    # max_length: TRL drops pairs longer than this; the tiny tokenizer spends many tokens on GSM8K text.
    return with_section(with_section(params, "rl", method="ppo"), "reward_model", kind="pairwise", n_examples=24,
                        max_length=2048,
                        training=params.reward_model.training | {"learning_rate": 1e-3, "num_train_epochs": 3,
                                                                  "logging_steps": 1} | training)


def ppo_params(params, rm_dir, **ppo):
    p = with_section(pairwise_params(params), "rl", method="ppo", rewards={"exact_match": 1.0, "format": 0.5},
                     ppo=params.rl.ppo | {"reward_model_path": str(rm_dir), "learning_rate": 5e-2,
                                          "kl_estimator": "k3", "temperature": 1.5} | ppo)
    return p


@pytest.fixture(scope="module")
def pairwise_rm(params, prepared, tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairwise") / "reward_model"
    reward_model.run(pairwise_params(params), prepared / "train.jsonl", prepared / "val.jsonl", out,
                     checkpoint_dir=out.parent / "ckpt", base_dir=tiny_base)
    return out


def test_preference_pairs_follow_the_eval_protocol(params, prepared):
    from posttrain.tasks.gsm8k_answers import gold_answer, numbers_match
    from posttrain.evaluation.prompts import rl_prompt

    records = read_jsonl(prepared / "train.jsonl")[:6]
    pairs = reward_training.build_pairs(records, 12, params.seed, params.eval)
    assert len(pairs) == 6
    for record, pair in zip(records, pairs):
        assert pair["prompt"] == rl_prompt(record, params.eval)["prompt"]  # the prompt PPO rolls out from
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        gold = gold_answer(record["answer"])
        assert numbers_match(gold_answer(chosen), gold)
        assert not numbers_match(gold_answer(rejected), gold)
        assert chosen.rsplit("####", 1)[0] == rejected.rsplit("####", 1)[0]  # only the final number differs
    plain = dataclasses.replace(params.eval, prompt_style="plain")
    pair = reward_training.build_pairs(records, 2, params.seed, plain)[0]
    assert pair["prompt"].startswith("Question: ") and pair["prompt"].endswith("Answer:")
    assert pair["chosen"].startswith(" ") and "####" in pair["chosen"] and "####" in pair["rejected"]


def test_unknown_reward_model_kind_is_refused(params, prepared, tmp_path):
    with pytest.raises(ValueError, match=r"reward_model.kind: unknown kind 'pairwize'; known: \['classifier', 'pairwise', 'mlp_head'\]"):
        reward_model.run(with_section(params, "reward_model", kind="pairwize"), prepared / "train.jsonl",
                         prepared / "val.jsonl", tmp_path / "rm", checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "rm").exists()


def test_pairwise_max_length_that_drops_every_pair_is_a_clear_error(params, prepared, tiny_base, tmp_path):
    p = with_section(pairwise_params(params), "reward_model", max_length=8)
    with pytest.raises(ValueError, match=r"reward_model.max_length=8 drops every training pair"):
        reward_model.run(p, prepared / "train.jsonl", prepared / "val.jsonl", tmp_path / "rm",
                         checkpoint_dir=tmp_path / "ckpt", base_dir=tiny_base)
    assert not (tmp_path / "rm").exists() and not (tmp_path / "ckpt").exists()


def _pair_scores(model_dir_or_model, tokenizer, pairs):
    """Scalar scores of (chosen, rejected) per pair, tokenized the way RewardTrainer does (chat template)."""
    from transformers import AutoModelForSequenceClassification

    model = model_dir_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForSequenceClassification.from_pretrained(model_dir_or_model)
    model.eval()
    out = []
    with torch.no_grad():
        for pair in pairs:
            scores = []
            for side in ("chosen", "rejected"):
                ids = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=True, return_dict=True)["input_ids"]
                scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
            out.append(scores)
    return torch.tensor(out)


@pytest.mark.slow
def test_pairwise_reward_model_trains_and_reports_pairwise_accuracy(params, prepared, tiny_base, pairwise_rm):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    assert (pairwise_rm / "model.safetensors").exists() and not list(pairwise_rm.glob("*.bin"))
    config = AutoConfig.from_pretrained(pairwise_rm)
    assert config.num_labels == 1 and config.architectures == ["LlamaForSequenceClassification"]
    tokenizer = AutoTokenizer.from_pretrained(pairwise_rm)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_base).get_vocab()  # PPO needs this
    log = json.loads((pairwise_rm / "train_log.json").read_text())
    assert any("loss" in e for e in log)

    values = reward_model.metrics(pairwise_rm)
    p = pairwise_params(params)
    val_pairs = reward_training.build_pairs(read_jsonl(prepared / "val.jsonl"), min(p.reward_model.n_examples, 128),
                                         p.seed + 1, p.eval)
    assert values["n_val_pairs"] == len(val_pairs) and values["n_train_pairs"] == p.reward_model.n_examples // 2
    # The reported metric is P(score(chosen) > score(rejected)) on the validation pairs: recompute it.
    scores = _pair_scores(pairwise_rm, tokenizer, val_pairs)
    assert values["val_pairwise_accuracy"] == pytest.approx(float((scores[:, 0] > scores[:, 1]).float().mean()))
    assert values["val_margin"] == pytest.approx(float((scores[:, 0] - scores[:, 1]).mean()), abs=1e-4)
    # Training moved the scores towards the preferences on the pairs it saw.
    train_pairs = reward_training.build_pairs(read_jsonl(prepared / "train.jsonl"), p.reward_model.n_examples, p.seed, p.eval)
    set_seed(p.seed)
    untrained = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    before, after = _pair_scores(untrained, tokenizer, train_pairs), _pair_scores(pairwise_rm, tokenizer, train_pairs)
    margin_before, margin_after = (before[:, 0] - before[:, 1]).mean(), (after[:, 0] - after[:, 1]).mean()
    print(f"train margin {margin_before:.4f} -> {margin_after:.4f}, "
          f"val pairwise accuracy {values['val_pairwise_accuracy']:.3f}")
    assert margin_after > margin_before


def test_ppo_with_a_classifier_reward_model_fails_at_once(params, prepared, tmp_path):
    p = with_section(with_section(params, "rl", method="ppo"), "reward_model", kind="classifier")
    with pytest.raises(ValueError, match=r"set reward_model.kind: pairwise") as err:
        rl.run(p, prepared / "train.jsonl", tmp_path / "no_model", tmp_path / "out", checkpoint_dir=tmp_path / "ckpt")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_rule_terms_are_added_to_the_reward_model_score(params, prepared, tiny_base):
    """RuleAugmentedReward under TRL's own get_reward: score = RM score + weighted rule rewards of the response."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.utils import get_reward

    from posttrain.methods import ppo

    from posttrain.rewards import composition as rewards

    p = with_section(params, "rl", max_prompts=2)
    dataset = rl.build_dataset(read_jsonl(prepared / "train.jsonl"), p)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base, padding_side="left")
    prompt_ids = ppo.tokenize_prompts(dataset, tokenizer)
    ppo.distinct_pad(tokenizer, prompt_ids)
    rows = {tuple(ids): {"answer": r["answer"], "question": r["question"], "solution": r["solution"]}
            for ids, r in zip(prompt_ids, dataset)}
    funcs, weights = rewards.build({"exact_match": 1.0, "format": 0.5})
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1).eval()
    wrapped = ppo.RuleAugmentedReward(rm, tokenizer, rows, funcs, weights)

    pad = tokenizer.pad_token_id
    width = max(len(ids) for ids in prompt_ids)
    queries = [[pad] * (width - len(ids)) + ids for ids in prompt_ids]
    texts = [f"So the total is {dataset[0]['answer']}.\n#### {dataset[0]['answer']}",  # right, with a #### line
             "So the total is 123457."]  # wrong, no #### line
    responses = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    length = max(len(r) for r in responses) + 2
    query_responses = torch.tensor([q + r + [pad] * (length - len(r)) for q, r in zip(queries, responses)])
    with torch.no_grad():
        _, plain, _ = get_reward(rm, query_responses, pad, width)
        _, combined, _ = get_reward(wrapped, query_responses, pad, width)
    torch.testing.assert_close(combined - plain, torch.tensor([1.0 + 0.5, 0.0]))
    assert wrapped.stats() == {"rewards/exact_match": 0.5, "rewards/format": 0.5} and wrapped.stats() == {}


def test_ppo_config_comes_from_params_and_profiles(params, tmp_path):
    from posttrain.methods import ppo

    args = ppo.ppo_config(params, tmp_path)
    assert args.total_episodes == params.rl.ppo["total_episodes"] and args.response_length == params.rl.ppo["response_length"]
    assert args.use_cpu and not args.bf16 and args.stop_token == "eos" and args.save_strategy == "no"
    from conftest import ROOT
    from posttrain.config.loader import load_params

    quick = load_params(ROOT / "params.yaml")
    assert quick.rl.method == "grpo"  # ppo is configured, not switched on
    quick_args = ppo.ppo_config(quick, tmp_path)
    assert quick_args.num_ppo_epochs == 2 and quick_args.kl_coef > 0  # >= 2: the ratio moves, clipping can act


@pytest.mark.slow
def test_ppo_stage_updates_the_policy_and_logs_reward_and_kl(params, prepared, tiny_base, pairwise_rm, tmp_path):
    from safetensors.torch import load_file

    rm_before = folder_hash(pairwise_rm)
    p = ppo_params(params, pairwise_rm)
    out = rl.run(p, prepared / "train.jsonl", tiny_base, tmp_path / "rl", checkpoint_dir=tmp_path / "ckpt")["model"]
    merged = save_merged(out, tmp_path / "merged")  # the rl stage keeps an adapter: rebuild the model
    before, after = load_file(tiny_base / "model.safetensors"), load_file(merged / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "PPO left every weight unchanged"
    assert folder_hash(pairwise_rm) == rm_before  # the reward model is read, never written
    assert not (tmp_path / "ckpt").exists()
    log = json.loads((out / "train_log.json").read_text())
    steps = [e for e in log if "objective/scores" in e]
    assert [e["step"] for e in steps] == [1, 2]  # total_episodes 4 / batch 2
    for entry in steps:
        assert entry["reward"] == entry["objective/scores"] and entry["kl"] == entry["objective/kl"]
        assert {"rewards/exact_match", "rewards/format", "loss/policy_avg", "loss/value_avg"} <= set(entry)
    values = rl.metrics(out)
    assert {"reward_first", "reward_last", "kl_first", "kl_last"} <= set(values)
    # whether the value model learns and clipping acts: in the stage's metrics, from the last logged step
    assert values["loss/value_avg_last"] == steps[-1]["loss/value_avg"]
    assert values["val/clipfrac_avg_last"] == steps[-1]["val/clipfrac_avg"]


@pytest.mark.slow
def test_ppo_reference_is_the_frozen_policy_without_its_adapter(params, prepared, tiny_base, pairwise_rm, tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.methods import ppo

    p = ppo_params(params, pairwise_rm)
    dataset = rl.build_dataset(read_jsonl(prepared / "train.jsonl"), p)
    policy, tokenizer, log = ppo.run(p, tiny_base, dataset, tmp_path / "ckpt")
    reference = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    policy.eval()
    ids = torch.randint(0, reference.config.vocab_size, (2, 19))
    with torch.no_grad():
        ref_logits = reference(ids).logits
        with policy.disable_adapter():
            disabled_logits = policy(input_ids=ids).logits
        policy_logits = policy(input_ids=ids).logits
    torch.testing.assert_close(disabled_logits, ref_logits)  # the KL reference never moved
    assert not torch.allclose(policy_logits, ref_logits, atol=1e-4)  # ... while the adapter did
    trainable = {n for n, prm in policy.named_parameters() if prm.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    kl = [e["kl"] for e in log if "kl" in e]
    assert kl[0] == pytest.approx(0.0, abs=1e-3)  # first rollout: policy == reference
    assert kl[1] > kl[0]  # after one update the policy has moved away from the reference (k3 >= 0)


@pytest.mark.slow
def test_the_value_models_weights_train_at_a_rate_of_their_own(params, prepared, tiny_base, pairwise_rm, tmp_path):
    """rl.value_learning_rate moves the value model's weights (and only those) to a rate of their own; the
    adapter keeps rl.ppo.learning_rate. 0 with a pairwise value model: the adapter's rate, as before."""
    from posttrain.methods import ppo

    for chosen, expected in ((0.0, 5e-2), (3e-4, 3e-4)):
        p = with_section(ppo_params(params, pairwise_rm), "rl", value_learning_rate=chosen)
        dataset = rl.build_dataset(read_jsonl(prepared / "train.jsonl"), p)
        trainer, _ = ppo.build_trainer(p, tiny_base, dataset, tmp_path / f"ckpt{chosen}")
        value_ids = {id(prm) for prm in trainer.model.value_model.parameters() if prm.requires_grad}
        rate_of = {id(prm): group["lr"] for group in trainer.optimizer.param_groups for prm in group["params"]}
        assert value_ids and value_ids <= set(rate_of)
        assert {rate_of[i] for i in value_ids} == {expected}
        policy_rates = {rate for i, rate in rate_of.items() if i not in value_ids}
        assert policy_rates == {5e-2}  # ppo_params' rl.ppo.learning_rate, on the LoRA adapter
        assert len(rate_of) == sum(len(g["params"]) for g in trainer.optimizer.param_groups)  # each weight once


def test_an_mlp_head_value_model_trains_at_its_heads_rate(params, tmp_path):
    """With rl.value_learning_rate 0 an mlp_head value model (chat: only the head trains) takes the rate the head
    was trained at, a pairwise one the adapter's; a set value wins over both."""
    from types import SimpleNamespace

    from posttrain.methods import ppo
    from posttrain.reward_models import mlp_head

    head_dir, pairwise_dir = tmp_path / "mlp_head", tmp_path / "pairwise"
    head_dir.mkdir(), pairwise_dir.mkdir()
    (head_dir / mlp_head.POINTER_FILE).write_text("{}")
    p = with_section(params, "reward_model", mlp_head=dataclasses.replace(params.reward_model.mlp_head,
                                                                          learning_rate=7e-4))
    assert ppo.value_learning_rate(p, SimpleNamespace(reward_model_path=head_dir, learning_rate=2e-4)) == 7e-4
    assert ppo.value_learning_rate(p, SimpleNamespace(reward_model_path=pairwise_dir, learning_rate=2e-4)) == 2e-4
    chosen = with_section(p, "rl", value_learning_rate=3e-5)
    assert ppo.value_learning_rate(chosen, SimpleNamespace(reward_model_path=head_dir, learning_rate=2e-4)) == 3e-5
