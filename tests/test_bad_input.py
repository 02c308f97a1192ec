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


def with_source(ws: Path, tmp_path: Path, train_lines: list[str]) -> None:
    from posttrain.cli import update_params_file

    source = tmp_path / "source"
    source.mkdir()
    (source / "train.jsonl").write_text("".join(line + "\n" for line in train_lines))
    (source / "test.jsonl").write_text("".join(line + "\n" for line in TEST))
    update_params_file(ws / "params.yaml", None, [f"data.source={source}", "data.max_train=0", "data.max_test=0"])


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
                              r"source/train\.jsonl:4: failed expect_column_values_to_match_regex on 'answer'"),
    "not a JSON object": ("prepare", [GOOD[0], "[1, 2]", *GOOD[1:]], r"source/train\.jsonl:2: expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_file(workspace, tmp_path, case):
    ws, params, before = workspace
    stage, lines, message = CASES[case]
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
