"""DRaFT: soft tokens through a frozen encoder reward model, beta warm-up, gradients, the rl stage end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from posttrain.methods import draft
from posttrain.release.modelstore import save_merged
from posttrain.reward_models import training as reward_training
from posttrain.stages import reward_model
from posttrain.stages import rl


@pytest.fixture
def encoder_rm(classifier_rm):
    """A trained classifier reward model (the session's, tests/conftest.py): only slow tests may use it."""
    return classifier_rm(40).path


def draft_params(params, encoder_rm, **draft_fields):
    cfg = dataclasses.replace(params.rl.draft, reward_model=str(encoder_rm), **draft_fields)
    return dataclasses.replace(params, rl=dataclasses.replace(params.rl, method="draft", draft=cfg))


@pytest.fixture(scope="module")
def untrained_encoder_rm(params, tmp_path_factory):
    """The reward_model stage's tiny encoder with its one-logit head, as built before training and saved as the
    stage saves it: for what does not depend on trained weights (where gradients flow)."""
    out = tmp_path_factory.mktemp("draft") / "untrained_reward_model"
    model, tokenizer = reward_training.load_encoder("tiny", params.seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def test_beta_ramps_linearly_from_zero():
    assert [draft.beta_at(s, 2.0, 4) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert draft.beta_at(0, 2.0, 0) == 2.0


def test_soft_tokens_cover_only_the_response_and_are_cut_to_the_encoder_length():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.full((2, 7), -100)
    labels[0, 3:] = 1  # response tokens 3..6 -> predicted at positions 2..5
    labels[1, 5:] = 1
    soft, mask = draft.response_soft_tokens(logits, labels, tau=0.5, hard=False, max_positions=3)
    assert soft.shape == (2, 3, 11)
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert torch.allclose(soft[mask.bool()].sum(-1), torch.ones(5))
    assert soft[1, 2].abs().sum() == 0
    hard, _ = draft.response_soft_tokens(logits, labels, tau=0.5, hard=True, max_positions=8)
    assert set(hard[0, :4].sum(-1).tolist()) == {1.0} and set(hard.unique().tolist()) <= {0.0, 1.0}


def test_gradients_reach_adapters_and_projection_but_not_the_frozen_reward_model(tiny_base, untrained_encoder_rm):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.training.trainer import lora_config

    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), lora_config({"r": 4}))
    # LoRA B starts at zero, which would hide a broken path into A: start it non-zero.
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    rm, _ = draft.load_reward_model(untrained_encoder_rm)
    reward = draft.SoftTokenReward(rm, policy.get_input_embeddings().weight.shape[1])
    input_ids = torch.randint(3, 50, (2, 10))
    labels = input_ids.clone()
    labels[:, :4] = -100
    logits = policy(input_ids=input_ids).logits
    soft, mask = draft.response_soft_tokens(logits, labels, tau=1.0, hard=False, max_positions=reward.max_positions)
    value = reward(soft, policy.get_input_embeddings().weight, mask)
    assert value.shape == (2,) and ((value > 0) & (value < 1)).all()
    (-value.mean()).backward()

    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reward.projection.parameters())
    assert all(p.grad is None for p in rm.parameters()), "the reward model must stay frozen"
    assert all(p.grad is None for n, p in policy.named_parameters() if "lora_" not in n)
    assert list(reward.state_dict()) == ["projection.weight", "projection.bias"]


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_draft_stage_trains_policy_and_projection(params, prepared, tiny_base, encoder_rm, tmp_path, use_dora):
    from safetensors.torch import load_file

    p = draft_params(params, encoder_rm, beta=1.0, warmup_steps=2,
                     training={"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 5e-2,
                               "logging_steps": 1, "save_steps": 2, "max_length": 256})
    p = dataclasses.replace(p, rl=dataclasses.replace(p.rl, lora=p.rl.lora | {"use_dora": use_dora}))
    out = rl.run(p, prepared / "train.jsonl", tiny_base, tmp_path / "rl", checkpoint_dir=tmp_path / "ckpt")["model"]

    merged = save_merged(out, tmp_path / "merged")  # the rl stage keeps an adapter: rebuild the model

    before, after = load_file(tiny_base / "model.safetensors"), load_file(merged / "model.safetensors")
    assert [k for k in before if not torch.equal(before[k], after[k])], "DRaFT left every weight unchanged"
    projection = load_file(out / draft.PROJECTION_FILE)
    rm_hidden = json.loads((encoder_rm / "config.json").read_text())["hidden_size"]
    assert projection["weight"].shape == (rm_hidden, after["model.embed_tokens.weight"].shape[1])
    log = [e for e in json.loads((out / "train_log.json").read_text()) if "reward" in e]
    assert [e["beta"] for e in log] == [0.0, 0.5, 1.0]  # logged before each optimizer step
    assert all(0.0 < e["reward"] < 1.0 and e["lm_loss"] > 0 for e in log)
    # total = LM loss - beta * reward, so at beta=0 they agree
    assert log[0]["loss"] == pytest.approx(log[0]["lm_loss"], rel=1e-4)
    assert rl.metrics(out)["reward_last"] == pytest.approx(log[-1]["reward"])
    assert not (tmp_path / "ckpt").exists()


def test_draft_needs_an_encoder_reward_model(params, prepared, tiny_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="rl.draft.reward_model: no model at"):
        rl.run(draft_params(params, tmp_path / "missing"), prepared / "train.jsonl", tiny_base, tmp_path / "rl",
               checkpoint_dir=tmp_path / "ckpt")


@pytest.mark.slow
def test_projection_is_checkpointed_and_restored_on_resume(params, prepared, tiny_base, encoder_rm, tmp_path):
    from safetensors.torch import load_file

    # the notebook's way, a bridge that is not fitted and trains with the adapter: so it moves every step
    p = draft_params(params, encoder_rm, bridge_fit_steps=0, train_bridge=True,
                     training={"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 5e-2,
                               "save_steps": 1, "max_length": 256})
    dataset = rl.build_dataset(rl.read_jsonl(prepared / "train.jsonl"), p)
    _, _, _, trained = draft.run(p, tiny_base, dataset, tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "checkpoint-2" / draft.PROJECTION_FILE)
    assert torch.equal(saved["weight"], trained[draft.PROJECTION_FILE]["weight"])

    # Same settings again: the run resumes at step 2 of 2, so the projection can only come from the checkpoint
    # (a fresh one would start from the same seeded init, which training moved away from).
    _, _, _, resumed = draft.run(p, tiny_base, dataset, tmp_path / "ckpt")
    assert torch.equal(resumed[draft.PROJECTION_FILE]["weight"], saved["weight"])

    from transformers import AutoModelForCausalLM, set_seed

    set_seed(p.seed)  # what draft.run builds before training: the projection's initial weights
    policy = AutoModelForCausalLM.from_pretrained(tiny_base)
    initial = draft.SoftTokenReward(draft.load_reward_model(encoder_rm)[0], policy.get_input_embeddings().weight.shape[1])
    assert not torch.equal(initial.projection.weight.detach(), saved["weight"]), "training did not move the projection"


@pytest.mark.slow
def test_the_fitted_bridge_scores_one_hot_text_as_the_reward_model_does(params, tiny_base, classifier_rm):
    """Fitting the bridge lowers the held-out error between the reward of one-hot real text through the bridge
    and the reward model's own score of that text; the policy is not touched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_base)
    before_policy = {k: v.clone() for k, v in policy.state_dict().items()}
    reward = draft.SoftTokenReward(*_with_hidden(draft.load_reward_model(classifier_rm(40).path), policy))
    from verifier_case import held_out_pairs

    questions, right, wrong = held_out_pairs(classifier_rm(40).val)  # texts the verifier tells apart: scores near 0 and 1
    texts = [f"{q}\n{a}" for q, a in zip(questions * 2, [*right, *wrong])]
    log = draft.fit_bridge(reward, policy.get_input_embeddings().weight, AutoTokenizer.from_pretrained(tiny_base),
                           texts, steps=60, learning_rate=1e-2, seed=params.seed)
    before, after = (e["bridge_fit_error"] for e in log)
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(v, before_policy[k]) for k, v in policy.state_dict().items())


def _with_hidden(model_and_tokenizer, policy):
    model, tokenizer = model_and_tokenizer
    return model, policy.get_input_embeddings().weight.shape[1], tokenizer


@pytest.mark.slow
def test_a_frozen_bridge_stays_as_fitted_and_the_reward_is_balanced_and_measured_on_text(params, prepared, tiny_base,
                                                                                         encoder_rm, tmp_path):
    """Defaults: the bridge is fitted, then frozen (one step or two, the same projection: only the policy
    trains); beta sets the reward gradient's norm against the LM loss's; the RM scores decoded replies."""
    def trained(steps: int, **fields):
        p = draft_params(params, encoder_rm, beta=1.0, warmup_steps=0, monitor_every=1, **fields,
                         training={"max_steps": steps, "per_device_train_batch_size": 2, "learning_rate": 5e-2,
                                   "logging_steps": 1, "save_steps": 10, "max_length": 256})
        dataset = rl.build_dataset(rl.read_jsonl(prepared / "train.jsonl"), p)
        _, _, log, files = draft.run(p, tiny_base, dataset, tmp_path / f"ckpt{steps}{sorted(fields)}")
        return log, files[draft.PROJECTION_FILE]["weight"]

    log1, frozen1 = trained(1)
    log2, frozen2 = trained(2)
    assert torch.equal(frozen1, frozen2), "a frozen bridge moved during training"
    _, moving = trained(2, train_bridge=True)
    assert not torch.equal(moving, frozen2)

    fit = [e["bridge_fit_error"] for e in log2 if "bridge_fit_error" in e]
    assert len(fit) == 2 and fit[1] <= fit[0]  # never worse (the other test shows it improving)
    steps = [e for e in log2 if "reward_grad_ratio" in e]
    assert len(steps) == 2
    for e in steps:  # weight x ||grad reward|| = beta x ||grad LM||
        assert e["reward_weight"] * e["reward_grad_ratio"] == pytest.approx(1.0, rel=1e-3)
    decoded = [e for e in log2 if "decoded_reward" in e]
    assert [e["step"] for e in decoded] == [0, 1, 2] and all(0.0 <= e["decoded_reward"] <= 1.0 for e in decoded)
