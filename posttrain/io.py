"""File helpers every stage uses: nothing half-written, errors that name file and line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


class DataError(ValueError):
    """Bad input data, with the file and line it is on."""


def read_jsonl(path: str | Path, required: dict[str, type] | None = None) -> list[dict]:
    """Read a JSONL file; every problem names the file and the 1-based line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            for key, kind in (required or {}).items():
                if key not in record:
                    raise DataError(f"{path}:{line_no}: missing field '{key}'")
                if not isinstance(record[key], kind):
                    raise DataError(
                        f"{path}:{line_no}: field '{key}' must be {kind.__name__}, got {type(record[key]).__name__}"
                    )
            records.append(record)
    if not records:
        raise DataError(f"{path}: file is empty")
    return records


@contextlib.contextmanager
def atomic_path(final: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a run that was killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def require_safetensors(folder: str | Path) -> Path:
    """Weights load from safetensors only: unpickling a .bin/.pt file from elsewhere can run its code."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        refused = f" (pickle-based {', '.join(pickled)} refused: convert to safetensors)" if pickled else ""
        raise DataError(f"{folder}: no *.safetensors weights{refused}")
    return folder


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
