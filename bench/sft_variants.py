"""SFT variants against the quick profile's SFT, same data, same seed, same steps: speed and loss per step.

    posttrain run                                            # in a fresh clone (GSM8K), then:
    python bench/sft_variants.py --workspace /tmp/quickgsm8k # -> bench/results/sft_variants.json

Variants (SFTConfig fields over the workspace's params.yaml `sft.training`):
  fp32          the quick profile as it is: fp32, batches padded to their longest example
  padding_free  TRL's padding-free batches: a batch's examples are concatenated into one row with
                position ids restarting per example, so no padding is computed; transformers builds the
                block-diagonal mask from the position ids, so examples do not attend to each other;
                TRL enforces no max_length without packing, so it is None there, and it is compared with
  fp32_untruncated  fp32 padded batches with max_length None (3 of the first 128 GSM8K examples exceed 320)
  bf16          bf16 autocast (torch.autocast on the CPU, AVX512-BF16 here); the weights stay fp32
Each variant runs the SFT stage's own code (posttrain/stages/sft.py) into a scratch folder, one after the other,
in this process. The loss curve is the Trainer's logged loss at the same steps; `max_abs_loss_diff` and
`speedup` are against fp32 (padding_free: against fp32_untruncated) at those steps. Tokens/s and the fraction of the fp32 bound are the stage's own figures
(posttrain/training/throughput.py). One run per variant: the note says what else was running.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import run_record  # bench/run_record.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"fp32": {}, "fp32_untruncated": {"max_length": None},
            "padding_free": {"padding_free": True, "max_length": None}, "bf16": {"bf16": True}}
COMPARED_WITH = {"padding_free": "fp32_untruncated"}  # same examples, same lengths; the rest: fp32


def run_variant(workspace: Path, overrides: dict, scratch: Path) -> dict:
    """The SFT stage with `overrides` on the workspace's params; its loss curve and throughput."""
    import dataclasses

    from posttrain.config.loader import load_params
    from posttrain.io import read_json
    from posttrain.stages import sft

    params = load_params(workspace / "params.yaml")
    params = dataclasses.replace(params, sft=dataclasses.replace(params.sft, training=params.sft.training | overrides))
    started = time.perf_counter()
    sft.run(params, workspace / "data" / "prepared" / "train.jsonl", workspace / "models" / "base",
            scratch / "adapter", checkpoint_dir=scratch / "checkpoints")
    seconds = time.perf_counter() - started
    history = read_json(scratch / "adapter" / "train_log.json")
    throughput = sft.metrics(scratch / "adapter")
    return {
        "overrides": overrides,
        "stage_seconds": round(seconds, 1),
        "train_runtime": round(throughput["train_runtime"], 1),
        "tokens_per_s": round(throughput["throughput_tokens_per_s"], 1),
        "fraction_of_fp32_bound": round(throughput["throughput_fraction_of_fp32_bound"], 3),
        "loss_by_step": {int(e["step"]): round(e["loss"], 4) for e in history if "loss" in e},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, type=Path,
                        help="a folder where the quick GSM8K pipeline ran (data/prepared, models/base)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, fp32 first (default: %(default)s)")
    parser.add_argument("--note", default="", help="what else was running, how many runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sft_variants.json", help="results file")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",")]
    if not chosen or chosen[0] != "fp32" or set(chosen) - set(VARIANTS):
        parser.error(f"--variants: fp32 first, then any of {list(VARIANTS)}")
    for needed in ("data/prepared/train.jsonl", "models/base"):
        if not (args.workspace / needed).exists():
            parser.error(f"--workspace: {args.workspace / needed} not found (run the quick GSM8K pipeline there first)")

    from posttrain.io import write_json

    os.chdir(args.workspace)  # the stage resolves the task's data folders from the workspace
    rows = {}
    for name in chosen:
        with tempfile.TemporaryDirectory(prefix=f"sft-{name}-") as scratch:
            rows[name] = run_variant(args.workspace.resolve(), VARIANTS[name], Path(scratch))
        print(name, {k: v for k, v in rows[name].items() if k != "loss_by_step"}, file=sys.stderr)
    for name, row in rows.items():
        row["compared_with"] = COMPARED_WITH[name] if COMPARED_WITH.get(name) in rows else "fp32"
        reference = rows[row["compared_with"]]
        common = set(row["loss_by_step"]) & set(reference["loss_by_step"])
        row["max_abs_loss_diff"] = round(max((abs(row["loss_by_step"][s] - reference["loss_by_step"][s])
                                              for s in common), default=0.0), 4)
        row["speedup"] = round(reference["train_runtime"] / row["train_runtime"], 2)
    write_json(args.out, {"workspace": str(args.workspace), "variants": rows} | run_record.conditions(args.note))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
