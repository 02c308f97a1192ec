"""The quiet console: a stage's output goes to its log file, the console gets one line per stage.

    .venv/bin/python -m pytest tests/test_console.py -q
"""

from __future__ import annotations

import os
import sys

import pytest

from posttrain.pipeline import console

from posttrain.pipeline import lifecycle
from posttrain.pipeline.summary import headline

NOISY_STAGE = r"""
import sys, time
print("Failed to load CPU gemm_4bit_forward from kernels-community", file=sys.stderr)
for step in range(1, 4):
    sys.stderr.write(f"\r 33%|###  | {step}/3 [00:0{step}<00:0{3 - step},  1.00it/s]")
    sys.stderr.flush()
    time.sleep(0.2)
print("\nTo enable auto staging, run:")
sys.exit(int(sys.argv[1]))
"""


def _run(tmp_path, code: int = 0):
    log = tmp_path / "stage.log"
    status = console.run_stage_logged("sft", [sys.executable, "-c", NOISY_STAGE, str(code)], log, cwd=tmp_path,
                                      env=dict(os.environ), show_progress=True, run_child=lifecycle.run_child)
    return status, log


def test_stage_output_goes_to_its_log_not_the_console(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    status, log = _run(tmp_path)
    out, err = capfd.readouterr()
    assert status == 0 and out == "" and err == ""
    text = log.read_text()
    assert text.startswith(console.ATTEMPT) and "gemm_4bit_forward" in text and "3/3 [00:03<00:00" in text


def test_verbose_streams_the_stage_output_too(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    status, log = _run(tmp_path, code=3)
    out, _ = capfd.readouterr()
    assert status == 3 and "gemm_4bit_forward" in out and "To enable auto staging" in out
    assert "gemm_4bit_forward" in log.read_text()


def test_a_failed_stage_shows_the_tail_of_its_last_attempt(tmp_path, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    log = tmp_path / "stage.log"
    log.write_text(f"{console.ATTEMPT} earlier\nfirst attempt's error\n")
    _run(tmp_path, code=1)
    shown = console.tail(log)
    assert "first attempt" not in shown and "To enable auto staging" in shown
    assert "1/3 [" not in shown and shown.count("3/3 [") == 1  # a progress bar's redraws collapse to the last


def test_progress_is_read_from_the_tqdm_counter():
    live = console.LiveOutput(None, echo=False)
    assert console.PROGRESS.findall("sft:  50%|#####     | 1/2 [00:05<00:05,  5.47s/it]") == [("1", "2", "00:05", "00:05")]
    assert console.progress_bar(("1", "2", "00:05", "00:05"), width=10) == "[#####.....] 1/2 eta 00:05"
    assert live.progress is None


@pytest.mark.parametrize("values, expected", [
    ({"n_train": 114.0, "n_val": 6.0, "n_test": 12.0, "stage_seconds": 4.8}, "114 train / 6 val / 12 test"),
    ({"skipped": 1.0}, "skipped (not needed)"),
    ({"loss_first": 6.3, "loss_last": 6.224, "mean_token_accuracy_last": 0.01}, "loss 6.224"),
    ({"reward_last": 0.5, "loss_last": 0.1}, "reward 0.5"),
    ({"accuracy_flexible": 0.25, "accuracy_strict": 0.0, "n_questions": 40.0}, "flexible 0.250, strict 0.000 on 40 items"),
    ({"promote": True, "model_version": "3", "baseline": "champion v2"}, "PROMOTED (model version 3, vs champion v2)"),
    ({"promote": False, "model_version": 1, "baseline": "base model"}, "rejected (model version 1, vs base model)"),
    ({}, ""),
])
def test_headline_figure(values, expected):
    assert headline(values) == expected


def test_stage_line_is_one_parseable_line():
    line = console.stage_line("reward_model", "reused", 12.4, "val accuracy 0.9")
    assert line == "reward_model reused     12s  val accuracy 0.9"
    assert console.STAGE_LINE.match(line).groups() == ("reward_model", "reused", "12", "val accuracy 0.9")
    assert console.STAGE_LINE.match(console.stage_line("merge", "ran", 3.0)).group(2) == "ran"


def test_library_noise_is_silenced_at_its_source_unless_verbose(monkeypatch):
    import logging
    import warnings

    for name in ("TRANSFORMERS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS",
                 "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "MLFLOW_LOGGING_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    console.quiet_libraries()
    assert "TRANSFORMERS_VERBOSITY" not in os.environ
    assert logging.getLogger("bitsandbytes").level == logging.ERROR  # the missing-kernels warning, always
    monkeypatch.delenv(console.VERBOSE_ENV)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_libraries()
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6. Use x", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error" and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] == "WARNING"
