"""QLoRA: `sft.quantization: 4bit` trains a LoRA adapter on a frozen nf4 base (bitsandbytes on CPU).

    .venv/bin/python -m pytest tests/test_qlora.py -q
"""

import dataclasses

import pytest
import torch

from posttrain.stages import merge

from posttrain.stages import sft

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _base_linears(model) -> dict:
    return {name: module for name, module in model.named_modules()
            if name.endswith(PROJECTIONS)}


def _quantized_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@pytest.mark.parametrize("mode, layer, dtype", [("4bit", "Linear4bit", torch.uint8), ("8bit", "Linear8bitLt", torch.int8)])
def test_quantized_load_puts_every_projection_in_bitsandbytes_layers(tiny_base, mode, layer, dtype):
    from posttrain.training.trainer import load_causal_lm

    full = load_causal_lm(tiny_base, "none")
    quantized = load_causal_lm(tiny_base, mode, gradient_checkpointing=False)
    linears = _base_linears(quantized)
    assert len(linears) == len(PROJECTIONS) * full.config.num_hidden_layers
    assert all(type(m).__name__ == layer and m.weight.dtype == dtype for m in linears.values()), linears
    if mode == "4bit":
        assert {m.weight.quant_state.quant_type for m in linears.values()} == {"nf4"}
    assert quantized.get_memory_footprint() < full.get_memory_footprint()
    # prepare_model_for_kbit_training: everything left unquantized is fp32 and frozen until LoRA is added
    assert not any(p.requires_grad for p in quantized.parameters())
    assert quantized.model.norm.weight.dtype == torch.float32
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        close = torch.nn.functional.cosine_similarity(quantized(ids).logits.flatten(), full(ids).logits.flatten(), dim=0)
    assert close > 0.9  # the same network, at lower precision


def test_unknown_quantization_is_a_one_line_error_naming_file_line_and_field(tiny_base, tmp_path):
    from posttrain.config.loader import load_params
    from posttrain.config.schema import ConfigError
    from posttrain.training.trainer import load_causal_lm

    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 1\nsft:\n  max_examples: 4\n  quantization: 3bit\n")
    with pytest.raises(ConfigError, match=r"params.yaml:4: 'sft.quantization' must be one of none, 4bit, 8bit, got '3bit'"):
        load_params(bad, check_library_fields=False)
    with pytest.raises(ConfigError, match=r"sft.quantization: unknown value '3bit' \(one of: none, 4bit, 8bit\)"):
        load_causal_lm(tiny_base, "3bit", field="sft.quantization")


@pytest.mark.slow
def test_qlora_sft_trains_the_adapter_on_a_4bit_base(params, prepared, tiny_base, tmp_path, monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    seen = {}
    original_train = SFTTrainer.train

    def spy(self, *args, **kwargs):  # records what the trainer really trains, then trains
        seen["quantized"] = len(_quantized_layers(self.model))
        seen["lora_before"] = {k: v.detach().float().clone() for k, v in self.model.named_parameters() if "lora_" in k}
        seen["trainable_outside_lora"] = [k for k, v in self.model.named_parameters() if v.requires_grad and "lora_" not in k]
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", spy)
    p = dataclasses.replace(params, sft=dataclasses.replace(
        params.sft, quantization="4bit", lora=params.sft.lora | {"lora_dropout": 0.0},
        training=params.sft.training | {"learning_rate": 1e-2, "max_steps": 3, "logging_steps": 1,
                                        "optim": "paged_adamw_8bit", "gradient_checkpointing": True}))
    out = tmp_path / "qlora_adapter"
    sft.run(p, prepared / "train.jsonl", tiny_base, out, checkpoint_dir=tmp_path / "ckpt")

    layers = AutoModelForCausalLM.from_pretrained(tiny_base).config.num_hidden_layers
    assert seen["quantized"] == len(PROJECTIONS) * layers  # the trained base really was 4-bit
    assert seen["trainable_outside_lora"] == []  # only the adapter trains
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    before = {k.replace(".default", ""): v for k, v in seen["lora_before"].items()}
    changed = [k for k, v in adapter.items() if not torch.allclose(v.float(), before[k], atol=1e-6)]
    assert len(changed) == len(adapter)  # every LoRA matrix moved (A from its init, B from zero)
    assert not (tmp_path / "ckpt").exists()
    # The adapter is an ordinary LoRA adapter: it loads on the full-precision base and merges (stage merge).
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(out))
    merged = merge.run(p, tiny_base, out, tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists() and merged
