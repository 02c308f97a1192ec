import shutil

import pytest

from conftest import ROOT
from posttrain.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert {"run", "stage", "eval", "gate", "summary", "ui", "serve", "dvc-yaml"} <= set(subcommands)
    for name, sub in subcommands.items():
        assert sub.description or sub.format_help()
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.dest} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0 and "--profile" in capsys.readouterr().out


@pytest.fixture
def project_copy(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv,message", [
    (["run", "-S", "sft.training.bogus=1"], "params.yaml:"),
    (["run", "-S", "eval.n_questions=many"], "'eval.n_questions' must be int"),
    (["run", "--profile", "nope"], "no such profile"),
])
def test_bad_params_fail_in_one_line_and_change_nothing(project_copy, capsys, argv, message):
    before = (project_copy / "params.yaml").read_text()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert (project_copy / "params.yaml").read_text() == before


def test_eval_of_a_missing_model_folder_is_one_line(project_copy, capsys):
    assert main(["eval", "no/such/model"]) == 2
    assert "no/such/model" in capsys.readouterr().err


def test_eval_command_on_a_tiny_model(project_copy, tiny_base, prepared, capsys):
    import json

    records = project_copy / "records.jsonl"
    assert main(["-q", "eval", str(tiny_base), "--questions", str(prepared / "test.jsonl"), "--records", str(records),
                 "-S", "eval.n_questions=3", "-S", "eval.max_new_tokens=4", "-S", "eval.prompt_style=plain"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_questions"] == 3 and metrics["protocol"]["prompt_style"] == "plain"
    assert len(records.read_text().splitlines()) == 3
