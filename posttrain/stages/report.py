"""Stage `report`: pictures of the run, for people (PNG, logged to MLflow) and for `dvc plots` (JSON).

    posttrain stage report           # or: dvc repro report ; dvc plots diff to compare experiments

training.png   SFT loss, RL reward and KL, reward-model loss against the step
accuracy.png   the task's pass rates per model (GSM8K: strict / flexible), with the gate decision in the title
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import Params
from posttrain.io import atomic_path, read_json, write_json
from posttrain.release.gate import summary_key

CURVES = (  # (panel title, run() argument holding the train_log.json, log key)
    ("SFT loss", "sft_log", "loss"),
    ("RL reward", "rl_log", "reward"),
    ("RL KL to reference", "rl_log", "kl"),
    ("reward model loss", "rm_log", "loss"),
)


def curve(log_path: Path, key: str) -> list[dict]:
    if not log_path.exists():
        return []
    return [{"step": int(e["step"]), key: float(e[key])} for e in read_json(log_path) if key in e and "step" in e]


def run(params: Params, sft_log: Path, rl_log: Path, rm_log: Path, eval_base: Path, eval_sft: Path, eval_rl: Path,
        promotion: Path, out_dir: str | Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    logs = {"sft_log": Path(sft_log), "rl_log": Path(rl_log), "rm_log": Path(rm_log)}
    curves = {(title, key): curve(logs[arg], key) for title, arg, key in CURVES}
    accuracy = []
    for model, path in (("base", Path(eval_base)), ("sft", Path(eval_sft)), ("rl", Path(eval_rl))):
        if path.exists():
            data = read_json(path)
            # pass_rate: what the gate decides on (promote.metric), the one series `dvc plots` draws
            accuracy.append({"model": model, "pass_rate": data[summary_key(data, params.promote.metric)],
                             **{k: v for k, v in data.items() if k.startswith("accuracy_")}})
    promotion = Path(promotion)
    decision = read_json(promotion) if promotion.exists() else {}

    with atomic_path(out_dir, is_dir=True) as tmp:
        fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
        for ax, ((title, key), points) in zip(axes, curves.items()):
            ax.set_title(title)
            ax.set_xlabel("step")
            if points:
                ax.plot([p["step"] for p in points], [p[key] for p in points], marker="o", markersize=3)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(tmp / "training.png", dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.6))
        width = 0.8 / max(1, sum(k.startswith("accuracy_") for k in (accuracy[0] if accuracy else {})))
        xs = range(len(accuracy))
        series = [k for k in (accuracy[0] if accuracy else {}) if k.startswith("accuracy_")]
        for i, key in enumerate(series):
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar([x + offset for x in xs], [a[key] for a in accuracy], width, label=key.removeprefix("accuracy_"))
        ax.set_xticks(list(xs), [a["model"] for a in accuracy])
        ax.set_ylabel(f"{params.data.task} pass rate")
        n = read_json(eval_rl)["n_questions"] if Path(eval_rl).exists() else "?"
        verdict = "promoted" if decision.get("promote") else "rejected" if decision else "no gate yet"
        ax.set_title(f"{n:.0f} questions, gate: {verdict}" if isinstance(n, float) else f"gate: {verdict}")
        ax.set_ylim(0, min(1.05, max([0.1] + [a[k] * 1.25 for a in accuracy for k in series])))
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(tmp / "accuracy.png", dpi=110)
        plt.close(fig)

        for (title, key), points in curves.items():
            write_json(tmp / f"{title.split()[0].lower()}_{key}.json", points)
        write_json(tmp / "accuracy.json", accuracy)
    return {"plots": Path(out_dir)}


def metrics(out_dir: str | Path) -> dict[str, float]:
    return {"n_plots": float(len(list(Path(out_dir).glob("*.png"))))}
