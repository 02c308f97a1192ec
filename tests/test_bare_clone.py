"""A clone works on its own: GSM8K ships in data/gsm8k (git, not DVC), the default data.source."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_in

DATA = ROOT / "data" / "gsm8k"


def test_gsm8k_ships_in_the_repo_as_its_card_says():
    from posttrain.config.loader import load_params
    from posttrain.config.schema import DataConfig

    assert DataConfig().source == "data/gsm8k" and load_params(ROOT / "params.yaml").data.source == "data/gsm8k"
    card = (DATA / "README.md").read_text()
    for name, records in (("train.jsonl", 7473), ("test.jsonl", 1319)):
        data = (DATA / name).read_bytes()
        assert data.count(b"\n") == records and hashlib.sha256(data).hexdigest() in card, name
    assert "MIT License" in (DATA / "LICENSE").read_text()
    tracked = subprocess.run(["git", "ls-files", "data/gsm8k"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert {"data/gsm8k/train.jsonl", "data/gsm8k/test.jsonl", "data/gsm8k/LICENSE", "data/gsm8k/README.md"} <= set(tracked)


@pytest.mark.slow
@pytest.mark.integration
def test_a_clone_with_nothing_beside_it_runs_the_tiny_pipeline(tmp_path):
    """The committed HEAD, cloned into an empty folder: no ../shared, no data.source override."""
    from posttrain.cli.command import update_params_file

    clone = tmp_path / "alone" / "repo"
    clone.parent.mkdir()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert sorted(p.name for p in tmp_path.joinpath("alone").iterdir()) == ["repo"]
    cwd = os.getcwd()
    os.chdir(clone)  # update_params_file reads profiles/ relative to the working directory
    try:
        update_params_file(Path("params.yaml"), "tiny", ["data.max_train=120", "data.max_test=12"])
    finally:
        os.chdir(cwd)
    assert re.search(r"^  gsm8k:\n    source: data/gsm8k\b", (clone / "params.yaml").read_text(), re.M)

    # The venv installs this checkout editable; run from the clone, the clone's code must be the one imported.
    where = run_in(clone, [sys.executable, "-c", "import posttrain.stages as s; print(s.__file__)"])
    assert all(Path(p).resolve().is_relative_to(clone.resolve()) for p in where.stdout.split()), where.stdout

    result = run_in(clone, [sys.executable, "-m", "posttrain", "-q", "run"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (clone / "reports" / "promotion.json").exists()
    assert "data/gsm8k" in (clone / "dvc.lock").read_text()  # the prepare stage hashed the in-repo copy
