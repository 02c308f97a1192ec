"""Read a finished run's workspace and record what its models did: each model's pass rates and
well-formedness rates, the gate's decision, RL against SFT, how far RL moved, and N items side by side.

    .venv/bin/python bench/verdicts.py --workspace <ws> --out bench/results/style_quick.json --note "..."

The workspace is one `posttrain run` left (a clone with reports/); nothing is rerun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_record  # noqa: E402

KEEP = ("accuracy_", "truncation_rate", "repetition_rate", "copy_rate", "degenerate_rate", "length_ratio_median",
        "judge_margin_mean", "judge_p_poem_mean", "content_mean", "n_questions", "gen_length_mean", "protocol_hash")


def main(argv: list[str] | None = None) -> int:
    from posttrain.io import read_json
    from posttrain.pipeline.summary import collect, render, show

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True, help="a folder a `posttrain run` finished in")
    parser.add_argument("--show", type=int, default=20, help="items side by side to keep (default: %(default)s)")
    run_record.add_arguments(parser, Path("bench/results/verdicts.json"))
    args = parser.parse_args(argv)
    ws = Path(args.workspace)
    reports = ws / "reports"
    if not (reports / "promotion.json").exists():
        print(f"error: {reports / 'promotion.json'} not found: run the pipeline in {ws} first", file=sys.stderr)
        return 2
    models = {m: {k: v for k, v in read_json(reports / f"eval_{m}.json").items() if k.startswith(KEEP)}
              for m in ("base", "sft", "rl") if (reports / f"eval_{m}.json").exists()}
    result = {"task": collect(ws).get("task"), "models": models, "promotion": read_json(reports / "promotion.json"),
              "rl_stage": read_json(reports / "rl.json") if (reports / "rl.json").exists() else {},
              "summary": render(collect(ws)).splitlines(), "show": show(ws, args.show).splitlines()}
    return run_record.write(result, args)


if __name__ == "__main__":
    sys.exit(main())
