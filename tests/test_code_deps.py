"""Every stage depends on the code it runs: its task module and the project modules that imports."""

import functools
import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_in
from posttrain.pipeline import graph

DVC = str(Path(sys.executable).parent / "dvc")
EVALS = {"eval_base", "eval_sft", "eval_rl"}


@functools.cache
def _dvc_stages() -> dict:
    return graph.dvc_stages()  # every stage's import closure: computed once, not once per deps_of call


def deps_of(name: str) -> set[str]:
    return set(_dvc_stages()[name]["deps"])


def test_stage_deps_follow_the_imports_of_the_task_module():
    # posttrain/stages/rl.py imports these inside functions (through posttrain/methods/registry.py), training at module level
    assert {"posttrain/methods/reinforce.py", "posttrain/methods/draft.py", "posttrain/methods/hybrid.py", "posttrain/methods/ppo.py",
            "posttrain/rewards/composition.py", "posttrain/rewards/rule_based.py", "posttrain/rewards/model_based.py",
            "posttrain/training/trainer.py", "posttrain/stages/rl.py"} <= deps_of("rl")
    for name in EVALS:  # posttrain/stages/evaluate.py -> evaluation.py -> gsm8k, prompts and (inside functions) decoding
        assert {"posttrain/tasks/gsm8k_answers.py", "posttrain/evaluation/decoding.py", "posttrain/evaluation/prompts.py", "posttrain/evaluation/evaluator.py",
                "posttrain/stages/evaluate.py"} <= deps_of(name)
        assert not {"posttrain/methods/reinforce.py", "posttrain/training/trainer.py"} & deps_of(name)
    assert {"posttrain/training/trainer.py", "posttrain/evaluation/prompts.py", "posttrain/stages/sft.py"} <= deps_of("sft")
    assert "posttrain/methods/reinforce.py" not in deps_of("sft")
    for stage in graph.STAGES:  # the runner runs every stage; the entry point's dispatch (cli.py) does not count
        assert "posttrain/pipeline/runner.py" in deps_of(stage.name) and "posttrain/cli/command.py" not in deps_of(stage.name)
        # the runner loads every stage's params: the loader's checks and `task` resolution (and the task
        # declarations it reads) decide the values a stage runs on
        assert {"posttrain/config/loader.py", "posttrain/config/schema.py", "posttrain/tasks/defaults.py"} <= deps_of(stage.name)
        code = graph.stage_code_deps(stage)
        assert code == sorted(code) and all((ROOT / path).is_file() for path in code)


def _flagged(ws: Path) -> set[str]:
    """Stages `dvc status` calls changed."""
    status = run_in(ws, [DVC, "status", "--json"])
    assert status.returncode == 0, status.stderr[-2000:]
    return set(json.loads(status.stdout or "{}"))


def _downstream(ws: Path, names: set[str]) -> set[str]:
    """Stages reading, directly or not, what `names` write: from the workspace's dvc.yaml, the graph DVC uses."""
    spec = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]

    def writes(entry):
        outs = entry.get("outs", []) + entry.get("metrics", [])
        return [next(iter(o)) if isinstance(o, dict) else o for o in outs]

    found = set(names)
    while True:
        more = {name for name, entry in spec.items() if name not in found and any(
            dep == out or dep.startswith(out + "/") for dep in entry["deps"]
            for upstream in found for out in writes(spec[upstream]))}
        if not more:
            return found - names
        found |= more


@pytest.mark.slow
@pytest.mark.integration
def test_changed_code_flags_exactly_the_stages_that_run_it(workspace_copy):
    ws = workspace_copy
    assert _flagged(ws) == set()

    # gsm8k.py (answer extraction, calculator-note stripping) runs wherever the task layer runs: reading and
    # splitting the data, prompts, reward-model data, scoring; decoding.py only in the evaluator.
    uses_gsm8k = {"prepare", "reward_model", "judge", "sft", "rl"} | EVALS
    for module, expected in (("posttrain/methods/reinforce.py", {"rl"}), ("posttrain/tasks/gsm8k_answers.py", uses_gsm8k),
                             ("posttrain/evaluation/decoding.py", EVALS)):
        original = (ws / module).read_text()
        (ws / module).write_text(original + "# a changed line\n")
        assert _flagged(ws) == expected, module
        (ws / module).write_text(original)
        assert _flagged(ws) == set(), module
    assert _downstream(ws, {"rl"}) == {"eval_rl", "promote", "report"}
    assert _downstream(ws, uses_gsm8k) == {"merge", "promote", "report"}
    # a new task's module is read by the same stages, never by base, merge, promote or report
    (ws / "posttrain/tasks/style.py").write_text((ws / "posttrain/tasks/style.py").read_text() + "# a changed line\n")
    assert _flagged(ws) == uses_gsm8k
    (ws / "posttrain/tasks/style.py").write_text((ws / "posttrain/tasks/style.py").read_text()[:-len("# a changed line\n")])

    # Reproducing after a change to RL-only code reruns rl and, if its model changed, what reads it; never
    # the stages before it.
    (ws / "posttrain/methods/reinforce.py").write_text((ws / "posttrain/methods/reinforce.py").read_text() + "# a changed line\n")
    again = run_in(ws, [DVC, "repro"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    ran = {line.split("'")[1] for line in again.stdout.splitlines() if line.startswith("Running stage '")}
    assert "rl" in ran and ran <= {"rl"} | _downstream(ws, {"rl"}), ran
    assert _flagged(ws) == set()
