"""Security: weights only from safetensors, no unpickling of files, servers bound to 127.0.0.1 by default.

    .venv/bin/python -m pytest tests/test_security.py -q
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from servers import background, free_port, project_env, wait_until

SOURCES = [p for folder in ("posttrain", "bench") for p in sorted((ROOT / folder).rglob("*.py"))]
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("joblib", "load"), ("dill", "load"),
              ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("torch", "load"),
              ("numpy", "load"), ("np", "load")}


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            keywords = {k.arg: k.value for k in node.keywords}
            yield node, name, node.func.attr, keywords


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_pickle_loading_in_project_code():
    """torch.load only with weights_only=True, numpy.load only with allow_pickle=False, no pickle/joblib/dill at all."""
    assert len(SOURCES) > 20
    offenders = []
    for path in SOURCES:
        for node, owner, attr, keywords in _calls(path):
            if (owner, attr) not in UNPICKLERS:
                continue
            safe = (owner == "torch" and _is_true(keywords.get("weights_only"))) or (
                owner in ("numpy", "np") and isinstance(keywords.get("allow_pickle"), ast.Constant)
                and keywords["allow_pickle"].value is False)
            if not safe:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.{attr}")
    assert not offenders, "unpickling loads: " + ", ".join(offenders)


def test_every_model_load_insists_on_safetensors():
    """Each AutoModel*/..ForCausalLM.from_pretrained passes use_safetensors=True (or reads a GGUF file)."""
    checked, offenders = 0, []
    for path in SOURCES:
        for node, owner, attr, keywords in _calls(path):
            if attr != "from_pretrained" or not (owner.startswith("AutoModel") or owner.endswith(("ForCausalLM", "ForSequenceClassification"))):
                continue
            checked += 1
            if not (_is_true(keywords.get("use_safetensors")) or "gguf_file" in keywords):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.from_pretrained")
    assert checked >= 6 and not offenders, "model loads that accept pickled weights: " + ", ".join(offenders)


def test_a_pickled_checkpoint_is_refused_in_one_line(tiny_base, tmp_path, capsys, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.cli.command import main

    monkeypatch.chdir(ROOT)  # `posttrain eval` reads params.yaml from here
    pickled = tmp_path / "pickled_model"
    shutil.copytree(tiny_base, pickled)
    state = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    AutoModelForCausalLM.from_pretrained(pickled)  # transformers alone would unpickle it: the guard is ours

    assert main(["eval", str(pickled), "--questions", str(tmp_path / "unused.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {pickled}: no *.safetensors weights")
    assert "pytorch_model.bin" in err
    with pytest.raises(OSError):  # the loaders themselves refuse it too
        AutoModelForCausalLM.from_pretrained(pickled, use_safetensors=True)


def test_stage_outputs_hold_no_pickled_weights(tiny_base):
    from posttrain.io import PICKLE_SUFFIXES

    assert list(tiny_base.glob("*.safetensors"))
    assert not [p for p in tiny_base.rglob("*") if p.suffix in PICKLE_SUFFIXES]


@pytest.mark.slow
def test_ui_server_binds_only_to_loopback_by_default(tmp_path):
    """`posttrain ui` with no --host: every listening socket of the server is on 127.0.0.1."""
    import psutil

    port = free_port()
    log = tmp_path / "ui.log"
    with background([sys.executable, "-m", "posttrain", "ui", "--port", str(port)], log, env=project_env(),
                    cwd=tmp_path) as proc:
        def listening():
            tree = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
            return [c for c in psutil.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid in tree]

        sockets = wait_until(listening, 180, "posttrain ui listening", proc, log)
        assert {c.laddr.ip for c in sockets} == {"127.0.0.1"}, sockets


def test_default_bind_addresses_are_loopback():
    from prefect.settings import Settings

    from posttrain.cli.command import build_parser

    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    # `prefect server start` with no --host (the README's command) binds here
    assert Settings().server.api.host == "127.0.0.1"
