"""Stage `merge`: fold a LoRA/DoRA adapter into its base model and save a plain HF folder.

    posttrain stage merge            # or: dvc repro merge
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import Params
from posttrain.io import atomic_path, require_safetensors


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    require_safetensors(adapter_dir)  # PEFT would fall back to a pickled adapter_model.bin
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def run(params: Params, base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> dict:
    from transformers import AutoTokenizer

    merged = merge_adapter(base_dir, adapter_dir)
    return {"model": save_model(merged, AutoTokenizer.from_pretrained(adapter_dir), out_dir)}
