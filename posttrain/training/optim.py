"""Optimizers and LR schedules by name for the own training loops (reinforce, hybrid).

A name is looked up where the libraries keep it, in this order; nothing here lists names itself:

    optimizer  1. a TrainingArguments `optim` name (adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, sgd, ...):
                  the class and kwargs the HF Trainer would build (Trainer.get_optimizer_cls_and_kwargs)
               2. a class of bitsandbytes.optim, then of torch.optim, by its name with case and '_' ignored:
                  adam_8bit -> Adam8bit, paged_adam_32bit -> PagedAdam32bit, sgd_8bit -> SGD8bit, ...
    schedule   1. a TrainingArguments `lr_scheduler_type` (linear, cosine, cosine_with_min_lr, ...): transformers'
                  get_scheduler with warm-up, total steps and `lr_scheduler_kwargs`
               2. `none`: the learning rate stays where it is (what the assignment means by it)
               3. a class of torch.optim.lr_scheduler by its name, 'LR' suffix optional: step -> StepLR,
                  multistep -> MultiStepLR, cosineannealing_warm_restarts -> CosineAnnealingWarmRestarts, ...

Kwargs: an optimizer class gets `lr` = learning_rate and the given kwargs; a schedule class only the given
kwargs (StepLR needs step_size, OneCycleLR max_lr and total_steps (default: max_steps), ...).
`reduce_lr_on_plateau` watches the mean reward (mode max unless its kwargs say otherwise) and is stepped
only with it.

    rl:
      optimizer: {name: paged_adam_32bit, kwargs: {betas: [0.9, 0.95]}}   # empty name: rl.training.optim
      lr_scheduler: {name: step, kwargs: {step_size: 100, gamma: 0.5}}     # empty name: lr_scheduler_type
"""

from __future__ import annotations

import inspect

import torch


def _key(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _find_class(module, name: str, suffix: str = ""):
    wanted = _key(name)
    for attr, value in vars(module).items():
        if inspect.isclass(value) and not attr.startswith("_") and _key(attr) in (wanted, wanted + suffix.lower()):
            return value
    return None


def _optimizer_classes():
    import bitsandbytes.optim

    return (bitsandbytes.optim, torch.optim)


def optimizer_class(name: str):
    """(library, class) for a name that TrainingArguments does not know, or None."""
    from transformers.training_args import OptimizerNames

    if name in {o.value for o in OptimizerNames}:
        return None
    for module in _optimizer_classes():
        cls = _find_class(module, name)
        if cls is not None and issubclass(cls, torch.optim.Optimizer):
            return cls
    raise ValueError(f"unknown optimizer {name!r}: neither a TrainingArguments optim name nor a class of "
                     f"bitsandbytes.optim or torch.optim")


def scheduler_class(name: str):
    """The torch.optim.lr_scheduler class for a name TrainingArguments does not know; None for its own names
    and for `none`."""
    from transformers.trainer_utils import SchedulerType

    if name in {s.value for s in SchedulerType} or name == "none":
        return None
    cls = _find_class(torch.optim.lr_scheduler, name, suffix="lr")
    if cls is None or not issubclass(cls, torch.optim.lr_scheduler.LRScheduler):
        raise ValueError(f"unknown lr scheduler {name!r}: neither a TrainingArguments lr_scheduler_type, `none`, "
                         f"nor a class of torch.optim.lr_scheduler")
    return cls


def check_names(optimizer: dict, lr_scheduler: dict) -> None:
    """Refuse unknown names and kwargs a class does not take, before a stage starts."""
    for section, resolve in ((optimizer, optimizer_class), (lr_scheduler, scheduler_class)):
        name = section.get("name") or ""
        if not name:
            continue
        cls = resolve(name)
        kwargs = section.get("kwargs") or {}
        if cls is not None:
            params = inspect.signature(cls.__init__).parameters
            unknown = [k for k in kwargs if k not in params and not any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())]
            if unknown:
                raise ValueError(f"{cls.__module__}.{cls.__name__} takes no {', '.join(unknown)}")


def build_optimizer(trainable: list[torch.nn.Parameter], args, model=None, name: str = "", kwargs: dict | None = None):
    """The optimizer for `trainable`: `name` (or args.optim when empty) resolved as the module docstring says."""
    import dataclasses

    from transformers import Trainer

    name = name or str(getattr(args.optim, "value", args.optim))
    cls = optimizer_class(name)
    if cls is None:  # TrainingArguments' own name: the class and kwargs the Trainer would use
        named = args if name == str(getattr(args.optim, "value", args.optim)) else dataclasses.replace(args, optim=name)
        cls, library_kwargs = Trainer.get_optimizer_cls_and_kwargs(named, model)
        return cls(trainable, **library_kwargs | dict(kwargs or {}))
    return cls(trainable, **{"lr": args.learning_rate} | dict(kwargs or {}))


def build_scheduler(optimizer, args, name: str = "", kwargs: dict | None = None):
    """The LR schedule over args.max_steps optimizer steps: `name` with `kwargs`, or when `name` is empty
    args.lr_scheduler_type with args.lr_scheduler_kwargs (under `kwargs`)."""
    from transformers import get_scheduler

    if name:
        kwargs = dict(kwargs or {})
    else:
        name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        kwargs = dict(args.lr_scheduler_kwargs or {}) | dict(kwargs or {})
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    cls = scheduler_class(name)
    if cls is None:
        if name == "reduce_lr_on_plateau":
            kwargs = {"mode": "max"} | kwargs  # it watches the mean reward, which should rise
        return get_scheduler(name, optimizer, num_warmup_steps=args.get_warmup_steps(args.max_steps),
                             num_training_steps=args.max_steps, scheduler_specific_kwargs=kwargs)
    if cls is torch.optim.lr_scheduler.OneCycleLR:
        kwargs = {"max_lr": args.learning_rate, "total_steps": args.max_steps} | kwargs
    return cls(optimizer, **kwargs)


def needs_metric(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def step_scheduler(scheduler, metric: float | None) -> None:
    """One schedule step after an optimizer step; a plateau schedule steps only when there is a metric."""
    if needs_metric(scheduler):
        if metric is not None:
            scheduler.step(metric)
    else:
        scheduler.step()


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
