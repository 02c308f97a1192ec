"""One quick pipeline run, per stage: seconds, tokens/s against the machine's compute bound, and the
disk it left. Reads a workspace where `posttrain run` (any task) has just run; measures the bound here.

    posttrain run                                                      # in a fresh clone, then:
    python bench/pipeline.py --workspace /tmp/quickgsm8k --wall-seconds 600 --note "nothing else running"

The bound is this machine's fp32 matmul rate (measured here, torch, 2048 x 2048, best of 5). FLOP per
token, N = the base model's parameters (the tied embedding counted once, as the LM head's matmul),
n = the adapter's trainable parameters:
  evaluation (greedy decode)    2N           one forward per kept token
  SFT with LoRA                 4N + 6n      forward 2N, backward to the activations 2N (through frozen
                                             weights), weight gradients for the adapter only (6n with its
                                             own forward and backward); full fine-tuning would be 6N
  GRPO with LoRA (beta 0)       6N + 6n      generating the completion 2N, then the SFT cost on the
                                             prompt and completion (no reference forward at beta 0)
Token counts are TRL's `num_tokens` (prompt and completion, padding excluded) over `train_runtime`;
the fraction is tokens/s x FLOP per token / bound. Attention's own FLOP are left out (short sequences).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path

import run_record  # bench/run_record.py
import yaml

ROOT = Path(__file__).resolve().parents[1]


def matmul_gflops(dtype_name: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def numel(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def training_throughput(log_path: Path) -> dict:
    log = json.loads(log_path.read_text())
    tokens = [e["num_tokens"] for e in log if e.get("num_tokens") is not None]
    runtime = next((e["train_runtime"] for e in log if "train_runtime" in e), None)
    if not tokens or not runtime:
        return {}
    return {"num_tokens": tokens[-1], "train_runtime": runtime, "tokens_per_s": tokens[-1] / runtime}


def disk_bytes(ws: Path) -> dict:
    """du -sb (hard links counted once within one call), the whole workspace and its parts."""
    parts = [p for p in ("models", ".dvc/cache", "mlflow", "checkpoints", "data", "reports", "plots") if (ws / p).exists()]

    def du(*paths: str) -> int:
        out = subprocess.run(["du", "-scb", *paths], cwd=ws, capture_output=True, text=True, check=True).stdout
        return int(out.strip().splitlines()[-1].split()[0])

    return {"total": du("."), **{p: du(p) for p in parts}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="where `posttrain run` has just run")
    run_record.add_arguments(parser, ROOT / "bench/results/pipeline.json")
    args = parser.parse_args()
    ws = Path(args.workspace)
    bound = matmul_gflops("float32")
    n_base = numel(ws / "models/base")
    n_adapter = numel(ws / "models/sft_adapter")
    flop_per_token = {"eval": 2 * n_base, "sft": 4 * n_base + 6 * n_adapter, "grpo": 6 * n_base + 6 * n_adapter}
    stages = {}
    for report in sorted((ws / "reports").glob("*.json")):
        data = json.loads(report.read_text())
        if "stage_seconds" in data:
            stages[report.stem] = {"seconds": round(data["stage_seconds"], 1)}
        if report.stem.startswith("eval_") and "tokens_per_s" in data:
            stages[report.stem] |= {"tokens_per_s": round(data["tokens_per_s"], 1), "fraction_of_fp32_bound": round(
                data["tokens_per_s"] * flop_per_token["eval"] / (bound * 1e9), 3)}
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for stage, log, kind in (("sft", "models/sft_adapter/train_log.json", "sft"),
                             ("rl", "models/rl/train_log.json", params["rl"]["method"])):
        throughput = training_throughput(ws / log) if (ws / log).exists() else {}
        if throughput and stage in stages:
            stages[stage] |= {k: round(v, 1) for k, v in throughput.items()}
            if kind in flop_per_token:
                stages[stage]["fraction_of_fp32_bound"] = round(
                    throughput["tokens_per_s"] * flop_per_token[kind] / (bound * 1e9), 3)
    result = {
        "task": params["data"]["task"], "rl_method": params["rl"]["method"],
        "fp32_matmul_gflops": round(bound, 1), "cpu_count": os.cpu_count(),
        "base_parameters": n_base, "adapter_parameters": n_adapter,
        "flop_per_token": flop_per_token, "stages": stages,
        "stage_seconds_total": round(sum(s["seconds"] for s in stages.values()), 1),
        "disk_bytes_after_run": disk_bytes(ws),
    }
    return run_record.write(result, args)


if __name__ == "__main__":
    raise SystemExit(main())
