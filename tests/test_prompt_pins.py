"""Prompts and protocol hashes pinned byte for byte: every recorded result was produced and hashed under these,
so a rename or refactor that changes one would silently split results that should compare (the gate refuses
two protocols). The expected strings were produced by the code before the 'seed' values were renamed; the old
name must still give them (with a warning) and the new one without."""

from __future__ import annotations

import pytest

from posttrain.config.loader import line_index, load_params
from posttrain.evaluation.evaluator import summarize
from posttrain.evaluation.prompts import digest, prompt_text, protocol, rl_prompt, sft_example
from posttrain.tasks import chat, gsm8k, style
from posttrain.training.base_models import build_tiny_tokenizer
from tests.conftest import ROOT

GSM8K_RECORD = {"question": "Tom has 3 apples and buys 4 more. How many?",
                "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}
STYLE_RECORD = {"normal": "I left my umbrella on the train again, that's the third one this year.",
                "poem": "Another umbrella rides the rails today,\nThe third this year I've let the train convey."}
CHAT_RECORD = {"input": "whats 2+2", "output": "Count on from 2. What do you reach?"}

GSM8K_SYSTEM = "Solve the math problem step by step. End with a line '#### <number>'."
STYLE_SYSTEM = ("You are a poet. Whatever the user writes, answer with a short rhyming poem of two to four lines "
                "that says the same thing.")
CHAT_SYSTEM = ("You are a strict tutor. Never give the final answer. Reply in at most two sentences: name the concept "
               "or first step the student should use, then end with a question that makes them do the next step "
               "themselves. No exclamation marks.")
STRICTBOT_CHAT_PROMPT = "<|user|> whats 2+2 <|end|>\n<|assistant|>"
STRICTBOT_GSM8K_PROMPT = (f"<|system|> {GSM8K_SYSTEM} <|end|>\n<|user|> {GSM8K_RECORD['question']} <|end|>\n"
                          "<|assistant|>")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()  # ChatML template: what the chat-style prompts go through


def line_of(*path: str) -> int:
    """The line of a key in the shipped params.yaml: where a warning about its value points."""
    return line_index((ROOT / "params.yaml").read_text())[path]


def chatml(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def test_gsm8k_protocol_hash_as_the_evaluator_records_it():
    params = load_params(ROOT / "params.yaml")
    item = {"correct_strict": True, "correct_flexible": True, "n_tokens": 3, "stopped_early": True}
    metrics = summarize([item], 1.0, params.eval, [GSM8K_RECORD["question"]], gsm8k.METRICS, gsm8k.protocol(params))
    assert metrics["protocol_hash"] == "41548d399092d228"
    assert metrics["protocol"]["prompt_style"] == "chat"


@pytest.mark.parametrize("task, overrides, record, system, expected_hash", [
    # style and chat hashes moved once on purpose: their judges now train on shortcut negatives (issue 29)
    (style, ["data.task=style"], STYLE_RECORD, STYLE_SYSTEM, "72808f1028e4d8f8"),
    (chat, ["data.task=chat"], CHAT_RECORD, CHAT_SYSTEM, "3f2287e9bd69d828"),
])
def test_style_and_chat_prompts_under_the_chat_template(tokenizer, task, overrides, record, system, expected_hash):
    params = load_params(ROOT / "params.yaml", overrides=overrides)
    user, reference = task.prompt_and_reference(record)
    assert prompt_text(user, params.eval, tokenizer) == chatml(system, user)
    assert sft_example(record, params.eval, task) == {
        "prompt": messages(system, user), "completion": [{"role": "assistant", "content": reference}]}
    assert rl_prompt(record, params.eval, task)["prompt"] == messages(system, user)
    assert digest(protocol(params.eval, task.protocol(params))) == expected_hash


def deprecation_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]


@pytest.mark.parametrize("name", ["strictbot", "seed"])
def test_chat_prompts_in_the_strictbot_format(tokenizer, capsys, name):
    params = load_params(ROOT / "params.yaml", overrides=["data.task=chat", f"data.chat.prompt_format={name}"])
    warned = deprecation_lines(capsys)
    if name == "seed":
        assert len(warned) == 1 and "'data.chat.prompt_format: seed' is deprecated, use 'strictbot'" in warned[0]
    else:
        assert warned == []
    assert (params.data.chat.prompt_format, params.eval.prompt_style) == ("strictbot", "strictbot")
    assert prompt_text(CHAT_RECORD["input"], params.eval, tokenizer) == STRICTBOT_CHAT_PROMPT
    assert sft_example(CHAT_RECORD, params.eval, chat) == {"prompt": STRICTBOT_CHAT_PROMPT,
                                                           "completion": " Count on from 2. What do you reach?"}
    assert rl_prompt(CHAT_RECORD, params.eval, chat)["prompt"] == STRICTBOT_CHAT_PROMPT
    recorded = protocol(params.eval, chat.protocol(params))
    assert (recorded["prompt_style"], recorded["prompt_format"]) == ("seed", "seed")  # as recorded before the rename
    assert digest(recorded) == "64b7b6fb0c2e6645"  # moved with the shortcut negatives, the same for both names


@pytest.mark.parametrize("name", ["strictbot", "seed"])
def test_gsm8k_prompts_in_the_strictbot_style(tokenizer, capsys, name):
    params = load_params(ROOT / "params.yaml", overrides=[f"eval.prompt_style={name}"])
    warned = deprecation_lines(capsys)
    if name == "seed":
        assert warned == [f"warning: {ROOT / 'params.yaml'}:{line_of('eval', 'prompt_style')}: 'eval.prompt_style: seed' is deprecated, "
                          "use 'strictbot' (the same setting; the old name will be refused in the next release)"]
    else:
        assert warned == []
    assert params.eval.prompt_style == "strictbot"
    assert prompt_text(GSM8K_RECORD["question"], params.eval, tokenizer) == STRICTBOT_GSM8K_PROMPT
    assert sft_example(GSM8K_RECORD, params.eval) == {"prompt": STRICTBOT_GSM8K_PROMPT,
                                                      "completion": " He has 3 + 4 = 7 apples.\n#### 7"}
    assert rl_prompt(GSM8K_RECORD, params.eval)["prompt"] == STRICTBOT_GSM8K_PROMPT
    assert digest(protocol(params.eval)) == "e0b9ff3fe6a7ff9c"
