"""Hybrid SFT/RL trainer: the step schedule, prompt masking, and the rl stage end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from posttrain import hybrid
from tasks import rl


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

    cfg = dataclasses.replace(params.rl.hybrid, sft_fraction_start=1.0, sft_fraction_end=0.0, sft_batch_size=2)
    training = params.rl.training | {"max_steps": 4, "learning_rate": 5e-2, "num_generations": 2,
                                     "per_device_train_batch_size": 2, "max_completion_length": 8, "beta": 0.1}
    p = dataclasses.replace(params, rl=dataclasses.replace(params.rl, method="hybrid", hybrid=cfg, training=training))
    out = rl.run(p, prepared / "train.jsonl", tiny_base, tmp_path / "rl", checkpoint_dir=tmp_path / "ckpt")["model"]

    log = json.loads((out / "train_log.json").read_text())
    assert [e["kind"] for e in log] == ["sft", "sft", "rl", "rl"]
    assert all("lm_loss" in e for e in log[:2]) and all("reward" in e and "kl" in e for e in log[2:])
    before, after = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert [k for k in before if not torch.equal(before[k], after[k])], "hybrid left every weight unchanged"


def test_group_relative_advantages_use_each_prompts_own_mean():
    from posttrain.reinforce import advantages

    rewards = torch.tensor([1.0, 0.0, 5.0, 5.0, 2.0, 4.0])
    grouped = advantages(rewards, group_size=2)
    assert grouped[2:4].abs().max() < 1e-5  # equal rewards in a group: no signal
    assert grouped[0] > 0 > grouped[1] and grouped[5] > 0 > grouped[4]
    assert torch.allclose(grouped[0], grouped[5]), "normalised within each group"
    batch = advantages(rewards)
    assert batch[2] > 0 and abs(float(batch.mean())) < 1e-6
