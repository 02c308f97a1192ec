"""Disk per run (issue 18, item 4): the rl stage keeps an adapter and a pointer instead of a merged copy, the
registry holds adapters and a pointer to the base, a registered version loads in one call, `posttrain gc`.

    .venv/bin/python -m pytest tests/test_modelstore.py -q
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_params
from posttrain.io import DataError
from test_promote import eval_dir, registry  # noqa: F401 - registry is a fixture (a sqlite MLflow store)

DVC = str(Path(sys.executable).parent / "dvc")


def _adapter(model_dir: Path, seed: int):
    """A LoRA with random (not zero) B matrices, so merging it changes every targeted weight."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def build_chain(params, base_dir: Path, models: Path, seed: int = 1):
    """models/sft_adapter, models/sft (merge stage) and models/rl (the rl stage's save) on `base_dir`;
    returns the state dict of the RL policy merged in this process (what the rl stage used to save)."""
    from transformers import AutoTokenizer

    from posttrain.stages import merge

    from posttrain.stages import rl

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    sft = _adapter(base_dir, seed)
    sft.save_pretrained(models / "sft_adapter")
    tokenizer.save_pretrained(models / "sft_adapter")
    merge.run(params, base_dir, models / "sft_adapter", models / "sft")
    policy = _adapter(models / "sft", seed + 1)
    rl.save_policy(policy, models / "sft", models / "rl", tokenizer, [{"step": 1, "reward": 0.5}], {})
    return {k: v.clone() for k, v in policy.merge_and_unload().state_dict().items()}


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture
def chain(params, tiny_base, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_base, models / "base")
    merged = build_chain(params, models / "base", models)
    return models, merged


def test_rl_output_is_an_adapter_that_rebuilds_the_merged_model(chain):
    from posttrain.release import modelstore
    from posttrain.evaluation.evaluator import load_model

    models, merged = chain
    rl_dir = models / "rl"
    assert not list(rl_dir.glob("model*.safetensors")) and (rl_dir / "adapter_model.safetensors").is_file()
    assert json.loads((rl_dir / modelstore.POINTER_FILE).read_text())["path"] == "../sft"
    size = sum(p.stat().st_size for p in rl_dir.iterdir())
    assert size < (models / "sft" / "model.safetensors").stat().st_size  # LoRA r4 on a tiny model: still smaller
    model, tokenizer = load_model(rl_dir)
    rebuilt = model.state_dict()
    assert rebuilt.keys() == merged.keys()
    assert all(torch.equal(rebuilt[k], merged[k]) for k in merged)  # bit for bit what merging in the stage gave
    assert (rl_dir / "train_log.json").is_file() and tokenizer.vocab_size > 0


def test_an_adapter_whose_base_changed_is_refused(chain):
    from posttrain.release import modelstore

    models, _ = chain
    config = json.loads((models / "sft" / "config.json").read_text())
    (models / "sft" / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-3}))
    with pytest.raises(DataError, match=r"posttrain_base\.json: the model this adapter was trained on.*none of") as err:
        modelstore.load_causal_lm(models / "rl")
    assert "\n" not in str(err.value)


def promote(params, tmp_path: Path, candidate: Path, n_right: int, label: str) -> dict:
    """One promote stage run for `candidate`, judged n_right of 100 (base: 10 of 100)."""
    from posttrain.release import tracking
    from posttrain.stages import promote as stage

    questions = [f"q{i}" for i in range(100)]
    p = dataclasses.replace(params, promote=dataclasses.replace(params.promote, n_bootstrap=300))
    with tracking.stage_run("promote", tmp_path):
        return stage.run(p, candidate, eval_dir(tmp_path / f"eval_{label}", [i < n_right for i in range(100)], questions=questions),
                         eval_dir(tmp_path / "eval_base", [i < 10 for i in range(100)], questions=questions),
                         tmp_path / "eval_sft", cache_dir=tmp_path / ".cache/champion_evals")["metrics"]


def test_a_registered_version_holds_adapters_and_loads_in_one_call(params, chain, registry, tmp_path, prepared,
                                                                   capsys):
    from posttrain.release import modelstore
    from posttrain.cli.command import main
    from posttrain.evaluation.evaluator import load_model

    client = registry.MlflowClient()

    models, merged = chain
    decision = promote(params, tmp_path, models / "rl", 60, "rl")
    assert decision["promote"] and str(decision["model_version"]) == "1"

    version = client.get_model_version("gsm8k-policy", "1")
    stored = Path(version.source.removeprefix("file://"))
    files = {p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith("model.safetensors") and "adapter" not in f]  # no full copy
    assert {"adapter_model.safetensors", "parent/adapter_model.safetensors", "parent/posttrain_base.json",
            "posttrain_base.json", "MODEL_CARD.md"} <= files
    pointer = json.loads((stored / "parent/posttrain_base.json").read_text())
    assert pointer["sha256"] == modelstore.digest(models / "base") == version.tags[modelstore.TAG_BASE_SHA]
    assert pointer["absolute_path"] == str((models / "base").resolve()) and pointer["source"] == params.base.source

    candidate, _ = load_model(models / "rl")
    vocab = candidate.config.vocab_size
    for uri in ("models:/gsm8k-policy@champion", "models:/gsm8k-policy/1"):
        model, tokenizer = load_model(uri)
        assert torch.equal(logits(model, vocab), logits(candidate, vocab)), uri
        state = model.state_dict()
        assert all(torch.equal(state[k], merged[k]) for k in merged)
    assert len(list((tmp_path / modelstore.REGISTRY_CACHE / "gsm8k-policy").iterdir())) == 1  # downloaded once

    tiny_params(tmp_path)  # `posttrain eval` reads ./params.yaml: the tiny profile
    (tmp_path / "params.tiny.yaml").rename(tmp_path / "params.yaml")
    capsys.readouterr()
    assert main(["-q", "eval", "models:/gsm8k-policy@champion", "--questions", str(prepared / "test.jsonl")]) == 0
    assert '"accuracy_flexible"' in capsys.readouterr().out
    assert main(["-q", "eval", "models:/gsm8k-policy/7", "--questions", str(prepared / "test.jsonl")]) == 2
    assert "models:/gsm8k-policy/7: not in the model registry" in capsys.readouterr().err


def _plain_candidate(path: Path, label: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"name": label}))
    (path / "model.safetensors").write_bytes(b"x" * 1000)
    return path


def test_gc_keeps_the_champion_and_the_last_n(params, registry, tmp_path, monkeypatch, capsys):
    from posttrain.cli.command import main

    client = registry.MlflowClient()

    # v1 promoted (champion); v2..v5 worse than v1: rejected.
    for number, right in enumerate([50, 40, 41, 42, 43], 1):
        decision = promote(params, tmp_path, _plain_candidate(tmp_path / f"m{number}", str(number)), right, str(number))
        assert decision["promote"] == (number == 1)
    sources = {str(v.version): Path(v.source.removeprefix("file://")) for v in
               client.search_model_versions("name = 'gsm8k-policy'")}
    downloads = tmp_path / ".cache/registry/gsm8k-policy"
    for number in ("2", "4"):
        (downloads / f"v{number}-abcdef12").mkdir(parents=True)

    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["gc", "--keep", "2", "--name", "gsm8k-policy"]) == 1  # asked, declined: nothing deleted
    listing = capsys.readouterr().out
    assert "delete v2 (rejected" in listing and "delete v3 (rejected" in listing and "delete v4" not in listing
    assert "keeping v1 (champion), v4, v5" in listing and "nothing deleted" in listing
    assert len(client.search_model_versions("name = 'gsm8k-policy'")) == 5

    assert main(["gc", "--keep", "2", "--yes", "--name", "gsm8k-policy"]) == 0
    left = sorted(int(v.version) for v in client.search_model_versions("name = 'gsm8k-policy'"))
    assert left == [1, 4, 5]
    assert str(client.get_model_version_by_alias("gsm8k-policy", "champion").version) == "1"
    assert not sources["2"].exists() and not sources["3"].exists()  # their model/ artifacts
    assert all(sources[v].is_dir() for v in ("1", "4", "5"))
    assert (sources["2"].parent / "eval" / "records.jsonl").is_file()  # the small eval report stays
    assert not (downloads / "v2-abcdef12").exists() and (downloads / "v4-abcdef12").is_dir()
    assert main(["gc", "--keep", "0", "--yes", "--name", "gsm8k-policy"]) == 0
    assert [int(v.version) for v in client.search_model_versions("name = 'gsm8k-policy'")] == [1]
    assert main(["gc", "--keep", "-1", "--name", "gsm8k-policy"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --keep must be >= 0, got -1"


def _sh(ws: Path, *command: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ws, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


BASE_STAGE = """stages:
  base:
    cmd: rm -rf models/.base.tmp && mkdir -p models && cp -r ${src} models/.base.tmp && mv models/.base.tmp models/base
    deps:
    - ${src}
    outs:
    - models/base
"""


@pytest.mark.slow  # runs `dvc repro` (a one-stage pipeline, no training): about a minute
def test_dvc_links_its_cache_and_gc_keeps_what_registered_versions_need(params, tiny_base, registry, tmp_path,
                                                                         monkeypatch):
    """A one-stage DVC workspace with the project's .dvc/config: outputs are links to the cache, a rerun that
    rewrites its output folder works, a second repro is a no-op. A version registered on base A still loads
    after the workspace moved to base B and its folder is gone: gc keeps A's cache entry (pinned by the
    version's tag) and drops only what nothing uses; the loader rebuilds A from the DVC cache."""
    from posttrain.release import modelstore
    from posttrain.cli.command import main
    from posttrain.evaluation.evaluator import load_model

    client = registry.MlflowClient()

    ws = tmp_path
    _sh(ws, "git", "init", "-q")
    _sh(ws, DVC, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", ws / ".dvc" / "config")
    shutil.copytree(tiny_base, ws / "src_a")
    (ws / "params.yaml").write_text("src: src_a\n")
    (ws / "dvc.yaml").write_text(BASE_STAGE)
    _sh(ws, DVC, "repro", "-q")
    weights = ws / "models/base/model.safetensors"
    assert weights.stat().st_nlink > 1 or weights.is_symlink()  # linked to the cache, not copied
    assert "didn't change, skipping" in _sh(ws, DVC, "repro").stdout

    merged = build_chain(params, ws / "models/base", ws / "models")
    assert promote(params, tmp_path, ws / "models/rl", 60, "a")["promote"]
    version = client.get_model_version("gsm8k-policy", "1")
    assert version.tags[modelstore.TAG_BASE_DVC].endswith(".dir")

    # The workspace moves to another base (the stage rewrites models/base); A is in no dvc.lock any more.
    shutil.copytree(tiny_base, ws / "src_b")
    config = json.loads((ws / "src_b/config.json").read_text())
    (ws / "src_b/config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-3}))
    (ws / "params.yaml").write_text("src: src_b\n")
    _sh(ws, DVC, "repro", "-q")
    assert json.loads((ws / "models/base/config.json").read_text())["rms_norm_eps"] == 1e-3
    assert (ws / "models/base/config.json").stat().st_nlink > 1
    (ws / "stray").write_text("not used by anything")
    _sh(ws, DVC, "add", "-q", "stray")
    stray_md5 = (ws / "stray.dvc").read_text().split("md5: ")[1].split()[0]
    (ws / "stray.dvc").unlink()
    shutil.rmtree(ws / "models")
    shutil.rmtree(ws / "src_a")
    _sh(ws, DVC, "checkout", "-q")

    cache_files = lambda: {p for p in (ws / ".dvc/cache/files").rglob("*") if p.is_file()}  # noqa: E731
    before = cache_files()
    assert main(["gc", "--keep", "0", "--yes", "--name", "gsm8k-policy"]) == 0
    assert before - cache_files() == {ws / ".dvc/cache/files/md5" / stray_md5[:2] / stray_md5[2:]}  # only the stray
    assert "Data and pipelines are up to date" in _sh(ws, DVC, "status").stdout
    a_md5 = version.tags[modelstore.TAG_BASE_DVC]
    dry = _sh(ws, DVC, "gc", "-w", "--dry", "-f")  # DVC's own gc would drop base A's entry too: we keep it
    assert a_md5[2:] in dry.stdout + dry.stderr

    model, _ = load_model("models:/gsm8k-policy@champion")  # base A rebuilt from the DVC cache entry
    state = model.state_dict()
    assert all(torch.equal(state[k], merged[k]) for k in merged)


@pytest.mark.slow  # the tiny pipeline, reproduced once per session (conftest.reproduced_workspace)
def test_a_tiny_repro_links_its_outputs_and_registers_adapters(reproduced_workspace, workspace_copy):
    from conftest import run_in

    ws = reproduced_workspace
    for name in ("base", "sft"):
        weights = ws / "models" / name / "model.safetensors"
        assert weights.stat().st_nlink > 1 or weights.is_symlink(), name  # one copy: the cache's
    assert not (ws / "models/rl/model.safetensors").exists() and (ws / "models/rl/adapter_model.safetensors").is_file()
    stored = [p for p in (ws / "mlflow/artifacts").rglob("*.safetensors") if p.name != "adapter_model.safetensors"]
    assert stored == []  # the registry holds adapters, no full model
    again = run_in(workspace_copy, [DVC, "repro"])  # a private copy: the session's workspace stays as it is
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout[-2000:]
    done = run_in(workspace_copy, [sys.executable, "-m", "posttrain", "-q", "eval", "models:/gsm8k-policy/1"])
    assert done.returncode == 0 and '"accuracy_flexible"' in done.stdout, done.stderr[-2000:]
