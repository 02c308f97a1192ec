from pathlib import Path

import pytest

from conftest import ROOT
from posttrain.config.loader import apply_overrides, load_params, parse_override
from posttrain.config.schema import ConfigError


@pytest.mark.parametrize("profile", [None, "tiny", "full"])
def test_params_and_profiles_build_every_library_config(profile, tmp_path):
    """A renamed or mistyped field fails here, not in a night run."""
    import yaml
    from peft import LoraConfig
    from transformers import TrainingArguments
    from trl import GRPOConfig, SFTConfig

    from posttrain.cli.command import update_params_file
    from posttrain.training.trainer import trainer_kwargs

    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    if profile:
        import os
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            update_params_file(target, profile, [])
        finally:
            os.chdir(cwd)
    params = load_params(target)
    SFTConfig(**trainer_kwargs(params.sft.training, tmp_path / "sft", params.seed))
    GRPOConfig(**trainer_kwargs(params.rl.training, tmp_path / "rl", params.seed))
    TrainingArguments(**trainer_kwargs(params.reward_model.training, tmp_path / "rm", params.seed))
    LoraConfig(task_type="CAUSAL_LM", **params.sft.lora)
    LoraConfig(task_type="CAUSAL_LM", **params.rl.lora)
    assert yaml.safe_load(target.read_text())["seed"] == params.seed


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "seed: 1\nsft:\n  max_examples: 4\n  traning: {}\n")
    with pytest.raises(ConfigError, match=r"params.yaml:4: unknown key 'sft.traning' \(did you mean 'training'\?\)"):
        load_params(path)


def test_unknown_library_field_names_its_line(tmp_path):
    path = write(tmp_path, "sft:\n  training:\n    max_steps: 2\n    learnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"params.yaml:4: unknown key 'sft.training.learnin_rate' \(did you mean 'learning_rate'\?\)"):
        load_params(path)


def test_shipped_library_fields_are_the_installed_libraries_fields():
    """posttrain/library_fields.json stands in for importing transformers, trl and peft in every stage: it
    must hold exactly what the installed (locked) versions give. If this fails after `make lock`, run
    `make library-fields`."""
    import json

    from posttrain.config import library_fields as config

    shipped = json.loads(config.LIBRARY_FIELDS_FILE.read_text())
    assert shipped["versions"] == config.installed_versions(), "stale: run make library-fields"
    live = config.library_fields_from_the_libraries()
    assert {tuple(k.split(".")): set(v) for k, v in shipped["fields"].items()} == live
    assert config.library_fields() == live


def test_library_fields_of_other_versions_are_read_from_the_libraries(tmp_path, monkeypatch):
    """A shipped file recorded for other library versions (or a broken one) is not trusted: a field the
    installed libraries have is accepted and a typo still refused, with the libraries themselves asked."""
    import json

    from posttrain.config import library_fields as config

    stale = tmp_path / "library_fields.json"
    stale.write_text(json.dumps({"versions": {"transformers": "0.0.1", "trl": "0", "peft": "0"},
                                 "fields": {"sft.training": ["only_this"]}}))
    monkeypatch.setattr(config, "LIBRARY_FIELDS_FILE", stale)
    assert "learning_rate" in config.library_fields()[("sft", "training")]
    stale.write_text("{not json")
    assert "learning_rate" in config.library_fields()[("sft", "training")]
    path = write(tmp_path, "sft:\n  training:\n    max_steps: 2\n    learnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"params.yaml:4: unknown key 'sft.training.learnin_rate'"):
        load_params(path)


def test_wrong_type_is_reported(tmp_path):
    path = write(tmp_path, "eval:\n  n_questions: many\n")
    with pytest.raises(ConfigError, match=r"params.yaml:2: 'eval.n_questions' must be int, got str"):
        load_params(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="params.yaml:2: not valid YAML"):
        load_params(write(tmp_path, "seed: 1\n  bad: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides():
    assert parse_override("sft.training.learning_rate=1e-4") == (["sft", "training", "learning_rate"], 1e-4)
    assert parse_override("rl.method=grpo") == (["rl", "method"], "grpo")
    raw = apply_overrides({"eval": {"n_questions": 5}}, ["eval.n_questions=7", "seed=3"])
    assert raw == {"eval": {"n_questions": 7}, "seed": 3}
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")


def test_cli_update_refuses_invalid_values_and_keeps_file(tmp_path, monkeypatch):
    from posttrain.cli.command import update_params_file

    monkeypatch.chdir(ROOT)
    target = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    target.write_text(original)
    with pytest.raises(ConfigError, match="eval.n_questions"):
        update_params_file(target, None, ["eval.n_questions=lots"])
    assert target.read_text() == original
    update_params_file(target, None, ["eval.n_questions=9"])
    text = target.read_text()
    assert "n_questions: 9" in text and "# Every knob" in text  # comments survive


@pytest.mark.parametrize("override,old,new", [
    ("sft.training.max_steps=17", "    max_steps: task          # task:", "    max_steps: 17            # task:"),
    # a quoted value stays quoted in its own style; the comment after it keeps its column
    ("rl.optimizer.name=adam_8bit", '    name: ""               # bitsandbytes.optim',
     '    name: "adam_8bit"      # bitsandbytes.optim'),
])
def test_an_override_changes_only_its_own_line(tmp_path, monkeypatch, override, old, new):
    """`posttrain run -S key=value` rewrites one line of params.yaml: long strings are not re-wrapped, quotes
    not changed, comments kept."""
    import difflib

    from posttrain.pipeline.preflight import update_params_file

    monkeypatch.chdir(ROOT)
    target = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    target.write_text(original)
    update_params_file(target, None, [override])
    changed = [line for line in difflib.unified_diff(original.splitlines(), target.read_text().splitlines(), n=0,
                                                     lineterm="") if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) == 2, "\n".join(changed)
    assert changed[0].startswith("-" + old) and changed[1].startswith("+" + new), changed
    assert changed[0].split("#")[1:] == changed[1].split("#")[1:]


@pytest.mark.parametrize("override,message", [
    ("promote.min_effect=-0.5", r"params.yaml:\d+: 'promote.min_effect' must be >= 0, got -0.5"),
    ("promote.threshold=1.5", r"'promote.threshold' must be >= 0 and <= 1"),
    ("promote.confidence=0.4", r"'promote.confidence' must be > 0.5 and < 1"),
    ("promote.confidence=1", r"'promote.confidence' must be > 0.5 and < 1"),
    ("sft.training.learning_rate=abc", r"params.yaml:\d+: 'sft.training.learning_rate' must be float, got str"),
    ("sft.training.learning_rate=nan", r"'sft.training.learning_rate' must be a finite number, got nan"),
    ("rl.training.temperature=.inf", r"'rl.training.temperature' must be a finite number, got inf"),
    ("sft.lora.r=0", r"'sft.lora.r' must be >= 1, got 0"),
    ("rl.method=dpo", r"'rl.method' must be one of draft, grpo, hybrid, ppo, reinforce, got 'dpo'"),
    ("reward_model.kind=mlp", r"'reward_model.kind' must be one of"),
    ("eval.batch_size=0", r"'eval.batch_size' must be >= 1, got 0"),
    ("sft.training.per_device_train_batch_size=0", r"'sft.training.per_device_train_batch_size' must be >= 1"),
    ("data.val_fraction=1.5", r"'data.val_fraction' must be > 0 and < 1, got 1.5"),
    ("eval.n_questions=-1", r"'eval.n_questions' must be >= 0, got -1"),
    ("sft.training.optim=adamw_fast", r"'sft.training' refused by SFTConfig: adamw_fast is not a valid OptimizerNames"),
    ("rl.rewards.accuracy=1", r"unknown reward 'rl.rewards.accuracy'; known: "),
    ("sft.training.learnin_rate=1", r"params.yaml:\d+: unknown key 'sft.training.learnin_rate' \(did you mean"),
    ("base.source=/nonexistent", r"params.yaml:\d+: 'base.source' names a local folder that does not exist: "
                                 r"'/nonexistent'"),
    ("base.source=../no/such/model", r"params.yaml:\d+: 'base.source' names a local folder that does not exist"),
])
def test_bad_values_are_refused_up_front_naming_params_yaml_and_line(tmp_path, monkeypatch, override, message):
    """What `posttrain run -S ...` checks before it writes params.yaml or starts anything."""
    import re
    import shutil

    from posttrain.pipeline.preflight import update_params_file

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        update_params_file(Path("params.yaml"), None, [override])
    text = str(err.value)
    assert re.search(message, text), text
    assert text.startswith("params.yaml:") and ".tmp-" not in text and "\n" not in text and "np." not in text
    assert (tmp_path / "params.yaml").read_text() == before


def test_base_source_is_checked_up_front_when_it_names_a_local_folder(tmp_path, monkeypatch):
    """A missing local model folder is refused before anything runs, at base.source's line; a hub id (org/name)
    or a built-in name is not a path and is left to the base stage."""
    import shutil

    from posttrain.pipeline.preflight import update_params_file, validate_workspace

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    line = next(i for i, text in enumerate((tmp_path / "params.yaml").read_text().splitlines(), 1)
                if text.startswith("  source: smollm2"))
    (tmp_path / "models" / "mine").mkdir(parents=True)
    for ok in ("tiny", "HuggingFaceTB/SmolLM2-135M", "./models/mine", str(tmp_path / "models" / "mine"), "models/mine"):
        update_params_file(Path("params.yaml"), None, [f"base.source={ok}"])
    for missing in ("/nonexistent", "./gone", "models/gone", "models/mine/gone"):  # models/ exists: a path, not a hub id
        with pytest.raises(ConfigError, match=rf"^params.yaml:{line}: 'base.source' names a local folder that does not "
                                              rf"exist: '{missing}'"):
            update_params_file(Path("params.yaml"), None, [f"base.source={missing}"])
    # a params.yaml edited by hand: `posttrain run` checks it before any stage
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("source: models/mine", "source: ../gone", 1))
    with pytest.raises(ConfigError, match=rf"^params.yaml:{line}: 'base.source' names a local folder"):
        validate_workspace(tmp_path)


def test_bf16_is_refused_where_the_loop_trains_in_fp32(tmp_path, monkeypatch):
    """bf16 autocast runs in the TRL trainers; reinforce's own loop would silently ignore it."""
    import shutil

    from posttrain.config.loader import load_params
    from posttrain.pipeline.preflight import update_params_file

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'rl.training.bf16' is not supported with rl.method reinforce"):
        update_params_file(Path("params.yaml"), None, ["rl.method=reinforce", "rl.training.bf16=true"])
    params = load_params("params.yaml", overrides=["rl.training.bf16=true", "sft.training.bf16=true"])
    assert params.rl.training["bf16"] is True and params.sft.training["bf16"] is True  # grpo and SFT take it


def test_padding_free_with_a_max_length_is_refused_when_params_are_read(tmp_path, monkeypatch):
    """TRL refuses padding_free beside max_length only once the SFT stage has loaded the model; the config says
    it at once, with the line, and every profile (quick, tiny, full) stays loadable."""
    import shutil

    from posttrain.config.loader import load_params
    from posttrain.pipeline.preflight import update_params_file

    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    line = next(i for i, text in enumerate(Path("params.yaml").read_text().splitlines(), 1)
                if text.startswith("    padding_free: true"))
    with pytest.raises(ConfigError, match=rf"^params.yaml:{line}: 'sft.training.padding_free: true' needs "
                                          r"'sft.training.max_length: null'.*padding_free: false to keep max_length 512"):
        load_params("params.yaml", overrides=["sft.training.max_length=512"])
    assert load_params("params.yaml", overrides=["sft.training.max_length=512",
                                                 "sft.training.padding_free=false"]).sft.training["max_length"] == 512
    for profile in ("tiny", "full"):
        shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
        update_params_file(Path("params.yaml"), profile, [])  # validates what it writes
    full = load_params("params.yaml").sft.training
    assert (full["max_length"], full["padding_free"]) == (512, False)  # the GPU profile keeps its truncation


def test_the_registries_and_the_names_params_accept_agree():
    from posttrain.config.schema import REWARD_MODEL_KINDS, RL_METHODS
    from posttrain.methods.registry import METHODS
    from posttrain.reward_models.training import KINDS

    assert set(METHODS) == set(RL_METHODS)
    assert set(KINDS) == set(REWARD_MODEL_KINDS)


def test_a_params_text_that_passed_skips_only_the_library_build_next_time(tmp_path, monkeypatch):
    """validate_workspace records a pass per exact params text (and library versions, and checking code): the
    next check of the same text skips building the library configs (7 s of imports), an edited text or a
    failed check does not."""
    import shutil

    from posttrain.config import library_fields as config

    from posttrain.pipeline import preflight

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    builds = []

    def build(params, where):
        builds.append(params.sft.training["learning_rate"])
        if params.sft.training["learning_rate"] == 0.5:
            raise ConfigError("params.yaml:1: refused by the library")

    monkeypatch.setattr(config, "check_library_configs", build)
    preflight.validate_workspace(tmp_path)
    preflight.validate_workspace(tmp_path)
    assert len(builds) == 1 and len(list((tmp_path / preflight.PASSED_DIR).iterdir())) == 1
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("learning_rate: 3.0e-4", "learning_rate: 0.5", 1))
    for _ in range(2):  # refused, so not recorded: refused again, with the library asked each time
        with pytest.raises(ConfigError, match="refused by the library"):
            preflight.validate_workspace(tmp_path)
    assert builds[1:] == [0.5, 0.5]
    (tmp_path / "params.yaml").write_text(text + "\n# an edit\n")
    preflight.validate_workspace(tmp_path)
    assert len(builds) == 4
    # The field names are still checked on a recorded pass (here a forged one).
    (tmp_path / "params.yaml").write_text(text.replace("learning_rate: 3.0e-4", "learnin_rate: 3.0e-4", 1))
    preflight.passed_stamp(tmp_path / "params.yaml", tmp_path / preflight.PASSED_DIR).touch()
    with pytest.raises(ConfigError, match="unknown key 'sft.training.learnin_rate'"):
        preflight.validate_workspace(tmp_path)


@pytest.mark.parametrize("task,steps", [("gsm8k", 16), ("style", 64), ("chat", 16)])
def test_sft_max_steps_task_is_the_tasks_quick_budget_and_a_number_wins(task, steps):
    """params.yaml's sft.training.max_steps `task`: style's quick SFT is longer (at 16 steps its replies loop to
    the token limit); a number given with -S is used as is."""
    from posttrain.config.loader import load_params

    assert load_params(ROOT / "params.yaml", overrides=[f"data.task={task}"]).sft.training["max_steps"] == steps
    chosen = load_params(ROOT / "params.yaml", overrides=[f"data.task={task}", "sft.training.max_steps=5"])
    assert chosen.sft.training["max_steps"] == 5


def test_every_schema_field_has_help_and_posttrain_params_prints_it(capsys):
    """Each field of the schema dataclasses carries its help beside it (field metadata, as TRL's configs do);
    `posttrain params` prints every field with its default, its check and that help."""
    import dataclasses

    from posttrain.cli.command import main
    from posttrain.config.schema import Params, described_fields

    fields = list(described_fields())
    assert len(fields) > 80 and fields[0].path == ("seed",)
    assert [f.path for f in fields if not f.declaration.metadata.get("help", "").strip()] == []
    assert main(["params"]) == 0
    printed = capsys.readouterr().out
    for path, value, declaration, _ in fields:
        name = ".".join(path)
        assert (f"\n{name}:" if dataclasses.is_dataclass(value) else f"\n{name} (") in "\n" + printed, name
    assert "eval.batch_size (int) = 64   [>= 1]\n    rows decoded together" in printed
    assert main(["params", "rl.hybrid.mode"]) == 0
    assert capsys.readouterr().out == ("rl.hybrid.mode (str) = 'alternate'   [one of alternate, curriculum]\n"
                                       "    alternate | curriculum\n")
    assert main(["params", "rl.hybrid.mod"]) == 2  # not a field: one line naming it
    assert "no params section or field 'rl.hybrid.mod'" in capsys.readouterr().err
    assert dataclasses.fields(Params)[0].metadata["help"]


def test_the_range_checks_are_the_fields_own(tmp_path, monkeypatch):
    """A check lives in its field's metadata and nowhere else: the loader applies whatever the field declares."""
    import dataclasses
    import types

    from posttrain.config.schema import EvalConfig, between

    shots = next(f for f in dataclasses.fields(EvalConfig) if f.name == "shots")
    ok, must_be = shots.metadata["check"]
    assert must_be == ">= 0" and ok(0) and not ok(-1)
    path = write(tmp_path, "eval:\n  shots: -1\n")
    with pytest.raises(ConfigError, match=r"params.yaml:2: 'eval.shots' must be >= 0, got -1"):
        load_params(path, check_library_fields=False)
    monkeypatch.setattr(shots, "metadata", types.MappingProxyType({**shots.metadata, "check": between(-5, None)}))
    assert load_params(path, check_library_fields=False).eval.shots == -1


def test_loading_params_imports_no_library_and_no_task_code():
    """Every stage loads params: the task declarations it reads (posttrain/tasks/defaults.py) must not pull in the
    task modules (their code would become every stage's DVC dep) nor torch, transformers, trl or peft (seconds)."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from posttrain.config.loader import load_params; "
            "load_params('params.yaml', overrides=['data.task=chat']); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'trl', 'peft') or m.startswith(('posttrain.tasks.', 'posttrain.rewards.')))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["posttrain.tasks.defaults"]
