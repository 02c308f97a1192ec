"""Bad input through the CLI (`python -m posttrain stage ...` in a tiny workspace): one line naming what and where,
a non-zero exit, nothing written and the previous outputs intact.

    .venv/bin/python -m pytest tests/test_bad_input.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_workspace

pytestmark = pytest.mark.slow  # one CLI process per case, ~10 s each

GOOD = [json.dumps({"question": f"How much is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) for i in range(4)]
TEST = [json.dumps({"question": f"What is {i} times 2?", "answer": f"#### {2 * i}"}) for i in range(3)]
GUARDED = ("data/prepared", "models/base", "reports/prepare.json", "reports/base.json")


def posttrain(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_HOME=str(ws / ".prefect"), TQDM_DISABLE="1", MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run([sys.executable, "-m", "posttrain", "-q", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=600)


def snapshot(ws: Path) -> dict[str, str]:
    files = []
    for item in GUARDED:
        path = ws / item
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(ws: Path) -> list[str]:
    return [str(p) for folder in ("data", "models", "reports") for p in (ws / folder).rglob(".*.tmp-*")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny workspace whose prepare and base stages have run once with good input."""
    ws = make_workspace(tmp_path_factory.mktemp("bad_input") / "ws")
    for stage in ("prepare", "base"):
        done = posttrain(ws, "stage", stage)
        assert done.returncode == 0, done.stderr[-3000:]
    params = (ws / "params.yaml").read_text()
    before = snapshot(ws)
    assert "data/prepared/train.jsonl" in before and "models/base/model.safetensors" in before
    yield ws, params, before


def with_source(ws: Path, tmp_path: Path, train_lines: list[str] | bytes) -> None:
    """Point data.source at a folder whose train.jsonl holds `train_lines` (or these exact bytes)."""
    from posttrain.cli.command import update_params_file

    source = tmp_path / "source"
    source.mkdir()
    if isinstance(train_lines, bytes):
        (source / "train.jsonl").write_bytes(train_lines)
    else:
        (source / "train.jsonl").write_text("".join(line + "\n" for line in train_lines))
    (source / "test.jsonl").write_text("".join(line + "\n" for line in TEST))
    update_params_file(ws / "params.yaml", None, [f"data.gsm8k.source={source}", "data.max_train=0", "data.max_test=0"])


def edit_params(ws: Path, section: str, key: str, value: str) -> int:
    """Set `key: value` in a params.yaml section (replacing the key or adding it first); return its line number."""
    lines = (ws / "params.yaml").read_text().splitlines()
    start = next(i for i, text in enumerate(lines) if text.startswith(f"{section}:")) + 1
    end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    at = next((i for i in range(start, end) if lines[i].startswith(f"  {key}:")), None)
    if at is None:
        at = start
        lines.insert(at, "")
    lines[at] = f"  {key}: {value}"
    (ws / "params.yaml").write_text("\n".join(lines) + "\n")
    return at + 1


CASES = {
    "malformed JSONL": ("prepare", [GOOD[0], '{"question": "How much?", "answer": ', *GOOD[1:]],
                        r"source/train\.jsonl:2: malformed JSON"),
    "missing field": ("prepare", [GOOD[0], json.dumps({"question": "How much?"}), *GOOD[1:]],
                      r"source/train\.jsonl:2: missing field 'answer'"),
    "wrong type": ("prepare", [*GOOD[:2], json.dumps({"question": 7, "answer": "#### 7"}), *GOOD[2:]],
                   r"source/train\.jsonl:3: field 'question' must be str, got int"),
    "empty file": ("prepare", [], r"source/train\.jsonl: file is empty"),
    "answer without #### n": ("prepare", [*GOOD[:3], json.dumps({"question": "How many?", "answer": "It is 5."}), GOOD[3]],
                              r"source/train\.jsonl:4: failed expect_column_values_to_match_regex on 'answer' "
                              r"\(1 records, lines \[4\]\)$"),
    "line numbers count blank lines": ("prepare", [GOOD[0], "", GOOD[1], json.dumps({"question": " ", "answer": "#### 1"})],
                                       r"source/train\.jsonl:4: failed expect_column_values_to_match_regex on 'question' "
                                       r"\(1 records, lines \[4\]\)$"),
    "invalid UTF-8": ("prepare", (GOOD[0] + "\n").encode() + b'{"question": "How much is caf\xe9?", "answer": "#### 1"}\n'
                      + "".join(line + "\n" for line in GOOD[1:]).encode(),
                      r"source/train\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 30\)$"),
    "a 50 MB line": ("prepare", None, r"source/train\.jsonl:2: line longer than 1,048,576 bytes"),
    "not a JSON object": ("prepare", [GOOD[0], "[1, 2]", *GOOD[1:]], r"source/train\.jsonl:2: expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_file(workspace, tmp_path, case):
    ws, params, before = workspace
    stage, lines, message = CASES[case]
    if lines is None:  # the 50 MB line: one record whose question is 50 MB long, written here
        lines = (GOOD[0] + "\n").encode() + b'{"question": "' + b"7" * (50 << 20) + b'", "answer": "#### 7"}\n'
    try:
        with_source(ws, tmp_path, lines)
        done = posttrain(ws, "stage", stage)
    finally:
        (ws / "params.yaml").write_text(params)
    assert_refused(done, message)
    assert snapshot(ws) == before and not leftovers(ws)


def test_missing_model_path(workspace):
    ws, params, before = workspace
    try:
        (ws / "params.yaml").write_text(params.replace("source: tiny", "source: ./no/such/model", 1))
        done = posttrain(ws, "stage", "base")
    finally:
        (ws / "params.yaml").write_text(params)
    assert_refused(done, r"base\.source: model folder '\./no/such/model' not found")
    assert snapshot(ws) == before and not leftovers(ws)


@pytest.mark.parametrize("key,value,message", [
    ("bogus_knob", "3", r"params\.yaml:{line}: unknown key 'eval\.bogus_knob'"),
    ("n_questions", "many", r"params\.yaml:{line}: 'eval\.n_questions' must be int, got str"),
    ("max_new_tokens", "[1, 2]", r"params\.yaml:{line}: 'eval\.max_new_tokens' must be int, got list"),
])
def test_bad_params_file(workspace, key, value, message):
    ws, params, before = workspace
    try:
        number = edit_params(ws, "eval", key, value)
        done = posttrain(ws, "stage", "prepare")
    finally:
        (ws / "params.yaml").write_text(params)
    assert_refused(done, message.format(line=number))
    assert snapshot(ws) == before and not leftovers(ws)


def assert_refused(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1], done.stderr[-3000:]
    assert re.search(message, errors[0]), errors[0]
    assert "np." not in errors[0] and "numpy" not in errors[0], errors[0]  # plain numbers, not np.int64(8)


# --------------------------------------------------------------------------- read_jsonl, in process


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    from posttrain.io import read_jsonl

    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_text("".join(line + "\n" for line in GOOD))
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # as Notepad writes "UTF-8 with BOM"
    records = read_jsonl(marked, required={"question": str, "answer": str})
    assert records == read_jsonl(plain) and list(records[0]) == ["question", "answer"]
    assert records.line_numbers == [1, 2, 3, 4]


def test_a_byte_order_mark_inside_the_file_is_malformed_json(tmp_path):
    from posttrain.io import DataError, read_jsonl

    path = tmp_path / "joined.jsonl"  # two files concatenated: the second one's BOM lands on line 3
    path.write_bytes(("\n".join(GOOD[:2]) + "\n").encode() + b"\xef\xbb\xbf" + (GOOD[2] + "\n").encode())
    with pytest.raises(DataError, match=r"joined\.jsonl:3: malformed JSON \(Unexpected UTF-8 BOM"):
        read_jsonl(path)


def test_the_line_limit_is_exact_and_a_long_line_is_never_read_whole(tmp_path):
    import tracemalloc

    from posttrain.io import DataError, read_jsonl

    record = json.dumps({"question": "q", "answer": "#### 1"})
    path = tmp_path / "edge.jsonl"
    path.write_text(record + "\n" + record + "\n")
    assert len(read_jsonl(path, max_line_bytes=len(record))) == 2  # exactly at the limit: accepted
    with pytest.raises(DataError, match=r"edge\.jsonl:1: line longer than"):
        read_jsonl(path, max_line_bytes=len(record) - 1)
    path.write_text(record + "\n" + record)  # no final newline
    assert len(read_jsonl(path, max_line_bytes=len(record))) == 2

    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as handle:
        handle.write((record + "\n").encode() + b'{"question": "')
        for _ in range(50):
            handle.write(b"x" * (1 << 20))
        handle.write(b'", "answer": "#### 1"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"huge\.jsonl:2: line longer than 1,048,576 bytes"):
            read_jsonl(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"read_jsonl held {peak / 2**20:.0f} MiB for a 50 MiB line"


def test_records_remember_their_lines_through_a_slice(tmp_path):
    from posttrain.io import read_jsonl, where

    path = tmp_path / "gaps.jsonl"
    path.write_text(GOOD[0] + "\n\n" + GOOD[1] + "\n   \n" + GOOD[2] + "\n")
    records = read_jsonl(path)
    assert records.line_numbers == [1, 3, 5]
    assert where(records[1:], 1) == f"{path}:5" and where(list(records), 1) == "record 2"


# --------------------------------------------------------------------------- eval on malformed questions


EVAL_CASES = {
    "missing question": (json.dumps({"answer": "#### 3"}), r"questions\.jsonl:{line}: missing field 'question'$"),
    "answer not a string": (json.dumps({"question": "What is 1 + 2?", "answer": 3}),
                            r"questions\.jsonl:{line}: field 'answer' must be str, got int$"),
    "answer without #### n": (json.dumps({"question": "What is 1 + 2?", "answer": "three"}),
                              r"questions\.jsonl:{line}: field 'answer' has no final '#### <number>' line"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_command_refuses_malformed_questions(workspace, tmp_path, case):
    ws, params, before = workspace
    bad, message = EVAL_CASES[case]
    questions, records = tmp_path / "questions.jsonl", tmp_path / "records.jsonl"
    questions.write_text(TEST[0] + "\n\n" + bad + "\n" + TEST[1] + "\n")  # the blank line 2 counts: bad is on line 3
    done = posttrain(ws, "eval", "models/base", "--questions", str(questions), "--records", str(records),
                     "-S", "eval.max_new_tokens=2")
    assert_refused(done, message.format(line=3))
    assert not records.exists() and snapshot(ws) == before and not leftovers(ws)


def test_eval_stage_refuses_a_malformed_test_file(workspace):
    ws, params, before = workspace
    test_file = ws / "data/prepared/test.jsonl"
    good = test_file.read_bytes()
    lines = good.decode().splitlines()
    try:
        test_file.write_text("\n".join([lines[0], json.dumps({"question": ["not", "text"], "answer": "#### 1"}),
                                        *lines[1:]]) + "\n")
        done = posttrain(ws, "stage", "eval_base")
    finally:
        test_file.write_bytes(good)
    assert_refused(done, r"data/prepared/test\.jsonl:2: field 'question' must be str, got list$")
    assert not (ws / "reports/eval/base").exists() and not (ws / "reports/eval_base.json").exists()
    assert snapshot(ws) == before and not leftovers(ws)


# --------------------------------------------------------------------------- merge with an adapter of another base


def foreign_adapter(folder: Path, base_folder: Path, **tiny) -> Path:
    """A LoRA adapter (B nonzero, as after training) made for a tiny base built with other `base.tiny` sizes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.training.base_models import build_tiny_model

    model, tokenizer = build_tiny_model(tiny, seed=0)
    model.save_pretrained(base_folder, safe_serialization=True)
    tokenizer.save_pretrained(base_folder)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder),
                             LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, tensor in adapted.named_parameters():
            if "lora_B" in name:
                tensor.normal_()
    adapted.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_merge_stage_refuses_an_adapter_trained_on_another_base(workspace, tmp_path):
    ws, params, before = workspace
    other = tmp_path / "narrow_base"
    adapter = foreign_adapter(ws / "models/sft_adapter", other, hidden_size=32, intermediate_size=64)
    try:
        done = posttrain(ws, "stage", "merge")
    finally:
        import shutil

        shutil.rmtree(adapter)
    # PEFT alone: "Error(s) in loading state_dict for PeftModel: size mismatch for ..." and a traceback
    assert_refused(done, rf"models/sft_adapter: adapter trained on base '{re.escape(str(other))}' does not fit "
                         r"base 'models/base': '.*lora_A\.weight' is \[4, \d+\], which does not fit the base's")
    assert not (ws / "models/sft").exists() and snapshot(ws) == before and not leftovers(ws)


def test_merge_refuses_an_adapter_with_layers_the_base_does_not_have(workspace, tmp_path):
    from posttrain.io import DataError
    from posttrain.stages import merge

    ws, params, before = workspace
    adapter = foreign_adapter(tmp_path / "adapter", tmp_path / "deeper_base", num_hidden_layers=3)
    # PEFT alone merges this silently, dropping the third layer's update.
    with pytest.raises(DataError, match=rf"^{re.escape(str(adapter))}: adapter trained on base "
                                        rf"'{re.escape(str(tmp_path / 'deeper_base'))}' does not fit base "
                                        rf"'{re.escape(str(ws / 'models/base'))}': it adapts 'model\.layers\.2\."):
        merge.merge_adapter(ws / "models/base", adapter)
    assert merge.merge_adapter(tmp_path / "deeper_base", adapter) is not None  # its own base: fine
