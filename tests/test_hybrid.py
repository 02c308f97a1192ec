"""Hybrid SFT/RL trainer: the step schedule, prompt masking, the PPO pieces by hand, and the rl stage end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from posttrain.methods import hybrid
from posttrain.release.modelstore import save_merged
from posttrain.stages import rl


def test_step_kinds_follow_ratio_and_curriculum():
    assert hybrid.step_kinds(6, 0.5, 0.5) == ["sft", "rl", "sft", "rl", "sft", "rl"]
    assert hybrid.step_kinds(4, 1.0, 1.0) == ["sft"] * 4
    assert hybrid.step_kinds(4, 0.0, 0.0) == ["rl"] * 4
    curriculum = hybrid.step_kinds(10, 1.0, 0.0)
    assert curriculum[:3] == ["sft"] * 3 and curriculum[-3:] == ["rl"] * 3
    assert curriculum.count("sft") == 5
    one_in_three = hybrid.step_kinds(9, 1 / 3, 1 / 3)
    assert one_in_three.count("sft") == 3


def test_sft_batch_masks_the_prompt(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    chat = {"prompt": [{"role": "user", "content": "1+1?"}], "completion": [{"role": "assistant", "content": "#### 2"}]}
    plain = {"prompt": "Question: 2+2?\nAnswer:", "completion": " #### 4\n"}
    batch = hybrid.sft_batch(tokenizer, [chat, plain], max_length=512)
    for row, example in enumerate([chat, plain]):
        kept = batch["labels"][row][batch["labels"][row] != -100]
        text = tokenizer.decode(kept)
        assert ("#### 2" if row == 0 else "#### 4") in text and "?" not in text
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.slow
def test_hybrid_stage_alternates_sft_and_rl_steps(params, prepared, tiny_base, tmp_path):
    from safetensors.torch import load_file

    cfg = dataclasses.replace(params.rl.hybrid, mode="curriculum", sft_fraction_start=1.0, sft_fraction_end=0.0,
                              sft_batch_size=2)
    training = params.rl.training | {"max_steps": 4, "learning_rate": 5e-2, "num_generations": 2,
                                     "per_device_train_batch_size": 2, "max_completion_length": 8, "beta": 0.1}
    p = dataclasses.replace(params, rl=dataclasses.replace(params.rl, method="hybrid", hybrid=cfg, training=training))
    out = rl.run(p, prepared / "train.jsonl", tiny_base, tmp_path / "rl", checkpoint_dir=tmp_path / "ckpt")["model"]

    log = json.loads((out / "train_log.json").read_text())
    assert [e["kind"] for e in log] == ["sft", "sft", "rl", "rl"]
    assert all("lm_loss" in e for e in log[:2]) and all("reward" in e and "kl" in e for e in log[2:])
    merged = save_merged(out, tmp_path / "merged")  # the rl stage keeps an adapter: rebuild the model
    before, after = load_file(tiny_base / "model.safetensors"), load_file(merged / "model.safetensors")
    assert [k for k in before if not torch.equal(before[k], after[k])], "hybrid left every weight unchanged"


def test_group_relative_advantages_use_each_prompts_own_mean():
    from posttrain.methods.reinforce import advantages

    rewards = torch.tensor([1.0, 0.0, 5.0, 5.0, 2.0, 4.0])
    grouped = advantages(rewards, group_size=2)
    assert grouped[2:4].abs().max() < 1e-5  # equal rewards in a group: no signal
    assert grouped[0] > 0 > grouped[1] and grouped[5] > 0 > grouped[4]
    assert torch.allclose(grouped[0], grouped[5]), "normalised within each group"
    batch = advantages(rewards)
    assert batch[2] > 0 and abs(float(batch.mean())) < 1e-6


def test_gae_by_hand():
    # one row, 3 tokens, the last one after EOS; gamma .9, lam .8
    # t=1: delta = 1 + .9 * 0 - .2 = .8, A = .8;  t=0: delta = 0 + .9 * .2 - .5 = -.32, A = -.32 + .72 * .8 = .256
    adv = hybrid.gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.2, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]),
                     gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.256, 0.8, 0.0]]))


def test_ppo_losses_clip_by_hand():
    import math

    logp, old = torch.tensor([[math.log(1.5), math.log(0.5)]]), torch.zeros(1, 2)  # ratios 1.5 and 0.5
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.8, 0.0]])
    pg, vf, extra = hybrid.ppo_losses(logp, old, values, old_values, adv, returns, mask, 0.2, 0.2)
    # policy: max(-1 * 1.5, -1 * 1.2) = -1.2 and max(1 * .5, 1 * .8) = .8 -> mean -.2
    # value: clipped values .7 and .3; max(.04, .01) = .04 and max(0, .09) = .09 -> .5 * mean = .0325
    assert float(pg) == pytest.approx(-0.2) and float(vf) == pytest.approx(0.0325) and extra["clipfrac"] == 1.0
    rewards, kl = hybrid.token_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]),
                                       mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 2.1]]))  # -.1 * k1 per token, the score at the end
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0]]))


def test_reinforce_kl_settings_by_hand():
    import math

    from posttrain.methods.reinforce import Settings, sequence_kl

    logp, ref, mask = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    k1_mean = sequence_kl(logp, ref, mask, Settings("k1", "token_mean"))
    k3_sum = sequence_kl(logp, ref, mask, Settings("k3", "sequence_sum"))
    assert float(k1_mean) == pytest.approx((0.5 - 1.0) / 2)
    assert float(k3_sum) == pytest.approx((math.exp(-0.5) + 0.5 - 1) + (math.exp(1) - 1 - 1))


@pytest.mark.slow
def test_hybrid_alternate_makes_an_sft_and_a_ppo_step_on_each_batch(params, prepared, tiny_base, tmp_path):
    from safetensors.torch import load_file

    cfg = dataclasses.replace(params.rl.hybrid, mode="alternate", sft_batch_size=2, ppo_epochs=2)
    training = params.rl.training | {"max_steps": 2, "learning_rate": 5e-2, "num_generations": 2,
                                     "per_device_train_batch_size": 2, "max_completion_length": 8,
                                     "gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine_with_min_lr",
                                     "lr_scheduler_kwargs": {"min_lr": 1e-3}}
    p = dataclasses.replace(params, rl=dataclasses.replace(params.rl, method="hybrid", hybrid=cfg, training=training))
    out = rl.run(p, prepared / "train.jsonl", tiny_base, tmp_path / "rl", checkpoint_dir=tmp_path / "ckpt")["model"]

    log = json.loads((out / "train_log.json").read_text())
    assert [e["kind"] for e in log] == ["sft+ppo", "sft+ppo"]
    for entry in log:
        assert {"lm_loss", "reward", "kl", "ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac"} <= set(entry)
    assert log[-1]["learning_rate"] == pytest.approx(1e-3)  # cosine_with_min_lr ran to its min_lr
    merged = save_merged(out, tmp_path / "merged")  # the rl stage keeps an adapter: rebuild the model
    before, after = load_file(tiny_base / "model.safetensors"), load_file(merged / "model.safetensors")
    assert [k for k in before if not torch.equal(before[k], after[k])], "hybrid left every weight unchanged"
    assert not any("value" in k for k in after), "the value head is not part of the policy"


@pytest.mark.parametrize("profile, deprecated", [("assignment_reinforce", False), ("seed002", True)])
def test_the_assignment_reinforce_profile_sets_the_assignments_reinforce(tmp_path, monkeypatch, capsys, profile,
                                                                         deprecated):
    import shutil

    from conftest import ROOT
    from posttrain.pipeline.preflight import update_params_file

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    monkeypatch.chdir(tmp_path)
    update_params_file(tmp_path / "params.yaml", profile, [])  # validated before it is written
    warned = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    # the old name: the same file, and one line naming the new one
    assert warned == (["warning: --profile seed002 is deprecated, use --profile assignment_reinforce (the same file; "
                       "the old name will be refused in the next release)"] if deprecated else [])
    from posttrain.config.loader import load_params

    rl_cfg = load_params(tmp_path / "params.yaml").rl
    assert rl_cfg.method == "reinforce" and rl_cfg.training["beta"] == 0.1 and rl_cfg.training["top_p"] == 0.9
    assert rl_cfg.training["max_completion_length"] == 300
    assert (rl_cfg.training["per_device_train_batch_size"], rl_cfg.training["gradient_accumulation_steps"]) == (4, 16)
    assert (rl_cfg.reinforce.kl_estimator, rl_cfg.reinforce.kl_reduction, rl_cfg.reinforce.logprob_clamp) == (
        "k1", "token_mean", [-20, 0])
