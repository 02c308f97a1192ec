"""The persona chat task (posttrain/tasks/chat.py), StrictBot's mlp_head reward model (posttrain/reward_models/mlp_head.py),
PPO on it, and the held-out judge, on tiny models.

    .venv/bin/python -m pytest tests/test_chat.py -q -m "not slow"     # schema, split, prompts, the head's wiring
    .venv/bin/python -m pytest tests/test_chat.py -q                   # + training, PPO and dvc repro end to end
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from posttrain.reward_models import mlp_head
from posttrain.config.loader import load_params
from posttrain.config.schema import ConfigError
from posttrain.io import DataError, read_jsonl
from posttrain.evaluation.prompts import digest, prompt_text, protocol, rl_prompt, sft_example
from posttrain.tasks import chat, registry
from tests.conftest import ROOT
from tests.test_ppo import folder_hash

SHIPPED = ROOT / "data" / "chat"


def chat_params(base: Path | None = None, **chat_fields):
    """params.yaml with data.task chat (quick profile), a data.chat section changed by `chat_fields`."""
    params = load_params(ROOT / "params.yaml", overrides=["data.task=chat"])
    return dataclasses.replace(params, data=dataclasses.replace(
        params.data, chat=dataclasses.replace(params.data.chat, **chat_fields)))


def instruction(i):
    return {"input": f"how do i do exercise {i}", "output": f"Start from rule {i}. What comes next?"}


def preference(i):
    return {"prompt": f"can you solve task {i}", "chosen": f"Use idea {i} first. What do you get?",
            "rejected": f"The answer is {i}!"}


def write_source(folder: Path, instructions, preferences=None, as_list=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if as_list:  # one object per line, inside [ ... ]: record i starts on line i + 2
        body = ",\n".join(r if isinstance(r, str) else json.dumps(r) for r in instructions)
        (folder / "instructions.json").write_text("[\n" + body + "\n]\n")
    else:
        (folder / "instructions.json").write_text("".join(
            (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in instructions))
    if preferences is not None:
        (folder / "preferences.jsonl").write_text("".join(
            (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in preferences))
    return folder


# --------------------------------------------------------------------------- data: schema, reading, split


@pytest.mark.parametrize("as_list", [True, False], ids=["json-list", "jsonl"])
@pytest.mark.parametrize("bad, message", [
    ({"input": "  ", "output": "x?"}, r"expect_column_values_to_match_regex on 'input'"),
    ({"input": "new question", "output": ""}, r"expect_column_values_to_match_regex on 'output'"),
    ({"input": "new question"}, r"expect_column_values_to_not_be_null on 'output'"),
    ({"input": "How do I  do Exercise 0", "output": "x?"}, r"expect_column_values_to_be_in_set on 'input \(the same "
                                                          r"input twice\)'"),
])
def test_instruction_errors_name_the_file_and_line(tmp_path, as_list, bad, message):
    from posttrain.stages import prepare

    src = write_source(tmp_path / "src", [instruction(i) for i in range(3)] + [bad] + [instruction(i) for i in range(3, 9)],
                       as_list=as_list)
    with pytest.raises(DataError, match=rf"{src}/instructions.json:{5 if as_list else 4}: failed .*{message}"):
        prepare.run(chat_params(source=str(src), preferences=""), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "can you solve task 1", "chosen": "a?", "rejected": "b"}, r"expect_column_values_to_be_in_set on "
                                                                          r"'prompt \(the same prompt twice\)'"),
    ({"prompt": "p", "chosen": "Same reply?", "rejected": " Same reply? "}, r"expect_column_values_to_be_in_set on "
                                                                            r"'chosen == rejected'"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, r"expect_column_values_to_match_regex on 'chosen'"),
    ({"prompt": "p", "chosen": "a?"}, r"expect_column_values_to_not_be_null on 'rejected'"),
])
def test_preference_errors_name_the_file_and_line(tmp_path, bad, message):
    from posttrain.stages import prepare

    src = write_source(tmp_path / "src", [instruction(i) for i in range(10)],
                       [preference(i) for i in range(4)] + ["", bad] + [preference(i) for i in range(4, 8)])
    with pytest.raises(DataError, match=rf"{src}/preferences.jsonl:6: failed .*{message}"):
        prepare.run(chat_params(source=str(src)), tmp_path / "out")


def test_preference_pairs_on_the_instructions_own_prompts_keep_them_out_of_the_test_split(tmp_path, capsys):
    """The ordinary shape of chat data: pairs collected on the instructions' prompts. Those instructions train or
    validate, never test; the split is refused only when every instruction has pairs."""
    def params_for(src):
        return chat_params(source=str(src))

    instructions = [instruction(i) for i in range(20)]
    probe = params_for(write_source(tmp_path / "probe", instructions, []))
    _, _, test_before = chat.split_instructions(chat.read_records(tmp_path / "probe/instructions.json"), 0.1, 0.2,
                                                probe.seed)
    # Every preference prompt is an instruction input, among them each one the split would pick for test.
    paired = sorted({r["input"] for r in test_before} | {instruction(i)["input"] for i in range(6)})
    pairs = [{"prompt": text.upper(), "chosen": "Think first. What do you get?", "rejected": "It is 4!"}
             for text in paired]
    src = write_source(tmp_path / "src", instructions, pairs)
    splits, report = chat.prepare(params_for(src))
    tests = {chat.normalised(r["input"]) for r in splits["test"]}
    assert len(splits["test"]) == len(test_before) == 4 and not tests & {chat.normalised(p) for p in paired}
    assert len(splits["train"]) + len(splits["val"]) + len(splits["test"]) == 20
    assert report["preferences"]["success"] and len(splits["preferences"]) == len(pairs)
    assert report["split"] == {"instructions_with_preference_pairs": len(paired), "test": 4, "test_wanted": 4}
    # Data without such overlap splits as it always did.
    unpaired, _ = chat.prepare(params_for(write_source(tmp_path / "unpaired", instructions, [preference(i) for i in
                                                                                            range(10)])))
    assert [r["input"] for r in unpaired["test"]] == [r["input"] for r in test_before]

    # One instruction without pairs: the test split shrinks to it, and prepare says so.
    pairs = [{"prompt": r["input"], "chosen": "Think. Why?", "rejected": "No!"} for r in instructions[1:]]
    splits, report = chat.prepare(params_for(write_source(tmp_path / "one", instructions, pairs)))
    assert [r["input"] for r in splits["test"]] == [instructions[0]["input"]]
    assert "1 test items instead of 4" in capsys.readouterr().out

    # Pairs on every instruction: no split can keep the test unseen.
    pairs.append({"prompt": instructions[0]["input"], "chosen": "Think. Why?", "rejected": "No!"})
    src = write_source(tmp_path / "all", instructions, pairs)
    with pytest.raises(DataError, match=rf"{src}/instructions.json: every one of the 20 instructions has preference "
                                        r"pairs .* add instructions without preference pairs"):
        chat.prepare(params_for(src))


def test_broken_json_list_and_missing_files_name_the_place(tmp_path):
    src = tmp_path / "src"
    write_source(src, [instruction(0), '{"input": "a", "output": }'])
    with pytest.raises(DataError, match=rf"{src}/instructions.json:3: not valid JSON"):
        chat.read_records(src / "instructions.json")
    write_source(src, [instruction(0), "[1, 2]"])
    with pytest.raises(DataError, match=rf"{src}/instructions.json:3: expected a JSON object, got list"):
        chat.read_records(src / "instructions.json")
    with pytest.raises(DataError, match=r"preferences.jsonl: file not found \(data.chat.preferences; set it to \"\""):
        chat.prepare(chat_params(source=str(src)))


def test_json_list_and_jsonl_read_the_same_records_with_their_lines(tmp_path):
    records = [instruction(i) for i in range(4)]
    as_list = chat.read_records(write_source(tmp_path / "a", records) / "instructions.json")
    as_lines = chat.read_records(write_source(tmp_path / "b", records, as_list=False) / "instructions.json")
    assert list(as_list) == list(as_lines) == records
    assert as_list.line_numbers == [2, 3, 4, 5] and as_lines.line_numbers == [1, 2, 3, 4]
    pretty = tmp_path / "c" / "instructions.json"
    pretty.parent.mkdir()
    pretty.write_text(json.dumps(records, indent=2))  # the shipped file's layout: 4 lines per record
    assert chat.read_records(pretty).line_numbers == [2, 6, 10, 14]


def test_shipped_data_splits_seeded_and_the_judge_part_is_never_the_reward_models():
    params = chat_params()
    splits, report = chat.prepare(params)
    assert report["instructions"]["success"] and report["preferences"]["success"]
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (147, 21, 42)
    inputs = {name: {r["input"] for r in splits[name]} for name in ("train", "val", "test")}
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["val"] and not inputs["val"] & inputs["test"]
    again, _ = chat.prepare(params)
    assert again == splits
    other, _ = chat.prepare(dataclasses.replace(params, seed=params.seed + 1))
    assert {r["input"] for r in other["test"]} != inputs["test"]

    prefs = splits["preferences"]
    assert len(prefs) == 211
    rm_train, rm_val, rm_from = chat.pair_sets("reward_model", splits["train"], splits["val"], prefs, 128, 0)
    judge_train, judge_val, judge_from = chat.pair_sets("judge", splits["train"], splits["val"], prefs, 128, 0)
    rm_prompts = {p["user"] for p in rm_train + rm_val}
    judge_prompts = {p["user"] for p in judge_train + judge_val}
    assert not rm_prompts & judge_prompts and len(rm_prompts) + len(judge_prompts) == 211
    assert len(judge_prompts) == round(211 * params.data.chat.judge_fraction)
    assert not {p["user"] for p in rm_train} & {p["user"] for p in rm_val}
    assert "reward_model part" in rm_from and "judge part" in judge_from
    # without a preference file: reference over a base sample, on disjoint instructions
    rm_train, rm_val, _ = chat.pair_sets("reward_model", splits["train"], splits["val"], [], 10_000, 0)
    judge_train, judge_val, _ = chat.pair_sets("judge", splits["train"], splits["val"], [], 10_000, 0)
    assert all(p["rejected"] is None for p in rm_train + judge_train)
    assert not {p["user"] for p in rm_train + rm_val} & {p["user"] for p in judge_train + judge_val}


def test_prepare_stage_writes_the_preference_file_for_every_task(params, prepared):
    assert (prepared / "preferences.jsonl").read_text() == ""  # gsm8k: none, but the stages depend on the file


# --------------------------------------------------------------------------- params and prompts


def test_chat_defaults_prompt_formats_and_the_protocol(tiny_base):
    from transformers import AutoTokenizer

    params = chat_params()
    assert (params.promote.metric, params.promote.registered_model) == ("judge_margin", "chat-policy")
    assert params.eval.prompt_style == "chat" and params.eval.system_prompt == params.data.chat.system_prompt
    record = {"input": "whats 2+2", "output": "Count on from 2. What do you reach?"}
    assert sft_example(record, params.eval, chat)["completion"] == [{"role": "assistant", "content": record["output"]}]

    strictbot = load_params(ROOT / "params.yaml", overrides=["data.task=chat", "data.chat.prompt_format=strictbot"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    assert strictbot.eval.prompt_style == "strictbot" and strictbot.eval.system_prompt == ""
    assert prompt_text("whats 2+2", strictbot.eval, tokenizer) == "<|user|> whats 2+2 <|end|>\n<|assistant|>"
    assert sft_example(record, strictbot.eval, chat) == {"prompt": "<|user|> whats 2+2 <|end|>\n<|assistant|>",
                                                         "completion": " Count on from 2. What do you reach?"}
    assert rl_prompt(record, strictbot.eval, chat)["prompt"] == "<|user|> whats 2+2 <|end|>\n<|assistant|>"
    recorded = protocol(strictbot.eval, chat.protocol(strictbot))
    # recorded under the name its results were first hashed with (tests/test_prompt_pins.py pins the hash)
    assert recorded["prompt_style"] == "seed" and recorded["prompt_template"] == "<|user|> {user} <|end|>\n<|assistant|>"
    assert "judge part of preferences.jsonl" in recorded["judge"]
    assert digest(recorded) != digest(protocol(params.eval, chat.protocol(params)))
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: 'eval.prompt_style' is set by data.chat.prompt_format"):
        load_params(ROOT / "params.yaml", overrides=["data.task=chat", "eval.prompt_style=plain"])


def test_ppo_takes_strictbots_defaults_for_chat_and_gsm8k_keeps_its_own():
    chat_ppo = load_params(ROOT / "params.yaml", overrides=["data.task=chat", "rl.method=ppo", "reward_model.kind=mlp_head"])
    assert {k: chat_ppo.rl.ppo[k] for k in ("kl_coef", "response_length", "temperature")} == {
        "kl_coef": 0.03, "response_length": 32, "temperature": 0.7}
    assert chat_ppo.rl.rewards == {}  # PPO on the learned reward alone, as StrictBot
    assert chat_params().rl.rewards == {"cosine_sts": 1.0, "overlong": 1.0, "repetition": 0.5}  # the other methods need a rule reward
    gsm8k = load_params(ROOT / "params.yaml", overrides=["rl.method=ppo", "reward_model.kind=pairwise"])
    assert {k: gsm8k.rl.ppo[k] for k in ("kl_coef", "response_length", "temperature")} == {
        "kl_coef": 0.05, "response_length": 64, "temperature": 0.8}
    assert gsm8k.rl.rewards == {"exact_match": 1.0, "format": 0.2}
    explicit = load_params(ROOT / "params.yaml", overrides=["data.task=chat", "rl.ppo.kl_coef=0.1"])
    assert explicit.rl.ppo["kl_coef"] == 0.1 and explicit.rl.ppo["response_length"] == 32
    # reward_model.kind `task`: the issue's own command needs no kind; PPO elsewhere gets an LM reward model.
    assert load_params(ROOT / "params.yaml", overrides=["data.task=chat", "rl.method=ppo"]).reward_model.kind == "mlp_head"
    assert load_params(ROOT / "params.yaml", overrides=["rl.method=ppo"]).reward_model.kind == "pairwise"
    assert load_params(ROOT / "params.yaml").reward_model.kind == "classifier"
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: rl.method ppo .* 'reward_model.kind' must be one of "
                                          r"pairwise, mlp_head, got 'classifier'"):
        load_params(ROOT / "params.yaml", overrides=["data.task=chat", "rl.method=ppo", "reward_model.kind=classifier"])


def test_preflight_lets_chat_ppo_run_on_the_reward_model_alone(tmp_path):
    import shutil

    from posttrain.pipeline.preflight import validate_file

    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    text = target.read_text().replace("  task: gsm8k ", "  task: chat  ").replace("  method: grpo ", "  method: ppo  ")
    target.write_text(text)
    checked = validate_file(target)
    assert checked.rl.rewards == {} and checked.reward_model.kind == "mlp_head"


# --------------------------------------------------------------------------- the mlp_head reward model


@pytest.fixture(scope="module")
def head_model(tiny_base):
    from transformers import AutoTokenizer

    backbone, _ = mlp_head.load_backbone(tiny_base)
    torch.manual_seed(0)
    return mlp_head.MLPHeadRewardModel(backbone).eval(), AutoTokenizer.from_pretrained(tiny_base)


def test_the_head_is_strictbots_mlp(head_model):
    model, _ = head_model
    layers = list(model.head)
    hidden = model.config.hidden_size
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, torch.nn.Linear)] == [
        (hidden, 512), (512, 256), (256, 1)]
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert all(m.p == 0.1 for m in layers if isinstance(m, torch.nn.Dropout))


def test_the_score_is_read_at_the_last_real_token_whatever_the_padding(head_model):
    model, tokenizer = head_model
    rows = [mlp_head.encode(tokenizer, "Question: what is 3 + 4?\nAnswer:", " Count on from 3. What do you get?", 512),
            mlp_head.encode(tokenizer, "hi", " ok", 512)]
    with torch.no_grad():
        alone = [float(model(torch.tensor([row]))) for row in rows]
        right = model(*mlp_head.pad(rows, tokenizer.pad_token_id, "right")).tolist()
        left = model(*mlp_head.pad(rows, tokenizer.pad_token_id, "left")).tolist()
        ids, mask = mlp_head.pad(rows, 7, "left")  # whatever the pad id: masked out
        other_pad = model(ids, mask).tolist()
    assert right == pytest.approx(alone, abs=1e-5) and left == pytest.approx(alone, abs=1e-5)
    assert other_pad == pytest.approx(alone, abs=1e-5)
    assert alone[0] != pytest.approx(alone[1], abs=1e-6)
    # the last real token decides: a different first token moves the score only through attention,
    # a different last token is what is read
    changed = rows[1][:-1] + [rows[0][-2]]
    with torch.no_grad():
        assert float(model(torch.tensor([changed]))) != pytest.approx(alone[1], abs=1e-6)


def test_trl_get_reward_reads_the_same_score_as_the_model(head_model):
    """PPO scores with trl.experimental.utils.get_reward (base_model_prefix + score, left-padded queries,
    right-padded responses): it must see what the model was trained to output."""
    from trl.experimental.utils import get_reward

    model, tokenizer = head_model
    prompt_ids = [tokenizer("Question: a?\nAnswer:", add_special_tokens=False).input_ids,
                  tokenizer("Q: longer question here?\nA:", add_special_tokens=False).input_ids]
    replies = [tokenizer(" yes", add_special_tokens=False).input_ids + [tokenizer.eos_token_id],
               tokenizer(" no, think again", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
    pad = tokenizer.pad_token_id
    width, length = max(map(len, prompt_ids)), max(map(len, replies))
    query_responses = torch.tensor([[pad] * (width - len(q)) + q + r + [pad] * (length - len(r))
                                    for q, r in zip(prompt_ids, replies)])
    with torch.no_grad():
        _, scores, _ = get_reward(model, query_responses, pad, width)
        expected = [float(model(torch.tensor([q + r]))) for q, r in zip(prompt_ids, replies)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


def test_only_the_head_takes_gradients(head_model):
    model, tokenizer = head_model
    model.train()
    assert not model.backbone.training  # frozen: stays in eval mode
    rows = [mlp_head.encode(tokenizer, "a", " b?", 64), mlp_head.encode(tokenizer, "a", " b!", 64)]
    scores = model(*mlp_head.pad(rows, tokenizer.pad_token_id))
    mlp_head.bradley_terry_loss(scores[:1], scores[1:]).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = (torch.log1p(torch.exp(torch.tensor(-2.0))) + torch.log1p(torch.exp(torch.tensor(1.0)))) / 2
    assert float(mlp_head.bradley_terry_loss(chosen, rejected)) == pytest.approx(float(expected))


def test_the_judge_and_the_reward_model_are_different_stages_files_and_data():
    from posttrain.pipeline import graph

    rm, judge = graph.get("reward_model"), graph.get("judge")
    assert rm.outputs["out_dir"] != judge.outputs["out_dir"]
    assert judge.outputs["out_dir"] == graph.get("eval_rl").inputs["judge_dir"]
    assert graph.get("rl").extra_deps == (rm.outputs["out_dir"],)  # the policy reads the RM, never the judge
    assert chat.JUDGE_KIND == "mlp_head" and chat.USES_JUDGE
    assert chat.reward_model_records(list(range(6))) == [0, 2, 4] and chat.judge_records(list(range(6))) == [1, 3, 5]


# --------------------------------------------------------------------------- tiny chat runs


def chat_tiny_params(folder: Path, *overrides: str):
    """The tiny profile with data.task chat on the shipped data, PPO on an mlp_head reward model."""
    import os
    import shutil

    from posttrain.cli.command import update_params_file

    target = folder / "params.chat.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        update_params_file(target, "tiny", ["data.task=chat", f"data.chat.source={SHIPPED}", "rl.method=ppo",
                                            "reward_model.kind=mlp_head", *overrides])
    finally:
        os.chdir(cwd)
    return load_params(target)


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    from posttrain.stages import prepare

    folder = tmp_path_factory.mktemp("chat")
    params = chat_tiny_params(folder)
    prepare.run(params, folder / "prepared")
    return params, folder / "prepared"


def random_head(tiny_base: Path, out: Path) -> Path:
    """An untrained mlp_head model saved as the stage saves one (no training: the wiring tests need a file)."""
    backbone, _ = mlp_head.load_backbone(tiny_base)
    torch.manual_seed(1)
    out.mkdir(parents=True)
    mlp_head.save(mlp_head.MLPHeadRewardModel(backbone), out, tiny_base, {"max_length": 64})
    return out


def ppo_setup(params, prepared, rm_dir, **ppo):
    from posttrain.stages import rl

    p = dataclasses.replace(params, rl=dataclasses.replace(params.rl, ppo=params.rl.ppo | {
        "reward_model_path": str(rm_dir)} | ppo))
    return p, rl.build_dataset(read_jsonl(prepared / "train.jsonl"), p)


def test_ppo_wiring_frozen_reference_kl_zero_at_step_zero_and_a_value_head_on_the_frozen_base(
        chat_setup, tiny_base, tmp_path):
    """No training: the trainer as ppo.run builds it. The reference is the policy with its adapter off
    (the same logits as the SFT model, whatever the adapter holds), so at step 0 the KL is 0; the value
    model is the frozen base with a trainable copy of the reward model's head; the reward model is frozen."""
    from transformers import AutoModelForCausalLM
    from trl.experimental.ppo.ppo_trainer import forward

    from posttrain.methods import ppo

    params, prepared = chat_setup
    p, dataset = ppo_setup(params, prepared, random_head(tiny_base, tmp_path / "rm"))
    trainer, _ = ppo.build_trainer(p, tiny_base, dataset, tmp_path / "ckpt")
    policy, value = trainer.model.policy, trainer.model.value_model
    assert trainer.ref_model is None and trainer.is_peft_model  # reference = this policy, adapter disabled

    query = torch.tensor([trainer.train_dataset[0]["input_ids"] + [5, 6, 7, 8]])
    pad = trainer.processing_class.pad_token_id
    reference = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        sft_logits = reference(input_ids=query).logits
        step0 = forward(policy, query, pad).logits
        with trainer.null_ref_context():
            ref0 = forward(policy, query, pad).logits
    log_ratio = torch.log_softmax(ref0, -1) - torch.log_softmax(step0, -1)
    assert float(((log_ratio.exp() - 1) - log_ratio).abs().max()) < 1e-6  # k3 KL per token at step 0
    torch.testing.assert_close(ref0, sft_logits, atol=1e-5, rtol=1e-5)
    for name, prm in policy.named_parameters():
        if "lora_B" in name:  # what an update does to the adapter; the reference must not follow
            prm.data.normal_(std=0.5)
    with torch.no_grad():
        moved = forward(policy, query, pad).logits
        with trainer.null_ref_context():
            ref1 = forward(policy, query, pad).logits
    assert not torch.allclose(moved, sft_logits, atol=1e-3)
    torch.testing.assert_close(ref1, sft_logits, atol=1e-5, rtol=1e-5)

    trainable = {n for n, prm in trainer.model.named_parameters() if prm.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_model.head.") for n in trainable)
    assert {n for n in trainable if n.startswith("value_model.")} == {f"value_model.head.{k}" for k in (
        "0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias")}
    reward_head = trainer.reward_model.head.__self__  # RuleAugmentedReward over the mlp_head model
    assert isinstance(reward_head, mlp_head.MLPHeadRewardModel) and isinstance(value, mlp_head.MLPHeadRewardModel)
    assert not any(prm.requires_grad for prm in reward_head.parameters())
    assert torch.equal(value.head[0].weight, reward_head.head[0].weight)
    assert value.head[0].weight.data_ptr() != reward_head.head[0].weight.data_ptr()  # a copy, trained apart
    assert {k: p.rl.ppo[k] for k in ("kl_coef", "temperature")} == {"kl_coef": 0.03, "temperature": 0.7}


@pytest.fixture(scope="module")
def trained_rm(chat_setup, tiny_base, tmp_path_factory):
    from posttrain.stages import reward_model

    params, prepared = chat_setup
    out = tmp_path_factory.mktemp("chat_rm") / "reward_model"
    before = folder_hash(tiny_base)
    reward_model.run(params, prepared / "train.jsonl", prepared / "val.jsonl", out, base_dir=tiny_base,
                     preferences_path=prepared / "preferences.jsonl")
    assert folder_hash(tiny_base) == before, "training the head changed the base"
    return out


@pytest.mark.slow
def test_mlp_head_stage_trains_and_saves_only_the_head_with_a_pointer_to_its_base(chat_setup, tiny_base, trained_rm):
    from safetensors.torch import load_file

    from posttrain.stages import reward_model

    params, prepared = chat_setup
    assert sorted(p.name for p in trained_rm.iterdir()) == ["eval.json", "head.safetensors", "mlp_head.json",
                                                            "train_log.json"]
    saved = load_file(str(trained_rm / "head.safetensors"))
    assert sorted(saved) == ["0.bias", "0.weight", "3.bias", "3.weight", "6.bias", "6.weight"]  # no base weight
    pointer = json.loads((trained_rm / "mlp_head.json").read_text())
    assert pointer["base"] == str(tiny_base) and pointer["base_sha256"] == mlp_head.weights_sha256(tiny_base)
    assert pointer["role"] == "reward_model" and "reward_model part" in pointer["pairs_from"]
    evaluation = json.loads((trained_rm / "eval.json").read_text())
    prefs = read_jsonl(prepared / "preferences.jsonl")
    rm_rows = [r for r in prefs if r["part"] == "reward_model"]
    # every training pair also gave one shortcut pair (reference over the input copied, a line repeated, ...)
    assert evaluation["n_train_pairs"] == 2 * sum(r["split"] == "train" for r in rm_rows)
    assert set(evaluation["shortcut_pass_rates"]) == {"copied_input", "input_in_lines", "repeated_line", "cut_off"}
    assert isinstance(evaluation["beats_shortcuts"], bool)
    assert evaluation["n_val_pairs"] == sum(r["split"] == "val" for r in rm_rows)
    assert {"beats_chance", "chance_p_value"} <= set(evaluation) and evaluation["sampled_rejected"] == 0
    values = reward_model.metrics(trained_rm)
    assert values["val_pairwise_accuracy"] == evaluation["eval_accuracy"]
    # the reported accuracy is what the reloaded model gives on the held-out pairs
    model, tokenizer, _ = mlp_head.load(trained_rm)
    val = [r for r in rm_rows if r["split"] == "val"]
    rows = lambda side: [mlp_head.encode(tokenizer, prompt_text(r["prompt"], params.eval, tokenizer),  # noqa: E731
                                         r[side], params.reward_model.max_length) for r in val]
    chosen, rejected = (mlp_head.scores_of(model, rows(side), tokenizer.pad_token_id) for side in ("chosen", "rejected"))
    assert values["val_pairwise_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(val))
    with pytest.raises(ValueError, match="has changed since the head was trained"):
        changed = dict(pointer, base_sha256="0" * 64)
        (trained_rm.parent / "moved").mkdir()
        (trained_rm.parent / "moved" / "mlp_head.json").write_text(json.dumps(changed))
        (trained_rm.parent / "moved" / "head.safetensors").write_bytes((trained_rm / "head.safetensors").read_bytes())
        mlp_head.load(trained_rm.parent / "moved")


@pytest.mark.slow
def test_pairwise_loss_falls_on_a_separable_fixture(head_model):
    """Chosen replies ask a question, rejected ones state an answer: the head learns the split."""
    model, tokenizer = head_model
    chosen = [mlp_head.encode(tokenizer, f"Question: what is {i} + {i + 1}?\nAnswer:", f" Add the units of {i}. What is left?", 96)
              for i in range(24)]
    rejected = [mlp_head.encode(tokenizer, f"Question: what is {i} + {i + 1}?\nAnswer:", f" It is {2 * i + 1}!", 96)
                for i in range(24)]
    features_c = mlp_head.features_of(model, chosen, tokenizer.pad_token_id)
    features_r = mlp_head.features_of(model, rejected, tokenizer.pad_token_id)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    base_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    log = mlp_head.train_head(model, features_c[:16], features_r[:16], epochs=40, learning_rate=3e-3, batch_size=8,
                              weight_decay=0.0, seed=0)
    print(f"loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f}")
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert mlp_head.pairwise_accuracy(model, features_c[16:], features_r[16:])["pairwise_accuracy"] >= 0.75
    assert all(torch.equal(v, base_before[k]) for k, v in model.backbone.state_dict().items())
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    model.head.load_state_dict(head_before)  # the module fixture is shared


@pytest.mark.slow
def test_ppo_on_the_mlp_head_reward_starts_at_kl_zero_and_leaves_the_reward_model_alone(
        chat_setup, tiny_base, trained_rm, tmp_path):
    from posttrain.methods import ppo

    params, prepared = chat_setup
    p, dataset = ppo_setup(params, prepared, trained_rm, learning_rate=5e-2, temperature=1.5)
    rm_before = folder_hash(trained_rm)
    trainer, _ = ppo.build_trainer(p, tiny_base, dataset, tmp_path / "ckpt")
    value_head = {k: v.clone() for k, v in trainer.model.value_model.head.state_dict().items()}
    value_base = {k: v.clone() for k, v in trainer.model.value_model.backbone.state_dict().items()}
    trainer.train()
    log = [e for e in trainer.state.log_history if "objective/kl" in e]
    assert len(log) == 2 and log[0]["kl"] == pytest.approx(0.0, abs=1e-3)  # first rollout: policy == reference
    assert all("reward" in e and not any(k.startswith("rewards/") for k in e) for e in log)  # the RM alone
    assert folder_hash(trained_rm) == rm_before
    value = trainer.model.value_model
    assert all(torch.equal(v, value_base[k]) for k, v in value.backbone.state_dict().items())
    assert any(not torch.equal(v, value_head[k]) for k, v in value.head.state_dict().items())


@pytest.mark.slow
def test_chat_run_end_to_end_through_dvc_repro_and_the_gate(tmp_path):
    """The tiny chat pipeline (PPO on an mlp_head reward model, judged by a held-out mlp_head judge) with
    `dvc repro`, then the gate."""
    from tests.conftest import make_workspace, run_in

    ws = make_workspace(tmp_path / "ws", ["data.task=chat", f"data.chat.source={SHIPPED}",
                                          f"data.style.source={ROOT / 'data' / 'style'}", "rl.method=ppo",
                                          "reward_model.kind=mlp_head"])
    bin_dir = Path(sys.executable).parent
    done = run_in(ws, [str(bin_dir / "dvc"), "repro"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rm, judge = ws / "models" / "reward_model", ws / "models" / "judge"
    assert (rm / "head.safetensors").read_bytes() != (judge / "head.safetensors").read_bytes()
    rm_pointer, judge_pointer = (json.loads((d / "mlp_head.json").read_text()) for d in (rm, judge))
    assert (rm_pointer["role"], judge_pointer["role"]) == ("reward_model", "judge")
    assert "reward_model part" in rm_pointer["pairs_from"] and "judge part" in judge_pointer["pairs_from"]
    params = load_params(ws / "params.yaml")
    assert params.rl.ppo["reward_model_path"] == "models/reward_model"  # the policy's reward, never models/judge
    for model in ("base", "sft", "rl"):
        metrics = json.loads((ws / "reports" / "eval" / model / "metrics.json").read_text())
        assert {"accuracy_pass", "judge_margin_mean", "reply_words_mean"} <= set(metrics)
        assert "judge part of preferences.jsonl" in metrics["protocol"]["judge"]
        records = read_jsonl(ws / "reports" / "eval" / model / "records.jsonl")
        assert all(r["correct_pass"] == (r["judge_reply"] > r["judge_reference"]) for r in records)
    promotion = json.loads((ws / "reports" / "promotion.json").read_text())
    gate = run_in(ws, [str(bin_dir / "python"), "-m", "posttrain", "gate"])
    assert gate.returncode == (0 if promotion["promote"] else 1), gate.stdout + gate.stderr
    summary = run_in(ws, [str(bin_dir / "python"), "-m", "posttrain", "summary"])
    lines = {line.split(":", 1)[0]: line for line in summary.stdout.splitlines() if ":" in line}
    assert "val_pairwise_accuracy" in lines["reward model"] and "val_pairwise_accuracy" in lines["judge"]
    assert "margin" in summary.stdout and "words" in summary.stdout


@pytest.mark.slow
def test_without_a_preference_file_rejected_replies_are_seeded_base_samples(tiny_base, tmp_path):
    """data.chat.preferences "": chosen = the reference output, rejected = a base-model sample drawn with
    params.seed (recorded); the reward model and the judge learn from disjoint instructions."""
    from posttrain.stages import judge
    from posttrain.stages import prepare
    from posttrain.stages import reward_model

    params = chat_tiny_params(tmp_path, 'data.chat.preferences=""', "reward_model.n_examples=8",
                              "reward_model.mlp_head.sample_max_new_tokens=6")
    prepared = prepare.run(params, tmp_path / "prepared") | {"preferences": tmp_path / "prepared/preferences.jsonl"}
    assert prepared["preferences"].read_text() == "" and "preferences" not in json.loads(
        prepared["report"].read_text())["splits"]
    runs = {}
    for name, stage in (("rm", reward_model), ("rm_again", reward_model), ("judge", judge)):
        out = stage.run(params, prepared["train"], prepared["val"], tmp_path / name, base_dir=tiny_base,
                        preferences_path=prepared["preferences"])["model"]
        runs[name] = (json.loads((out / "eval.json").read_text()), read_jsonl(out / "sampled_pairs.jsonl"))
    evaluation, sampled = runs["rm"]
    assert evaluation["sample_seed"] == params.seed and evaluation["sampled_rejected"] == len(sampled)
    # 4 sampled pairs and one shortcut pair for each
    assert evaluation["n_train_pairs"] == 8 and evaluation["pairs_from"] == "reference outputs over base-model samples"
    assert all(s["sampled"] and s["chosen"] != s["rejected"] for s in sampled)
    assert runs["rm_again"][1] == sampled  # the same seed draws the same samples
    assert not {s["user"] for s in sampled} & {s["user"] for s in runs["judge"][1]}
    assert runs["judge"][0]["role"] == "judge"


@pytest.mark.slow
def test_the_mlp_head_reward_model_is_a_reward_function_scoring_as_it_was_trained(chat_setup, trained_rm):
    """rl.rewards `mlp_head`: the chat reward model's preference score for GRPO, REINFORCE and hybrid, the same
    number the model gives the (prompt text, reply) it was trained and evaluated on; the reward_model stage
    then counts as needed whatever the method."""
    from posttrain.evaluation.prompts import prompt_messages, reply_text
    from posttrain.reward_models.training import why_not_needed
    from posttrain.rewards import composition

    params, prepared = chat_setup
    (preference,), _ = composition.build({"mlp_head": {"weight": 1.0, "model": str(trained_rm)}})
    model, tokenizer, _ = mlp_head.load(trained_rm)
    val = [r for r in read_jsonl(prepared / "preferences.jsonl") if r["part"] == "reward_model"][:6]
    prompts = [prompt_messages(r["prompt"], params.eval) for r in val]  # what rl_prompt gives a chat-template task
    for side in ("chosen", "rejected"):
        rows = [mlp_head.encode(tokenizer, prompt_text(r["prompt"], params.eval, tokenizer),
                                reply_text(r[side], params.eval), 256) for r in val]
        expected = mlp_head.scores_of(model, rows, tokenizer.pad_token_id)
        assert preference(prompts=prompts, completions=[" " + r[side] + "\n" for r in val]) == pytest.approx(expected)
    with_it = dataclasses.replace(params, rl=dataclasses.replace(params.rl, method="grpo", rewards={"mlp_head": 1.0}))
    assert why_not_needed(with_it) is None
