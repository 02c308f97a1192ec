"""CI: the promotion gate on the tiny profile, both outcomes, through the commands a retrain job runs.

    .venv/bin/python .ci/gate_check.py        # .ci/run calls it after `make test`; exit 0 = both outcomes right

In a temporary workspace (params.yaml + the tiny profile, embedded MLflow store) it writes per-question
eval reports for the base model and a candidate, then runs `posttrain stage promote` and `posttrain gate`:
  1. a candidate that clearly beats the base model: promoted, `gate` exits 0
  2. a worse candidate against that champion: rejected, `gate` exits 1 and prints why
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N = 40


def write_eval(folder: Path, n_right: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"question": f"question {i}", "correct_flexible": i < n_right, "correct_strict": i < n_right}
               for i in range(N)]
    folder.joinpath("records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = {"accuracy_flexible": n_right / N, "accuracy_strict": n_right / N, "n_questions": N,
               "protocol_hash": "ci-protocol", "protocol": {"prompt_style": "chat"}, "question_set_hash": "ci-questions"}
    folder.joinpath("metrics.json").write_text(json.dumps(metrics))


def posttrain(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "posttrain", "-q", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=600)


def round_trip(ws: Path, candidate_right: int, expected_exit: int, expected_word: str) -> list[str]:
    write_eval(ws / "reports/eval/rl", candidate_right)
    promote = posttrain(ws, "stage", "promote")
    if promote.returncode != 0:
        return [f"stage promote failed ({promote.returncode}): {promote.stderr[-2000:]}"]
    gate = posttrain(ws, "gate")
    print(f"  candidate {candidate_right}/{N}: exit {gate.returncode}: {gate.stdout.strip()}")
    problems = []
    if gate.returncode != expected_exit:
        problems.append(f"gate exited {gate.returncode}, expected {expected_exit}")
    if expected_word not in gate.stdout or ":" not in gate.stdout.split(expected_word, 1)[-1]:
        problems.append(f"gate did not print {expected_word} with a reason: {gate.stdout!r} {gate.stderr[-500:]!r}")
    return problems


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from posttrain.cli.command import update_params_file

    started = time.time()
    ws = Path(tempfile.mkdtemp(prefix="posttrain-gate-ci-"))
    try:
        shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
        shutil.copytree(ROOT / "profiles", ws / "profiles")
        os.chdir(ws)
        update_params_file(Path("params.yaml"), "tiny", [])
        (ws / "models/rl").mkdir(parents=True)
        (ws / "models/rl/config.json").write_text("{}")
        write_eval(ws / "reports/eval/base", 10)
        write_eval(ws / "reports/eval/sft", 10)
        print("gate check (tiny profile):")
        problems = round_trip(ws, 30, 0, "PROMOTED")  # 30/40 vs base 10/40
        problems += round_trip(ws, 20, 1, "REJECTED")  # 20/40 vs champion 30/40
    finally:
        os.chdir(ROOT)
        shutil.rmtree(ws, ignore_errors=True)
    for problem in problems:
        print(f"gate check FAILED: {problem}", file=sys.stderr)
    print(f"gate check {'FAILED' if problems else 'passed'} in {time.time() - started:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
