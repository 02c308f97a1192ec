from pathlib import Path

import pytest

from conftest import ROOT
from posttrain.config import ConfigError, apply_overrides, load_params, parse_override


@pytest.mark.parametrize("profile", [None, "tiny", "full"])
def test_params_and_profiles_build_every_library_config(profile, tmp_path):
    """A renamed or mistyped field fails here, not in a night run."""
    import yaml
    from peft import LoraConfig
    from transformers import TrainingArguments
    from trl import GRPOConfig, SFTConfig

    from posttrain.cli import update_params_file
    from posttrain.training import trainer_kwargs

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
    from posttrain.cli import update_params_file

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
