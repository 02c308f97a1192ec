"""The rewards a trainer gets from params: the registry of reward names, weighted sums, post-processing, the spec.

The reward functions themselves are in rule_based.py and model_based.py (TRL's contract
`(completions, **columns) -> list[float]`, posttrain/rewards/common.py); FACTORIES here is built from both.
`rl.rewards` in params.yaml takes one of two forms. A mapping of names to a weight or to {weight, ...options}:

    rewards:
      exact_match: 1.0
      format: 0.2
      rouge_l: {weight: 0.3}                     # rouge-score; bleu is sacrebleu's sentence BLEU / 100
      cosine_sts: {weight: 0.3, model: minilm}   # 0.5 * (cosine + 1) on all-MiniLM-L6-v2
      bertscore: {weight: 0.3}                   # bert-score F1 on the local all-MiniLM-L6-v2 folder
      perplexity: {weight: 0.1, model: models/base}   # -log ppl under a frozen local LM (output: ppl for raw)
      verifier: {weight: 0.5, model: models/reward_model}
      sentiment: {weight: 0.1, model: /path/to/local/classifier}   # no hub download, ever
    reward_postprocess: {clip: [-1, 2], scale: 1.0, normalize: true, ema_decay: 0.99}   # or an ordered chain

or a typed spec (the assignment's format), inline or as the path of a JSON file, taken as is:

    rewards: {"type": "weighted_sum", "components": [{"type": "bleu", "weight": 1.0,
              "postprocess": [{"type": "clip", "min": 0, "max": 1}]}, ...],
              "postprocess": [{"type": "scale", "mul": 2, "add": -1}, {"type": "normalize", "decay": 0.99}]}

A mapping without post-processing goes to the trainer as separate rewards (TRL weighs and logs each);
with post-processing, and always for a spec, they are folded into one weighted sum (divided by the sum
of the weights when `normalize_weights`, the default of a spec and off for a mapping) followed by the
ordered chain of steps: clip {min, max}, scale {mul, add}, normalize {decay, eps, per: sample | batch}
(exponential moving mean and variance, updated per sample by default). Steps can sit on any component
too. The mapping's {clip, scale, normalize} dict is the chain clip -> scale -> normalize (per batch).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Callable

from posttrain.rewards import model_based, rule_based
from posttrain.rewards.common import RewardFn, named

FACTORIES = {**rule_based.FACTORIES, **model_based.FACTORIES}  # every reward by name: what rl.rewards may name
assert len(FACTORIES) == len(rule_based.FACTORIES) + len(model_based.FACTORIES), "a reward name is registered twice"

# --------------------------------------------------------------------------- post-processing and weighted sums


class RunningNorm:
    """Per-batch EMA normalisation (`per: batch`): the batch's mean and variance move exponential moving
    statistics (the first batch sets them), and every value of the batch is normalised with them."""

    def __init__(self, decay: float = 0.99, eps: float = 1e-6):
        self.decay, self.eps = decay, eps
        self.mean, self.var, self.initialised = 0.0, 1.0, False

    def __call__(self, values: list[float]) -> list[float]:
        batch_mean = sum(values) / len(values)
        batch_var = sum((v - batch_mean) ** 2 for v in values) / len(values)
        if not self.initialised:
            self.mean, self.var, self.initialised = batch_mean, max(batch_var, self.eps), True
        else:
            self.mean = self.decay * self.mean + (1 - self.decay) * batch_mean
            self.var = self.decay * self.var + (1 - self.decay) * batch_var
        return [(v - self.mean) / math.sqrt(self.var + self.eps) for v in values]


class SampleNorm:
    """Per-sample EMA normalisation (`per: sample`, the assignment's): each value in turn updates an exponentially
    weighted mean and variance (starting at 0 and 1) and is normalised with them:

        delta = r - mean;  mean += (1 - decay) * delta;  var = decay * (var + (1 - decay) * delta**2)
        out = (r - mean) / sqrt(var + eps)
    """

    def __init__(self, decay: float = 0.99, eps: float = 1e-6):
        self.decay, self.eps = decay, eps
        self.mean, self.var = 0.0, 1.0

    def __call__(self, values: list[float]) -> list[float]:
        out = []
        for value in values:
            delta = value - self.mean
            self.mean += (1 - self.decay) * delta
            self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
            out.append((value - self.mean) / math.sqrt(self.var + self.eps))
        return out


# One post-processing step: {"type": <name>, ...its keys}. A chain is a list of them, applied in order.
POSTPROCESS_STEPS = {"clip": {"min", "max"}, "scale": {"mul", "add"}, "normalize": {"decay", "eps", "per"}}


def _check_step(step, where: str) -> None:
    if not isinstance(step, dict) or step.get("type") not in POSTPROCESS_STEPS:
        raise ValueError(f"{where}: a post-processing step is {{type: {' | '.join(POSTPROCESS_STEPS)}, ...}}, "
                         f"got {step!r}")
    unknown = set(step) - POSTPROCESS_STEPS[step["type"]] - {"type"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for {step['type']}; "
                         f"known: {sorted(POSTPROCESS_STEPS[step['type']])}")
    for key, value in step.items():
        if key in ("type", "per"):
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: {step['type']}.{key} must be a number, got {value!r}")
    if step["type"] == "normalize":
        if step.get("per", "sample") not in ("sample", "batch"):
            raise ValueError(f"{where}: normalize.per must be sample or batch, got {step['per']!r}")
        if not 0 <= step.get("decay", 0.99) < 1:
            raise ValueError(f"{where}: normalize.decay must be >= 0 and < 1, got {step['decay']!r}")


def _make_step(step: dict) -> Callable[[list[float]], list[float]]:
    kind = step["type"]
    if kind == "clip":
        low, high = step.get("min"), step.get("max")
        return lambda values: [min(max(v, -math.inf if low is None else low), math.inf if high is None else high)
                               for v in values]
    if kind == "scale":
        mul, add = float(step.get("mul", 1.0)), float(step.get("add", 0.0))
        return lambda values: [v * mul + add for v in values]
    norm_cls = SampleNorm if step.get("per", "sample") == "sample" else RunningNorm
    return norm_cls(decay=float(step.get("decay", 0.99)), eps=float(step.get("eps", 1e-6)))


def postprocess_chain(steps: list[dict], where: str = "postprocess") -> Callable[[list], list]:
    """The ordered chain as one function; values that are None (not applicable) pass through untouched."""
    for i, step in enumerate(steps):
        _check_step(step, f"{where}[{i}]")
    made = [_make_step(step) for step in steps]

    def apply(values: list) -> list:
        present = [i for i, v in enumerate(values) if v is not None]
        kept = [float(values[i]) for i in present]
        for fn in made:
            if kept:
                kept = fn(kept)
        out = list(values)
        for i, v in zip(present, kept):
            out[i] = v
        return out

    return apply


def weighted_total(per_reward: list[list[float | None]], weights: list[float]) -> list[float]:
    """Per-completion sum of weight * reward; a reward of None (not applicable) counts as 0."""
    return [sum(w * float(values[i] or 0.0) for w, values in zip(weights, per_reward)) for i in range(len(per_reward[0]))]


def weighted_sum(components: list[tuple[RewardFn, float]], normalize_weights: bool = False,
                 postprocess: list[dict] | None = None) -> RewardFn:
    """sum_i w_i * r_i (divided by sum_i w_i when `normalize_weights`, as the assignment does), then the chain."""
    weights = [weight for _, weight in components]
    total = sum(weights)
    if normalize_weights and total == 0:
        raise ValueError(f"weighted_sum: normalize_weights needs weights that do not sum to 0, got {weights}")
    divisor = total if normalize_weights else 1.0
    chain = postprocess_chain(postprocess or [])

    def combined(completions, **columns) -> list[float]:
        totals = weighted_total([fn(completions=completions, **columns) for fn, _ in components], weights)
        return chain([v / divisor for v in totals])

    return named(combined, "weighted_sum")


def _postprocessed(fn: RewardFn, steps: list[dict], where: str) -> RewardFn:
    chain = postprocess_chain(steps, where)

    def reward(completions, **columns):
        return chain(fn(completions=completions, **columns))

    return named(reward, fn.__name__)


# --------------------------------------------------------------------------- the params spec
#
# Two forms, both under rl.rewards:
#   mapping (name -> weight | {weight, ...options}) with rl.reward_postprocess: {clip, scale, normalize,
#     ema_decay, normalize_weights} (the old global clip -> scale -> normalise) or an ordered chain (a list);
#   a typed spec (the assignment's format), inline or as the path of a JSON (or YAML) file:
#     {"type": "weighted_sum", "normalize_weights": true, "postprocess": [...],
#      "components": [{"type": "bleu", "weight": 0.5, "postprocess": [{"type": "clip", "min": 0, "max": 1}]}, ...]}
#   A component's other keys are the reward's options; a component may itself be a weighted_sum.

POSTPROCESS_OPTIONS = {"clip", "scale", "normalize", "ema_decay", "normalize_weights"}  # the mapping form's dict
COMPONENT_KEYS = {"type", "weight", "postprocess"}
WEIGHTED_SUM_KEYS = COMPONENT_KEYS | {"components", "normalize_weights"}


def load_spec(spec):
    """rl.rewards as given: a mapping, or a file path whose JSON/YAML content is a typed spec."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"rl.rewards: reward spec file '{spec}' not found")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text)
        else:
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"rl.rewards: {spec}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(loaded, dict) or "type" not in loaded:
            raise ValueError(f"rl.rewards: {spec} must hold a spec {{type: ..., ...}}, got {type(loaded).__name__}")
        return loaded
    if not isinstance(spec, dict):
        raise ValueError(f"rl.rewards: expected a mapping or a spec file path, got {spec!r}")
    return spec


def is_typed_spec(spec) -> bool:
    """A spec whose nodes name their kind (`type`), as opposed to the name -> weight mapping."""
    return isinstance(spec, dict) and "type" in spec


def _check_options(name: str, options: dict, where: str) -> None:
    if name not in FACTORIES:
        raise ValueError(f"{where}: unknown reward '{name}'; known: {', '.join(sorted(FACTORIES))}")
    try:
        inspect.signature(FACTORIES[name]).bind(**options)
    except TypeError as err:
        raise ValueError(f"{where}: bad option ({err})") from None


def _check_weight(weight, where: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"{where}: needs a numeric weight, got {weight!r}")


def _check_node(node, where: str) -> None:
    if not isinstance(node, dict) or "type" not in node:
        raise ValueError(f"{where}: a component is {{type: <reward>, weight: ..., ...}}, got {node!r}")
    _check_weight(node.get("weight", 1.0), where)
    steps = node.get("postprocess", [])
    if not isinstance(steps, list):
        raise ValueError(f"{where}.postprocess: must be a list of steps, got {steps!r}")
    for i, step in enumerate(steps):
        _check_step(step, f"{where}.postprocess[{i}]")
    if node["type"] == "weighted_sum":
        unknown = set(node) - WEIGHTED_SUM_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} of weighted_sum; known: {sorted(WEIGHTED_SUM_KEYS)}")
        components = node.get("components")
        if not isinstance(components, list) or not components:
            raise ValueError(f"{where}.components: a weighted_sum needs a non-empty list of components")
        if not isinstance(node.get("normalize_weights", True), bool):
            raise ValueError(f"{where}.normalize_weights: must be true or false")
        for i, child in enumerate(components):
            _check_node(child, f"{where}.components[{i}]")
        if node.get("normalize_weights", True) and sum(c.get("weight", 1.0) for c in components) == 0:
            raise ValueError(f"{where}: the weights sum to 0, so normalize_weights cannot divide by them")
    else:
        _check_options(node["type"], {k: v for k, v in node.items() if k not in COMPONENT_KEYS}, where)


def _parse(spec: dict) -> list[tuple[str, float, dict]]:
    parsed = []
    for name, entry in spec.items():
        where = f"rl.rewards.{name}"
        if isinstance(entry, dict):
            options = dict(entry)
            weight = options.pop("weight", 1.0)
        else:
            weight, options = entry, {}
        if isinstance(entry, dict) or isinstance(entry, (int, float)) and not isinstance(entry, bool):
            _check_options(name, options, "rl.rewards" if name not in FACTORIES else where)
            _check_weight(weight, where)
        else:
            raise ValueError(f"{where}: expected a weight or a mapping, got {entry!r}")
        parsed.append((name, float(weight), options))
    return parsed


def _legacy_chain(postprocess: dict) -> list[dict]:
    """The mapping form's {clip, scale, normalize, ema_decay} as the ordered chain it always meant."""
    steps = []
    if postprocess.get("clip"):
        low, high = postprocess["clip"]
        steps.append({"type": "clip", "min": low, "max": high})
    if "scale" in postprocess:
        steps.append({"type": "scale", "mul": postprocess["scale"]})
    if postprocess.get("normalize"):
        steps.append({"type": "normalize", "decay": postprocess.get("ema_decay", 0.99), "per": "batch"})
    return steps


def _postprocess_parts(postprocess) -> tuple[bool, list[dict]]:
    """(normalize_weights, chain) of rl.reward_postprocess: an ordered chain (list) or the option dict."""
    if isinstance(postprocess, list):
        return False, postprocess
    unknown = set(postprocess) - POSTPROCESS_OPTIONS
    if unknown:
        raise ValueError(f"rl.reward_postprocess: unknown option(s) {sorted(unknown)}; known: {sorted(POSTPROCESS_OPTIONS)}")
    clip = postprocess.get("clip")
    if clip is not None and (not isinstance(clip, (list, tuple)) or len(clip) != 2):
        raise ValueError(f"rl.reward_postprocess.clip: must be [low, high], got {clip!r}")
    return bool(postprocess.get("normalize_weights", False)), _legacy_chain(postprocess)


def validate(spec, postprocess=None) -> None:
    """Every check `build` makes, without loading a model: what preflight runs before a stage starts."""
    spec = load_spec(spec)
    if is_typed_spec(spec):
        if postprocess:
            raise ValueError("rl.reward_postprocess: not used with a spec (rl.rewards with `type`): "
                             "put the chain in the spec's `postprocess`")
        _check_node(spec, "rl.rewards")
        return
    if not spec:
        raise ValueError("rl.rewards: no reward given")
    _parse(spec)
    if postprocess:
        _, steps = _postprocess_parts(postprocess)
        for i, step in enumerate(steps):
            _check_step(step, f"rl.reward_postprocess[{i}]")


def _build_node(node: dict, where: str) -> RewardFn:
    kind = node["type"]
    if kind == "weighted_sum":
        components = [(_build_node(child, f"{where}.components[{i}]"), float(child.get("weight", 1.0)))
                      for i, child in enumerate(node["components"])]
        return weighted_sum(components, node.get("normalize_weights", True), node.get("postprocess", []))
    fn = named(FACTORIES[kind](**{k: v for k, v in node.items() if k not in COMPONENT_KEYS}), kind)
    steps = node.get("postprocess", [])
    return _postprocessed(fn, steps, f"{where}.postprocess") if steps else fn


def build(spec, postprocess=None) -> tuple[list[RewardFn], list[float]]:
    """Reward functions and their weights for a trainer, from rl.rewards and rl.reward_postprocess.

    A mapping without post-processing gives each reward to the trainer with its weight (TRL weighs and
    logs each); a mapping with post-processing, or a typed spec, gives one combined function of weight 1.
    """
    validate(spec, postprocess)
    spec = load_spec(spec)
    if is_typed_spec(spec):
        return [_build_node(spec, "rl.rewards")], [1.0]
    components = [(named(FACTORIES[name](**options), name), weight) for name, weight, options in _parse(spec)]
    if postprocess:
        normalize_weights, steps = _postprocess_parts(postprocess)
        return [weighted_sum(components, normalize_weights, steps)], [1.0]
    return [fn for fn, _ in components], [weight for _, weight in components]


def as_typed_spec(spec: dict, postprocess=None) -> dict:
    """The mapping form written as the equivalent typed spec (normalize_weights as the mapping has it)."""
    normalize_weights, steps = _postprocess_parts(postprocess or {})
    components = [{"type": name, "weight": weight, **options} for name, weight, options in _parse(spec)]
    return {"type": "weighted_sum", "normalize_weights": normalize_weights, "components": components,
            "postprocess": steps}
