"""Training throughput against this machine's compute bound, reported by the SFT and GRPO stages.

The bound is the fp32 matmul rate measured on the model's device at the end of training (torch, 2048 x 2048,
best of 5, about half a second). FLOP per token, with N = the model's frozen (base) parameters and
n = the adapter's trainable parameters:

  evaluation (greedy decode)    2N           one forward per kept token
  SFT with LoRA                 4N + 6n      forward 2N, backward to the activations 2N (through the frozen
                                             weights), weight gradients for the adapter only (6n with its own
                                             forward and backward); full fine-tuning would be 6N
  GRPO with LoRA (beta 0)       6N + 6n      generating the completion 2N, then the SFT cost on the prompt
                                             and completion (no reference forward at beta 0)

Tokens are the Trainer's `num_input_tokens_seen` (prompt and completion, padding excluded) counted by
this process only, over this process's training time: a resumed run reports what it trained itself.
Attention's own FLOP are left out (short sequences), so the fraction slightly understates the work.
"""

from __future__ import annotations

import time

def flop_per_token(kind: str, n_frozen: int, n_trainable: int) -> int:
    return {"eval": 2 * n_frozen, "sft": 4 * n_frozen + 6 * n_trainable,
            "grpo": 6 * n_frozen + 6 * n_trainable}[kind]


def matmul_gflops(dtype_name: str = "float32", size: int = 2048, repeats: int = 5, device="cpu") -> float:
    """The matmul rate in GFLOP/s on `device` (the model's): the compute bound the fractions are taken against."""
    import torch

    dtype, device = getattr(torch, dtype_name), torch.device(device)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def parameter_counts(model) -> tuple[int, int]:
    """(frozen, trainable) parameters; a tied embedding is counted once (model.parameters() dedups it)."""
    frozen = trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return frozen, trainable


def throughput_callback(kind: str):
    """A TrainerCallback that appends one `throughput/*` entry to the log history when training ends."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # After a resume's state is loaded: only what this process trains is counted.
            self.tokens_at_start, self.started = state.num_input_tokens_seen, time.perf_counter()

        def on_train_end(self, args, state, control, model=None, **kwargs):
            seconds = time.perf_counter() - self.started
            tokens = state.num_input_tokens_seen - self.tokens_at_start
            if model is None or tokens <= 0 or seconds <= 0:
                return
            frozen, trainable = parameter_counts(model)
            per_token = flop_per_token(kind, frozen, trainable)
            bound = matmul_gflops("float32", device=next(model.parameters()).device)
            state.log_history.append({
                "step": state.global_step,
                "throughput/tokens": float(tokens), "throughput/seconds": seconds,
                "throughput/tokens_per_s": tokens / seconds, "throughput/flop_per_token": float(per_token),
                "throughput/fp32_matmul_gflops": bound,
                "throughput/fraction_of_fp32_bound": tokens / seconds * per_token / (bound * 1e9),
            })

    return Throughput()


def throughput_of(log_history: list[dict]) -> dict[str, float]:
    """The throughput entry of a log history, as stage metrics (empty when training counted no tokens)."""
    entry = next((e for e in reversed(log_history) if "throughput/tokens_per_s" in e), {})
    return {key.replace("/", "_"): float(value) for key, value in entry.items() if key.startswith("throughput/")}
