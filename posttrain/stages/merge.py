"""Stage `merge`: fold a LoRA/DoRA adapter into its base model and save a plain HF folder.

    posttrain stage merge            # or: dvc repro merge
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config.schema import Params
from posttrain.io import DataError, atomic_path, read_json, require_safetensors
from posttrain.release.modelstore import write_lineage

ADAPTER_PREFIX = "base_model.model."


def _shapes(files) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            shapes |= {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    return shapes


def _expected_base_shape(name: str, shape: tuple[int, ...]) -> tuple[str, int | None, object]:
    """For one adapter tensor: the base weight it attaches to, and which of its dimensions must equal what."""
    for marker, dim, size in ((".lora_A.", 1, shape[-1]), (".lora_B.", 0, shape[0]),
                              (".lora_embedding_A", 0, shape[-1]), (".lora_embedding_B", 1, shape[0]),
                              (".lora_magnitude_vector", 0, shape[0])):
        if marker in name:
            return name.split(marker)[0] + ".weight", dim, size
    return name.replace(".modules_to_save.default", ""), None, shape  # a fully saved module: same shape


def check_adapter_fits(base_model, base_dir: str | Path, adapter_dir: str | Path) -> None:
    """Refuse, in one line naming the adapter and both bases, an adapter whose tensors do not fit
    `base_model` (loaded from `base_dir`): trained on another architecture or size. PEFT would stop
    with a shape-mismatch traceback or skip the modules it cannot find."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise DataError(f"{adapter_dir}: no adapter_config.json: not a PEFT adapter folder")
    trained_on = read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    base_shapes = {name: tuple(tensor.shape) for name, tensor in base_model.state_dict().items()}
    for name, shape in _shapes(sorted(adapter_dir.glob("adapter_model*.safetensors"))).items():
        short = name.removeprefix(ADAPTER_PREFIX)
        target, dim, size = _expected_base_shape(short, shape)
        have = base_shapes.get(target)
        if have is None:
            problem = f"it adapts '{target.removesuffix('.weight')}', which the base does not have"
        elif dim is None and have != tuple(size):
            problem = f"'{target}' is {list(size)} in the adapter, {list(have)} in the base"
        elif dim is not None and (len(have) <= dim or have[dim] != size):
            problem = f"'{short}' is {list(shape)}, which does not fit the base's '{target}' {list(have)}"
        else:
            continue
        raise DataError(f"{adapter_dir}: adapter trained on base '{trained_on}' does not fit base '{base_dir}': {problem}")


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    require_safetensors(base_dir)
    require_safetensors(adapter_dir)  # PEFT would fall back to a pickled adapter_model.bin
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    check_adapter_fits(base, base_dir, adapter_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def save_model(model, tokenizer, out_dir: str | Path, made_from: tuple[Path, Path] | None = None) -> Path:
    """made_from: (base, adapter) folders, recorded so promote can register the adapter instead of this copy."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if made_from:
            write_lineage(tmp, *made_from)
    return Path(out_dir)


def run(params: Params, base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> dict:
    from transformers import AutoTokenizer

    merged = merge_adapter(base_dir, adapter_dir)
    return {"model": save_model(merged, AutoTokenizer.from_pretrained(adapter_dir), out_dir,
                                made_from=(Path(base_dir), Path(adapter_dir)))}
