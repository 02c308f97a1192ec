"""The StrictBot notebook's reward model (`reward_model.kind: mlp_head`): a frozen base LM with an MLP head.

    score(prompt, reply) = head(h_last),  head = Linear(hidden, 512) -> ReLU -> Dropout(0.1)
                                                 -> Linear(512, 256) -> ReLU -> Dropout(0.1) -> Linear(256, 1)

h_last is the base model's final hidden state at the last non-padding token, so left and right padding
give the same score (position ids count real tokens only). A sequence is the prompt text's tokens, the
reply's tokens and EOS: what TRL's PPO scores when the policy ends its reply at EOS. Trained with the
pairwise Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected)). The base never changes, so
each sequence's h_last is computed once and the head trains on those features.

Only the head is saved (head.safetensors) with a pointer to its base (mlp_head.json: folder, sha256 of
its weights, sizes); `load` rebuilds the model from both. The model keeps the interface TRL's
`get_reward` reads (`base_model_prefix` names the backbone, `score(hidden_states)` maps every position),
so PPO uses it as its reward model and, with a trainable head, as its value model.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
from torch import nn

HEAD_FILE = "head.safetensors"
POINTER_FILE = "mlp_head.json"
SIZES = (512, 256)  # StrictBot's hidden -> 512 -> 256 -> 1


class MLPHead(nn.Sequential):
    def __init__(self, hidden_size: int, dropout: float = 0.1):
        layers, width = [], hidden_size
        for size in SIZES:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        super().__init__(*layers, nn.Linear(width, 1))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last real token (the largest index whose mask is 1), whatever the side
    the row is padded on."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


class MLPHeadRewardModel(nn.Module):
    """Frozen backbone (the base LM without its LM head) + a trainable MLP head."""

    base_model_prefix = "backbone"  # TRL's get_reward: getattr(model, model.base_model_prefix)

    def __init__(self, backbone: nn.Module, dropout: float = 0.1, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.config = backbone.config
        self.head = head if head is not None else MLPHead(backbone.config.hidden_size, dropout)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    def score(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., 1): the head at every position (get_reward picks the last real token)."""
        return self.head(hidden_states)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's final hidden state at each row's last real token, (batch, hidden); no gradient."""
        mask = attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # padding on the left must not shift positions
        with torch.no_grad():
            hidden = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.score(self.features(input_ids, attention_mask)).squeeze(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -nn.functional.logsigmoid(chosen - rejected).mean()


# --------------------------------------------------------------------------- tokens


def encode(tokenizer, prompt: str, reply: str, max_length: int) -> list[int]:
    """Prompt text + reply + EOS as token ids, cut from the left to max_length (the reply's end is kept)."""
    ids = (tokenizer(prompt, add_special_tokens=False).input_ids + tokenizer(reply, add_special_tokens=False).input_ids
           + [tokenizer.eos_token_id])
    return ids[-max_length:]


def pad(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = [([pad_id] * (width - len(r)) + r) if side == "left" else (r + [pad_id] * (width - len(r))) for r in rows]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if side == "left" else ([1] * len(r) + [0] * (width - len(r)))
            for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


def features_of(model: MLPHeadRewardModel, rows: list[list[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    out = []
    for start in range(0, len(rows), batch_size):
        ids, mask = pad(rows[start:start + batch_size], pad_id)
        out.append(model.features(ids, mask))
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


def scores_of(model: MLPHeadRewardModel, rows: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    model.eval()
    with torch.no_grad():
        return model.score(features_of(model, rows, pad_id, batch_size)).squeeze(-1).tolist()


# --------------------------------------------------------------------------- training


def train_head(model: MLPHeadRewardModel, chosen: torch.Tensor, rejected: torch.Tensor, epochs: int,
               learning_rate: float, batch_size: int, weight_decay: float, seed: int) -> list[dict]:
    """Bradley-Terry on precomputed features (chosen[i] preferred to rejected[i]); only the head's
    parameters are given to the optimizer. Returns the log: mean loss per epoch."""
    generator = random.Random(seed)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    model.train()
    log, order, step = [], list(range(len(chosen))), 0
    for epoch in range(1, epochs + 1):
        generator.shuffle(order)
        losses = []
        for start in range(0, len(order), batch_size):
            index = torch.tensor(order[start:start + batch_size])
            loss = bradley_terry_loss(model.score(chosen[index]).squeeze(-1), model.score(rejected[index]).squeeze(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            step += 1
        log.append({"epoch": epoch, "step": step, "loss": sum(losses) / len(losses)})
    model.eval()
    return log


def pairwise_accuracy(model: MLPHeadRewardModel, chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        margin = (model.score(chosen) - model.score(rejected)).squeeze(-1)
    return {"pairwise_accuracy": float((margin > 0).float().mean()) if len(margin) else 0.0,
            "margin": float(margin.mean()) if len(margin) else 0.0, "n_pairs": len(margin)}


# --------------------------------------------------------------------------- files


def weights_sha256(base_dir: str | Path) -> str:
    """sha256 over the base's safetensors files: the head is only valid on the exact weights it was trained on."""
    digest = hashlib.sha256()
    for file in sorted(Path(base_dir).glob("*.safetensors")):
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_backbone(base_dir: str | Path):
    from transformers import AutoModel, AutoTokenizer

    from posttrain.io import require_safetensors

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").exists():
        raise FileNotFoundError(f"mlp_head reward model: no base model at '{base_dir}' (run the base stage first)")
    require_safetensors(base_dir)
    backbone = AutoModel.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    return backbone, AutoTokenizer.from_pretrained(base_dir)


def save(model: MLPHeadRewardModel, folder: str | Path, base_dir: str | Path, info: dict) -> None:
    """head.safetensors (the head only) and mlp_head.json (the pointer to the base, sizes, how it was trained)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(folder / HEAD_FILE))
    pointer = {"kind": "mlp_head", "base": str(base_dir), "base_sha256": weights_sha256(base_dir),
               "hidden_size": model.config.hidden_size, "sizes": list(SIZES), "dropout": _dropout(model.head)} | info
    (folder / POINTER_FILE).write_text(json.dumps(pointer, indent=2) + "\n")


def _dropout(head: nn.Module) -> float:
    return next((m.p for m in head.modules() if isinstance(m, nn.Dropout)), 0.0)


def is_mlp_head(folder: str | Path) -> bool:
    return (Path(folder) / POINTER_FILE).exists()


def load(folder: str | Path, trainable: bool = False):
    """(model, tokenizer, pointer) from a saved head and the base it points to; the base's weights must be
    the ones the head was trained on. `trainable`: the head takes gradients (PPO's value model)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_mlp_head(folder):
        raise FileNotFoundError(f"'{folder}' holds no mlp_head reward model ({POINTER_FILE} missing)")
    pointer = json.loads((folder / POINTER_FILE).read_text())
    backbone, tokenizer = load_backbone(pointer["base"])
    if weights_sha256(pointer["base"]) != pointer["base_sha256"]:
        raise ValueError(f"{folder / POINTER_FILE}: the base '{pointer['base']}' has changed since the head was "
                         "trained on it; retrain the head (dvc repro reward_model)")
    model = MLPHeadRewardModel(backbone, pointer.get("dropout", 0.1))
    model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    model.head.requires_grad_(trainable)
    return model.eval(), tokenizer, pointer
