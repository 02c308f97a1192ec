"""Stage `base`: materialise the base causal LM as a local Hugging Face folder (posttrain/training/base_models.py).

    posttrain stage base             # or: dvc repro base
"""

from __future__ import annotations

import math
from pathlib import Path

from posttrain.config.schema import Params
from posttrain.io import atomic_path
from posttrain.training.base_models import load_source


def run(params: Params, out_dir: str | Path) -> Path:
    model, tokenizer = load_source(params.base.source, params.base.tiny, params.seed)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def metrics(out_dir: str | Path) -> dict[str, float]:
    from safetensors import safe_open

    n_params = 0
    for shard in Path(out_dir).glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            for key in handle.keys():
                n_params += math.prod(handle.get_slice(key).get_shape())
    return {"n_parameters": float(n_params)}
