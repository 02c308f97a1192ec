"""The shortcuts a policy finds, as hard negatives built from the data itself, and the check that a judge or
reward model does not fall for them.

A learned judge trained only on (poem, plain text) or (reference, base-model sample) learns what those differ
in. A policy then finds what the judge never saw: the input handed back, the input broken into lines, one
line said over and over, a reply cut off. Each kind is built from a record's input and reference, added to
the training data as a negative, and scored on held-out records after training: the share of each kind the
model passes is reported beside the chance check, and a kind passed more often than
reward_model.max_shortcut_pass is a loud warning (the model's scores are then not evidence).
"""

from __future__ import annotations

KINDS = ("copied_input", "input_in_lines", "repeated_line", "cut_off")


def lines_of(text: str, words_per_line: int = 6) -> str:
    words = text.split()
    return "\n".join(" ".join(words[i:i + words_per_line]) for i in range(0, len(words), words_per_line))


def shortcut(kind: str, user: str, reference: str) -> str:
    """The negative of `kind` for one record (user input, reference reply)."""
    if kind == "copied_input":
        return user
    if kind == "input_in_lines":
        return lines_of(user)
    if kind == "repeated_line":
        first = next((line for line in reference.splitlines() if line.strip()), reference)
        return "\n".join([first.strip()] * 8)  # a loop to the token limit, as a looping policy writes it
    if kind == "cut_off":
        words = reference.split()
        return " ".join(words[: max(1, len(words) // 2)])
    raise ValueError(f"unknown shortcut kind {kind!r}; known: {', '.join(KINDS)}")


def one_per_record(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Training negatives: one shortcut per (user, reference), the kinds taken in turn: (kind, text)."""
    return [(KINDS[i % len(KINDS)], shortcut(KINDS[i % len(KINDS)], user, reference))
            for i, (user, reference) in enumerate(pairs)]


def check(passed: dict[str, list[bool]], limit: float, what: str) -> dict:
    """Per kind, the share of held-out shortcuts the model passed; loud when one is above `limit`."""
    rates = {kind: sum(flags) / len(flags) for kind, flags in passed.items() if flags}
    fooled = {kind: rate for kind, rate in rates.items() if rate > limit}
    if fooled:
        print(f"\nWARNING: the {what} passes shortcuts a policy will find: "
              + ", ".join(f"{kind} {rate:.2f}" for kind, rate in fooled.items())
              + f" of held-out items (limit reward_model.max_shortcut_pass {limit}). Its scores reward them.\n")
    return {"shortcut_pass_rates": rates, "beats_shortcuts": not fooled,
            "n_shortcut_items": max((len(flags) for flags in passed.values()), default=0)}
