"""RL that can see what the evaluation fails, and says how far it moved (issue: RL that moves the model)."""

import json

import pytest
import torch

from posttrain.rewards.composition import build


def test_overlong_and_repetition_terms_see_a_cut_off_loop_and_spare_a_short_poem():
    funcs, weights = build({"overlong": {"weight": 1.0, "max_completion_len": 128}, "repetition": 0.5})
    assert [f.__name__ for f in funcs] == ["overlong", "repetition"] and weights == [1.0, 0.5]
    loop = [5, 6, 7, 8] * 32  # 128 tokens, no EOS: cut off at the limit, one phrase over and over
    poem = list(range(40))  # a 40-token reply that ended
    overlong, repetition = (f(completions=["", ""], completion_ids=[loop, poem]) for f in funcs)
    assert overlong == [-1.0, 0.0]
    assert repetition[0] < -0.9 and repetition[1] == 0.0


def test_the_text_tasks_default_rewards_carry_the_overlong_and_repetition_terms():
    from pathlib import Path

    from posttrain.config.loader import load_params

    root = Path(__file__).resolve().parents[1]
    for task in ("style", "chat"):
        rewards = load_params(root / "params.yaml", overrides=[f"data.task={task}", "rl.method=grpo"]).rl.rewards
        assert {"overlong", "repetition"} <= set(rewards), (task, rewards)


def test_adapter_update_norm_is_zero_at_the_start_and_grows_with_b(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.training.trainer import adapter_update_norm

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    policy.save_pretrained(tmp_path / "start")
    assert adapter_update_norm(tmp_path / "start") == 0.0
    (name, b), = [(n, p) for n, p in policy.named_parameters() if "lora_B" in n]
    a = dict(policy.named_parameters())[name.replace("lora_B", "lora_A")]
    with torch.no_grad():
        b.fill_(0.01)
    policy.save_pretrained(tmp_path / "moved")
    expected = float(torch.linalg.matrix_norm(2.0 * (b @ a).detach()))  # scaling lora_alpha / r = 2
    assert adapter_update_norm(tmp_path / "moved") == pytest.approx(expected, rel=1e-5)
    assert adapter_update_norm(tmp_path) is None  # no adapter there


def test_the_share_of_changed_greedy_replies_is_reported(tmp_path):
    from posttrain.config.loader import load_params
    from posttrain.release.registry import stage_gain
    from pathlib import Path

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", overrides=["data.task=style"])
    metrics = {"protocol_hash": "p", "question_set_hash": "q", "accuracy_pass": 0.5}
    sft = [{"question": f"q{i}", "generation": f"g{i}", "correct_pass": i % 2 == 0} for i in range(10)]
    rl = [dict(r, generation=r["generation"] + ("!" if i < 3 else "")) for i, r in enumerate(sft)]
    gain = stage_gain(params.promote, params.seed, (metrics, rl), (metrics, sft))
    assert gain["rl_changed_replies"] == pytest.approx(0.3) and gain["rl_vs_sft_difference"] == 0.0


def test_the_rl_stage_line_says_how_far_the_adapter_moved_and_is_loud_when_it_did_not():
    from posttrain.pipeline.summary import headline

    assert headline({"reward_last": 0.5, "adapter_update_norm": 0.42}) == "reward 0.5, adapter moved ||dW|| 0.42"
    assert headline({"reward_last": 0.5, "adapter_update_norm": 0.0}).endswith("||dW|| 0 (NOT AT ALL)")


def test_reports_without_replies_still_get_the_rl_gain_and_its_card_line():
    """Eval reports that carry scores but not the replies (an older eval, imported scores; .ci/gate_check.py
    writes these) get the paired gain without the changed-reply share, and nothing downstream trips on it."""
    from posttrain.config.loader import load_params
    from posttrain.release.registry import stage_gain, stage_gain_line
    from pathlib import Path

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", overrides=["data.task=style"])
    metrics = {"protocol_hash": "p", "question_set_hash": "q", "accuracy_pass": 0.5}
    sft = [{"question": f"q{i}", "correct_pass": i % 2 == 0} for i in range(10)]
    rl = [dict(r, correct_pass=True) for r in sft]
    gain = stage_gain(params.promote, params.seed, (metrics, rl), (metrics, sft))
    assert "rl_changed_replies" not in gain and gain["rl_vs_sft_difference"] == pytest.approx(0.5)
    line = stage_gain_line(gain | {"metric": params.promote.metric})
    assert line.startswith(params.promote.metric) and "changed" not in line
