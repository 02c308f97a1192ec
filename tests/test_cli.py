import shutil

import pytest

from conftest import ROOT
from posttrain.cli.command import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0]
    subcommands = subparsers.choices
    assert {"run", "stage", "eval", "gate", "summary", "ui", "serve", "deploy", "dvc-yaml"} <= set(subcommands)
    # The one-line help each subcommand shows in `posttrain --help` is the `help=` given to add_parser.
    helps = {action.dest: (action.help or "").strip() for action in subparsers._choices_actions}
    for name in subcommands:  # add_parser without help= leaves no entry at all
        assert len(helps.get(name, "").split()) >= 3, f"subcommand {name!r} has no real help text: {helps.get(name)!r}"
    listing = parser.format_help()
    for name, text in helps.items():
        assert text.split()[0] in listing, name
    for owner, actions in [("posttrain", parser._actions)] + [(name, sub._actions) for name, sub in subcommands.items()]:
        for action in actions:
            if action.dest in ("help", "command"):
                continue
            assert action.help and len(action.help.split()) >= 2, f"{owner} {action.option_strings or action.dest} has no help text"
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


def test_a_stopped_run_says_what_stopped_which_runs_are_killed_and_how_to_resume(monkeypatch):
    import signal

    from posttrain.cli.command import stop_report
    from posttrain.pipeline import lifecycle

    monkeypatch.setattr(lifecycle, "progress", lambda: {"run_id": "0123abcd", "stage": "sft"})
    lines = stop_report("run", lifecycle.Stopped(signal.SIGINT)).splitlines()
    assert lines[:2] == ["posttrain run: stopped by SIGINT during stage 'sft'",
                         "marked KILLED: MLflow run 0123abcd (the pipeline) and its 'sft' stage run"]
    assert len(lines) == 3 and lines[2].startswith("resume with `posttrain run`")
    monkeypatch.setattr(lifecycle, "progress", lambda: {"run_id": None, "stage": None})  # before the MLflow run
    assert stop_report("run", lifecycle.Stopped(signal.SIGTERM)).splitlines()[:2] == [
        "posttrain run: stopped by SIGTERM", "no MLflow run was running"]


def test_a_configured_prefect_api_is_used_as_is(monkeypatch):
    """posttrain run starts its own Prefect server only where Prefect would otherwise start its temporary one."""
    from posttrain.pipeline import prefect_api

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(prefect_api, "start_local_server", lambda *a, **k: pytest.fail("started a server"))
    assert prefect_api.ensure_api(ROOT / ".prefect") is None
