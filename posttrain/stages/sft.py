"""Stage `sft`: LoRA / DoRA supervised fine-tuning on the task's user message -> reference reply.

    posttrain stage sft              # or: dvc repro sft

TRL's SFTTrainer on a prompt-completion dataset computes the loss on the completion only, so
the prompt (GSM8K: the question; style: the plain text; and the system prompt) is masked out. `sft.lora` holds LoraConfig fields (use_dora:
true gives DoRA), `sft.training` SFTConfig fields. An interrupted run resumes from the last
checkpoint kept under checkpoints/sft.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from posttrain.config.schema import Params
from posttrain.io import atomic_path, read_jsonl, write_json
from posttrain.evaluation.prompts import sft_example
from posttrain.tasks import registry
from posttrain.training.throughput import throughput_callback, throughput_of
from posttrain.training.trainer import load_causal_lm, lora_config, summary_of, train_resumable, trainer_kwargs


def build_dataset(records: list[dict], params: Params):
    from datasets import Dataset

    limit = params.sft.max_examples or len(records)
    task = registry.get(params.data.task)
    return Dataset.from_list([sft_example(r, params.eval, task) for r in records[:limit]])


def run(params: Params, train_path: str | Path, base_dir: str | Path, out_dir: str | Path,
        checkpoint_dir: str | Path = "checkpoints/sft") -> dict:
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from posttrain.training import distributed

    set_seed(params.seed)  # before any weights are built: LoRA A and heads start the same every run
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_causal_lm(base_dir, params.sft.quantization, params.sft.training.get("gradient_checkpointing", True),
                           field="sft.quantization")
    dataset = build_dataset(read_jsonl(train_path), params)
    lora = lora_config(params.sft.lora)
    # Count the non-padding tokens trained on (the Trainer keeps the count in its checkpoints): tokens/s below.
    args = SFTConfig(**{"include_num_input_tokens_seen": "non_padding"}
                     | trainer_kwargs(params.sft.training, checkpoint_dir, params.seed))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                         callbacks=[throughput_callback("sft")])
    train_resumable(trainer, checkpoint_dir, "SFT", dataclasses.asdict(params.sft), params.seed, str(base_dir),
                    params.eval.prompt_style, params.eval.system_prompt)
    # Every rank calls save_model: under FSDP / ZeRO-3 it gathers the sharded adapter; rank 0 writes it.
    trainer.save_model(str(Path(checkpoint_dir) / "final"))
    if not distributed.is_main():
        return {"adapter": Path(out_dir)}  # under a launcher rank 0 writes the output and cleans up
    with atomic_path(out_dir, is_dir=True) as tmp:
        # the adapter only (and the tokenizer); training_args.bin is a pickle that only served the trainer
        shutil.copytree(Path(checkpoint_dir) / "final", tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("training_args.bin"))
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_log.json", trainer.state.log_history)
    # The finished adapter is the stage's output; checkpoints only served a possible resume.
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"adapter": Path(out_dir)}


def metrics(out_dir: str | Path) -> dict[str, float]:
    from posttrain.io import read_json

    history = read_json(Path(out_dir) / "train_log.json")
    return summary_of(history, ("loss", "mean_token_accuracy")) | {
        # the last entry: transformers logs the running train_runtime at every logging step, the total at the end
        "train_runtime": float(next((e["train_runtime"] for e in reversed(history) if "train_runtime" in e), 0.0))
    } | throughput_of(history)
