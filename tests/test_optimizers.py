"""Optimizers and LR schedules are picked by their TrainingArguments names, 8-bit bitsandbytes ones included."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("optim, expected", [("adamw_torch", "torch.optim.adamw.AdamW"),
                                             ("adamw_bnb_8bit", "bitsandbytes 8-bit"),
                                             ("paged_adamw_8bit", "bitsandbytes 8-bit paged"), ("sgd", "torch.optim.sgd.SGD")])
def test_optimizer_and_schedule_by_name_take_a_step(optim, expected, tmp_path):
    from trl import GRPOConfig

    from posttrain.reinforce import optimizer_and_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 1))
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, optim=optim, learning_rate=1e-2,
                      lr_scheduler_type="cosine", warmup_steps=1, max_steps=4, report_to="none")
    optimizer, scheduler, trainable = optimizer_and_scheduler(model, args)
    kind = type(optimizer)
    before = [p.detach().clone() for p in trainable]
    lrs = []
    for _ in range(3):
        loss = model(torch.randn(8, 128)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
    if expected.startswith("bitsandbytes"):
        # 8-bit state for the 128x128 weight (bitsandbytes keeps tensors under 4096 values in 32 bits)
        assert kind.__module__.startswith("bitsandbytes")
        assert optimizer.state[trainable[0]]["state1"].dtype == torch.uint8
        assert optimizer.is_paged == expected.endswith("paged")
    else:
        assert f"{kind.__module__}.{kind.__name__}" == expected
    assert lrs[0] == pytest.approx(1e-2) and lrs[2] < lrs[0]  # warm-up done, then cosine decay
