"""One quick pipeline run, per stage: seconds, tokens/s against the machine's compute bound, and the
disk it left. Reads a workspace where `posttrain run` (any task) has just run; measures the bound here.

    posttrain run                                                      # in a fresh clone, then:
    python bench/pipeline.py --workspace /tmp/quickgsm8k --wall-seconds 600 --note "nothing else running"

The bound is this machine's fp32 matmul rate (measured here, torch, 2048 x 2048, best of 5). FLOP per
token and how the SFT and GRPO stages count their tokens: posttrain/training/throughput.py (evaluation 2N,
SFT with LoRA 4N + 6n, GRPO with LoRA 6N + 6n); the training stages measure their own fraction at the
end of training and write it to reports/sft.json and reports/rl.json, which this script copies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
from pathlib import Path

import run_record  # bench/run_record.py
import yaml

from posttrain.training.throughput import flop_per_token as flop_per_token_of
from posttrain.training.throughput import matmul_gflops

ROOT = Path(__file__).resolve().parents[1]


def numel(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


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
    flop_per_token = {kind: flop_per_token_of(kind, n_base, n_adapter) for kind in ("eval", "sft", "grpo")}
    stages = {}
    for report in sorted((ws / "reports").glob("*.json")):
        data = json.loads(report.read_text())
        if "stage_seconds" in data:
            stages[report.stem] = {"seconds": round(data["stage_seconds"], 1)}
        if report.stem.startswith("eval_") and "tokens_per_s" in data:
            stages[report.stem] |= {"tokens_per_s": round(data["tokens_per_s"], 1), "fraction_of_fp32_bound": round(
                data["tokens_per_s"] * flop_per_token["eval"] / (bound * 1e9), 3)}
        # the training stages' own figures (sft, rl: posttrain/training/throughput.py)
        figures = {k.removeprefix("throughput_"): v for k, v in data.items() if k.startswith("throughput_")}
        if figures and report.stem in stages:
            stages[report.stem] |= {k: round(v, 3 if k == "fraction_of_fp32_bound" else 1) for k, v in figures.items()}
    params = yaml.safe_load((ws / "params.yaml").read_text())
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
