"""Optimizers and LR schedules are picked by their TrainingArguments names, 8-bit bitsandbytes ones included."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("optim, expected", [("adamw_torch", "torch.optim.adamw.AdamW"),
                                             ("adamw_bnb_8bit", "bitsandbytes 8-bit"),
                                             ("paged_adamw_8bit", "bitsandbytes 8-bit paged"), ("sgd", "torch.optim.sgd.SGD")])
@pytest.mark.slow  # optimizer steps: training, however small
def test_optimizer_and_schedule_by_name_take_a_step(optim, expected, tmp_path):
    from trl import GRPOConfig

    from posttrain.methods.reinforce import optimizer_and_scheduler

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


def _args(tmp_path, **kw):
    from trl import GRPOConfig

    return GRPOConfig(**{"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": "none",
                         "learning_rate": 1e-2, "max_steps": 8} | kw)


def _one_step(optimizer, scheduler, trainable):
    before = [p.detach().clone() for p in trainable]
    loss = sum(p.pow(2).sum() for p in trainable)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable)), "the step moved nothing"


# The assignment's optimizer names that TrainingArguments lacks: each is the bitsandbytes class of that name.
@pytest.mark.parametrize("name, cls, kwargs", [
    ("adam_8bit", "Adam8bit", {}), ("adam_32bit", "Adam32bit", {}), ("paged_adam_8bit", "PagedAdam8bit", {}),
    ("paged_adam_32bit", "PagedAdam32bit", {}), ("adagrad_8bit", "Adagrad8bit", {}),
    ("adagrad_32bit", "Adagrad32bit", {}), ("sgd_8bit", "SGD8bit", {"momentum": 0.9}),
    ("adamw_32bit", "AdamW32bit", {"weight_decay": 0.1}),
])
@pytest.mark.slow  # optimizer steps: training, however small
def test_assignment_optimizer_names_build_the_bitsandbytes_class(name, cls, kwargs, tmp_path):
    import bitsandbytes.optim

    from posttrain.training import optim

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 1))
    trainable = list(model.parameters())
    optimizer = optim.build_optimizer(trainable, _args(tmp_path), model, name, kwargs)
    assert type(optimizer) is getattr(bitsandbytes.optim, cls)
    assert optimizer.defaults["lr"] == 1e-2
    if name == "sgd_8bit":  # bitsandbytes keeps SGD's momentum as betas[0]
        assert optimizer.defaults["betas"][0] == 0.9
    assert all(optimizer.defaults[k] == v for k, v in kwargs.items() if k != "momentum")
    _one_step(optimizer, optim.build_scheduler(optimizer, _args(tmp_path)), trainable)
    state = optimizer.state[trainable[0]]["state1"]
    assert state.dtype == (torch.uint8 if "8bit" in name else torch.float32)


# The assignment's schedule names: torch.optim.lr_scheduler classes by name ('LR' optional), `none` = constant.
@pytest.mark.parametrize("name, cls, kwargs, lrs", [
    ("step", "StepLR", {"step_size": 2, "gamma": 0.5}, [1e-2, 5e-3, 5e-3, 2.5e-3]),
    ("multistep", "MultiStepLR", {"milestones": [1, 3], "gamma": 0.1}, [1e-3, 1e-3, 1e-4, 1e-4]),
    ("exponential", "ExponentialLR", {"gamma": 0.5}, [5e-3, 2.5e-3, 1.25e-3, 6.25e-4]),
    ("cosineannealing", "CosineAnnealingLR", {"T_max": 4}, [8.5355e-3, 5e-3, 1.4645e-3, 0.0]),
    ("cosineannealing_warm_restarts", "CosineAnnealingWarmRestarts", {"T_0": 2}, [5e-3, 1e-2, 5e-3, 1e-2]),
    ("onecycle", "OneCycleLR", {}, None),
    ("cyclic", "CyclicLR", {"base_lr": 1e-3, "max_lr": 1e-2, "step_size_up": 2}, [5.5e-3, 1e-2, 5.5e-3, 1e-3]),
    ("none", "LambdaLR", {}, [1e-2] * 4),
])
@pytest.mark.slow  # optimizer steps: training, however small
def test_assignment_schedule_names_build_the_torch_class(name, cls, kwargs, lrs, tmp_path):
    from posttrain.training import optim

    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=1e-2)
    scheduler = optim.build_scheduler(optimizer, _args(tmp_path), name, kwargs)
    assert type(scheduler) is getattr(torch.optim.lr_scheduler, cls)
    seen = []
    for _ in range(4):
        _one_step(optimizer, scheduler, [weight])
        seen.append(optim.current_lr(optimizer))
    if lrs is None:  # one cycle over max_steps (8) up to max_lr = learning_rate: rising over the first 30%
        assert scheduler.total_steps == 8 and optimizer.param_groups[0]["max_lr"] == 1e-2
        assert seen[0] < seen[1] and max(seen) > 0.9e-2
    else:
        assert seen == pytest.approx(lrs, rel=1e-3, abs=1e-9)


def test_unknown_names_and_kwargs_are_refused(tmp_path):
    from posttrain.training import optim

    with pytest.raises(ValueError, match="unknown optimizer 'adam_7bit'"):
        optim.optimizer_class("adam_7bit")
    with pytest.raises(ValueError, match="unknown lr scheduler 'steplike'"):
        optim.scheduler_class("steplike")
    with pytest.raises(ValueError, match="StepLR takes no stepsize"):
        optim.check_names({}, {"name": "step", "kwargs": {"stepsize": 3}})
    optim.check_names({"name": "paged_adam_8bit", "kwargs": {"betas": [0.9, 0.95]}}, {"name": "cosine"})


@pytest.mark.slow  # optimizer steps: training, however small
def test_cosine_with_min_lr_gets_its_kwargs_and_plateau_waits_for_a_metric(tmp_path):
    from posttrain.training import optim

    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=1e-2)
    args = _args(tmp_path, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-3}, max_steps=4)
    scheduler = optim.build_scheduler(optimizer, args)  # dropping lr_scheduler_kwargs raised here before
    for _ in range(4):
        _one_step(optimizer, scheduler, [weight])
    assert optim.current_lr(optimizer) == pytest.approx(1e-3)

    optimizer = torch.optim.SGD([weight], lr=1e-2)
    # TrainingArguments refuses reduce_lr_on_plateau without an eval strategy: rl.lr_scheduler names it
    plateau = optim.build_scheduler(optimizer, _args(tmp_path), "reduce_lr_on_plateau", {"patience": 0, "factor": 0.5})
    assert plateau.mode == "max"  # it watches the mean reward
    optim.step_scheduler(plateau, None)  # no reward this step (an SFT step): not stepped at all
    assert plateau.last_epoch == 0 and optim.current_lr(optimizer) == 1e-2
    for reward in (1.0, 0.5):
        optim.step_scheduler(plateau, reward)
    assert optim.current_lr(optimizer) == pytest.approx(5e-3)  # the reward fell once: halved


@pytest.mark.slow  # optimizer steps: training, however small
def test_gradient_accumulation_over_k_micro_batches_equals_one_k_times_batch(tmp_path):
    """REINFORCE's step with SGD: 3 micro-batches of 2 rows move the weights as one batch of 6 rows."""
    import copy

    from peft import get_peft_model
    from posttrain.training.base_models import build_tiny_model

    from posttrain.methods import reinforce
    from posttrain.training.trainer import lora_config

    model, _ = build_tiny_model({}, seed=0)
    policy = get_peft_model(model, lora_config({"r": 4, "lora_alpha": 8, "init_lora_weights": False}))
    torch.manual_seed(1)
    prompt_length, width = 3, 8
    sequences = torch.randint(5, 200, (6, width))
    mask = torch.ones(6, width - prompt_length)
    mask[1, 3:] = 0  # a completion that stopped early
    attention = torch.cat([torch.ones(6, prompt_length, dtype=torch.long), mask.long()], 1)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.25])
    whole = reinforce.Rollout(sequences, attention, mask, prompt_length, rewards)
    parts = [reinforce.Rollout(sequences[i:i + 2], attention[i:i + 2], mask[i:i + 2], prompt_length, rewards[i:i + 2])
             for i in range(0, 6, 2)]
    settings = reinforce.Settings("k1", "token_mean", (-20.0, 0.0))
    moved = []
    for rollouts, k in (([whole], 1), (parts, 3)):
        p = copy.deepcopy(policy)
        args = _args(tmp_path, optim="sgd", learning_rate=0.5, beta=0.1, gradient_accumulation_steps=k, max_grad_norm=1e9)
        optimizer, scheduler, trainable = reinforce.optimizer_and_scheduler(p, args)
        before = [t.detach().clone() for t in trainable]
        entry = reinforce.train_step(p, rollouts, optimizer, scheduler, trainable, args, settings=settings)
        moved.append(([t.detach() - b for t, b in zip(trainable, before)], entry))
    (whole_delta, whole_log), (acc_delta, acc_log) = moved
    assert max(float(d.abs().max()) for d in whole_delta) > 1e-4
    for a, b in zip(whole_delta, acc_delta):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert acc_log["loss"] == pytest.approx(whole_log["loss"], rel=1e-4)
    assert acc_log["kl"] == pytest.approx(whole_log["kl"], rel=1e-4, abs=1e-7)
