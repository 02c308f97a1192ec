"""Each stage on a tiny model built from a config: real assertions on what training did."""

import dataclasses
import hashlib
import json

import pytest
import torch

from posttrain.tasks import gsm8k as gsm8k_task
from posttrain.release.modelstore import save_merged
from posttrain.stages import base_model as base
from posttrain.stages import merge
from posttrain.stages import reward_model
from posttrain.stages import rl
from posttrain.stages import sft


def file_hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_section(params, name, **changes):
    return dataclasses.replace(params, **{name: dataclasses.replace(getattr(params, name), **changes)})


def test_tiny_base_loads_and_generates(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = tokenizer("Question: 2 + 3?\nAnswer:", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "Question: 2 + 3?\nAnswer:"  # byte-level: lossless
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    assert base.metrics(tiny_base)["n_parameters"] == sum(p.numel() for p in model.parameters())


def test_missing_model_folder_is_a_clear_error(params, tmp_path):
    p = with_section(params, "base", source="./no/such/model")
    with pytest.raises(FileNotFoundError, match="'./no/such/model' not found"):
        base.run(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="session")
def sft_run(params, prepared, tiny_base, session_dir):
    """The SFT stage, keeping the trainer's in-memory model (the one that trained) for inspection."""
    import trl

    trainers = []

    class RecordingSFTTrainer(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    p = with_section(params, "sft", training=params.sft.training | {"learning_rate": 1e-2, "max_steps": 3})
    before = file_hash(tiny_base / "model.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trl, "SFTTrainer", RecordingSFTTrainer)  # posttrain/stages/sft.py imports it from trl when it runs
        sft.run(p, prepared / "train.jsonl", tiny_base, session_dir / "sft_adapter", checkpoint_dir=session_dir / "ckpt_sft")
    assert file_hash(tiny_base / "model.safetensors") == before  # the base folder is never touched
    assert len(trainers) == 1
    return session_dir / "sft_adapter", trainers[0].model


@pytest.fixture(scope="session")
def sft_adapter(sft_run):
    return sft_run[0]


@pytest.mark.slow
def test_sft_trains_adapters_only_and_masks_the_prompt(params, prepared, tiny_base, sft_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sft_adapter, trained = sft_run
    adapter = load_file(sft_adapter / "adapter_model.safetensors")
    # Only LoRA matrices are saved: `modules_to_save` or a trainable embedding would add full base-shaped weights.
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter), [k for k in adapter if "lora_" not in k]
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    # The model the trainer trained: only LoRA parameters took gradients, and after training every base
    # weight still equals the base file's (a trainable base would have moved at learning rate 1e-2).
    trainable = [name for name, param in trained.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable), [n for n in trainable if "lora_" not in n]
    base_file = load_file(tiny_base / "model.safetensors")
    compared = set()
    for name, tensor in trained.get_base_model().state_dict().items():
        key = name.replace("base_layer.", "")
        if "lora_" not in name and key in base_file:
            assert torch.equal(tensor.detach().cpu(), base_file[key]), f"base weight {key} changed in training"
            compared.add(key)
    assert compared == set(base_file)
    base_model = AutoModelForCausalLM.from_pretrained(tiny_base)
    log = json.loads((sft_adapter / "train_log.json").read_text())
    assert any("loss" in e for e in log)
    # Throughput: the non-padding tokens TRL counted in this (unresumed) run, at 4N + 6n FLOP each.
    figures = sft.metrics(sft_adapter)
    trl_tokens = [e["num_tokens"] for e in log if "num_tokens" in e]
    assert figures["throughput_tokens"] == max(e.get("num_input_tokens_seen", 0) for e in log) >= trl_tokens[-1] > 0
    frozen, adapter_size = sum(v.numel() for v in base_file.values()), sum(v.numel() for v in adapter.values())
    assert figures["throughput_flop_per_token"] == 4 * frozen + 6 * adapter_size
    assert figures["throughput_tokens_per_s"] == pytest.approx(figures["throughput_tokens"] / figures["throughput_seconds"])
    # Prompt masking: TRL's completion mask covers the answer only.
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    dataset = sft.build_dataset([{"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}], params)
    trainer = SFTTrainer(model=base_model, args=SFTConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", max_length=512),
                         train_dataset=dataset, processing_class=tokenizer)
    row = trainer.train_dataset[0]
    # TRL folds the completion mask into labels: -100 on every prompt token.
    completion = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert "2+2=4" in completion and "What is 2+2?" not in completion


@pytest.mark.slow
def test_dora_variant_trains(params, prepared, tiny_base, tmp_path):
    from safetensors.torch import load_file

    p = with_section(params, "sft", lora=params.sft.lora | {"use_dora": True},
                     training=params.sft.training | {"max_steps": 2, "learning_rate": 1e-2})
    sft.run(p, prepared / "train.jsonl", tiny_base, tmp_path / "dora", checkpoint_dir=tmp_path / "ckpt")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    adapter, base_file = load_file(tmp_path / "dora" / "adapter_model.safetensors"), load_file(tiny_base / "model.safetensors")
    modules = sorted({k.split(".lora_A.")[0] for k in adapter if ".lora_A." in k})
    magnitudes = {k.split(".lora_magnitude_vector")[0]: v for k, v in adapter.items() if "lora_magnitude_vector" in k}
    assert modules and sorted(magnitudes) == modules  # DoRA: one magnitude vector per adapted module, saved
    for module in modules:
        assert adapter[f"{module}.lora_B.weight"].abs().sum() > 0, module  # B starts at zero
        # m starts as the row norms of the frozen weight ||W||; training moved it, not far.
        norm = torch.linalg.norm(base_file[module.removeprefix("base_model.model.") + ".weight"], dim=1)
        assert magnitudes[module].shape == norm.shape, module
        torch.testing.assert_close(magnitudes[module], norm, rtol=0.2, atol=0.05)
        assert not torch.allclose(magnitudes[module], norm, rtol=0, atol=1e-5), f"{module}: magnitude did not train"


@pytest.fixture(scope="session")
def merged_sft(params, tiny_base, sft_adapter, session_dir):
    return merge.run(params, tiny_base, sft_adapter, session_dir / "sft")["model"]


@pytest.mark.slow
def test_merged_logits_equal_adapter_logits(tiny_base, sft_adapter, merged_sft):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merged_sft
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(sft_adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 17))
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = merged(ids).logits, adapted(ids).logits, plain(ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # the adapter did change the model


@pytest.mark.slow
def test_grpo_updates_the_policy(params, prepared, merged_sft, tmp_path):
    model_dir = merged_sft
    p = with_section(params, "rl", rewards={"length_penalty": 1.0, "exact_match": 1.0},
                     training=params.rl.training | {"learning_rate": 5e-2, "max_completion_length": 12, "temperature": 1.5})
    out = rl.run(p, prepared / "train.jsonl", model_dir, tmp_path / "rl", checkpoint_dir=tmp_path / "ckpt")["model"]
    from safetensors.torch import load_file

    merged = save_merged(out, tmp_path / "merged")  # the rl stage keeps an adapter: rebuild the model
    before, after = load_file(model_dir / "model.safetensors"), load_file(merged / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "GRPO left every weight unchanged"
    log = json.loads((out / "train_log.json").read_text())
    assert any("reward" in e for e in log)
    figures = rl.metrics(out)
    # Throughput: TRL's GRPO counts prompt + completion tokens; the stage reports them per second of training.
    assert figures["throughput_tokens"] == [e["num_tokens"] for e in log if "num_tokens" in e][-1] > 0
    assert 0 < figures["throughput_fraction_of_fp32_bound"] < 1


def test_unknown_rl_method_is_refused(params, prepared, tmp_path):
    with pytest.raises(ValueError, match="rl.method: unknown method 'ppx'"):
        rl.run(with_section(params, "rl", method="ppx"), prepared / "train.jsonl", tmp_path, tmp_path / "o")


@pytest.mark.slow
def test_reward_model_is_a_safetensors_verifier_that_beats_chance_on_held_out_answers(classifier_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from verifier_case import held_out_pairs

    # max_length 40 is shorter than every text (57 tokens): the final `#### n` line survives only because
    # the stage truncates from the left.
    max_length = 40
    rm = classifier_rm(max_length)  # the reward_model stage on verifier_case's task (tests/conftest.py)
    val, length, out = rm.val, rm.length, rm.path
    assert length > max_length
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    model = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and tokenizer.truncation_side == "left"
    assert reward_model.metrics(out)["val_accuracy"] >= 0.8  # 64 held-out texts (32 questions x right/wrong); chance 0.5
    questions, right, wrong = held_out_pairs(val)

    def logits(answers):
        batch = tokenizer([f"{q}\n{a}" for q, a in zip(questions, answers)], truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**batch).logits[:, 0]

    assert (logits(right) > logits(wrong)).float().mean() >= 0.9  # the right answer outscores its corruption


def test_corrupted_answers_change_the_final_number():
    import random

    from posttrain.tasks.gsm8k_answers import gold_answer, parse_number

    answer = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
    for seed in range(20):
        wrong = gsm8k_task.corrupt(answer, random.Random(seed))
        assert parse_number(gold_answer(wrong)) != 7.0 and "<<" not in wrong


@pytest.mark.slow
def test_reinforce_updates_the_policy_with_kl_to_the_reference(params, prepared, merged_sft, tmp_path):
    model_dir = merged_sft
    p = with_section(params, "rl", method="reinforce", rewards={"length_penalty": 1.0},
                     training=params.rl.training | {"learning_rate": 5e-2, "max_completion_length": 12,
                                                    "temperature": 1.5, "beta": 0.1, "max_steps": 2,
                                                    "per_device_train_batch_size": 4})
    out = rl.run(p, prepared / "train.jsonl", model_dir, tmp_path / "rl", checkpoint_dir=tmp_path / "ckpt")["model"]
    from safetensors.torch import load_file

    merged = save_merged(out, tmp_path / "merged")  # the rl stage keeps an adapter: rebuild the model
    before, after = load_file(model_dir / "model.safetensors"), load_file(merged / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in log] == [1, 2] and all("kl" in e and "reward" in e for e in log)
    assert log[-1]["kl"] > 0  # after one update the policy has moved away from the frozen reference


def test_reinforce_advantages_and_loss():
    from posttrain.methods.reinforce import advantages, k3_kl, reinforce_loss

    adv = advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(adv.mean(), torch.tensor(0.0)) and torch.allclose(adv.std(), torch.tensor(1.0), atol=1e-4)
    assert torch.equal(advantages(torch.tensor([2.0, 2.0])), torch.zeros(2))
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    assert torch.allclose(k3_kl(logp, logp), torch.zeros(2, 2))
    loss, _ = reinforce_loss(logp, None, torch.ones(2, 2), torch.tensor([1.0, 0.0]), beta=0.0)
    loss.backward()
    # The rewarded sequence's log-probs get pushed up (negative gradient of the loss), the other's down.
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()


def test_last_checkpoint_skips_half_written_and_foreign_checkpoints(tmp_path):
    from posttrain.training.trainer import last_checkpoint

    ckpt = tmp_path / "ckpt"
    assert last_checkpoint(ckpt, "a") is None
    (ckpt / "checkpoint-5").mkdir()
    (ckpt / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    (ckpt / "checkpoint-10").mkdir()
    (ckpt / "checkpoint-10" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert last_checkpoint(ckpt, "a") == str(ckpt / "checkpoint-5")
    assert not (ckpt / "checkpoint-10").exists()
    assert last_checkpoint(ckpt, "b") is None and not (ckpt / "checkpoint-5").exists()  # other settings
