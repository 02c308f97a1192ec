"""The training stages' tokens/s and fraction of the compute bound (posttrain/training/throughput.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.training import throughput


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))  # 110 + 22 parameters
    model[0].requires_grad_(False)  # the frozen base
    return model


def test_a_resumed_run_counts_only_the_tokens_it_trained(monkeypatch):
    monkeypatch.setattr(throughput, "matmul_gflops", lambda dtype_name="float32", device="cpu": 100.0)
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    callback = throughput.throughput_callback("sft")
    state = SimpleNamespace(num_input_tokens_seen=500, global_step=8, log_history=[{"step": 4, "loss": 1.0}])
    callback.on_train_begin(None, state, None)  # the checkpoint's 500 tokens were trained by the killed run
    state.num_input_tokens_seen, state.global_step = 800, 16
    callback.on_train_end(None, state, None, model=_model())
    figures = throughput.throughput_of(state.log_history)
    assert state.log_history[-1]["step"] == 16
    assert figures["throughput_tokens"] == 300 and figures["throughput_seconds"] == 2.0
    assert figures["throughput_tokens_per_s"] == 150.0
    assert figures["throughput_flop_per_token"] == 4 * 110 + 6 * 22  # SFT with LoRA: 4N + 6n
    assert figures["throughput_fraction_of_fp32_bound"] == pytest.approx(150 * (4 * 110 + 6 * 22) / 100e9)


def test_no_tokens_counted_adds_no_entry():
    callback = throughput.throughput_callback("grpo")
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=1, log_history=[])
    callback.on_train_begin(None, state, None)
    callback.on_train_end(None, state, None, model=_model())
    assert state.log_history == [] and throughput.throughput_of(state.log_history) == {}


def test_flop_formulas():
    assert throughput.flop_per_token("eval", 100, 0) == 200
    assert throughput.flop_per_token("grpo", 100, 10) == 660
    assert throughput.parameter_counts(_model()) == (110, 22)


def test_sft_metrics_take_the_total_train_runtime_not_the_first_logged(tmp_path):
    """transformers logs the running train_runtime with every logging step; the stage reports the total."""
    from posttrain.io import write_json
    from posttrain.stages import sft

    write_json(tmp_path / "train_log.json", [
        {"step": 2, "loss": 1.2, "train_runtime": 15.9},
        {"step": 4, "loss": 1.1, "train_runtime": 30.7},
        {"step": 4, "train_runtime": 31.0, "train_loss": 1.15},
    ])
    assert sft.metrics(tmp_path)["train_runtime"] == 31.0
