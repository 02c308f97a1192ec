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


MAX_LINE_BYTES = 1 << 20  # one record per line; a GSM8K record is ~1 KB, an eval record a few KB
UTF8_BOM = b"\xef\xbb\xbf"


class Records(list):
    """The records of one JSONL file (a plain list) that remember where each came from:
    `path` and `line_numbers[i]`, the 1-based line of record i (blank lines are skipped)."""

    def __init__(self, items: Iterable[dict] = (), path: Path | None = None, line_numbers: Iterable[int] = ()):
        super().__init__(items)
        self.path, self.line_numbers = path, list(line_numbers)

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if isinstance(index, slice):  # records[:n] still knows its lines
            item = Records(item, self.path, self.line_numbers[index])
        return item

    def where(self, index: int) -> str:
        """`file:line` of record `index` (or `record N` for records that were not read from a file)."""
        if self.path is None or len(self.line_numbers) != len(self):
            return f"record {index + 1}"
        return f"{self.path}:{self.line_numbers[index]}"


def where(records: list[dict], index: int) -> str:
    """`file:line` of a record read by read_jsonl, `record N` for any other list."""
    return records.where(index) if isinstance(records, Records) else f"record {index + 1}"


def read_jsonl(path: str | Path, required: dict[str, type] | None = None,
               max_line_bytes: int = MAX_LINE_BYTES) -> Records:
    """Read a JSONL file; every problem names the file and the 1-based line.

    UTF-8 only (a leading byte-order mark is accepted and dropped); a line longer than
    `max_line_bytes` is refused without being read whole.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    records = Records(path=path)
    limit = max_line_bytes
    with path.open("rb") as handle:
        line_no = 0
        while True:
            raw = handle.readline(limit + 1)  # never more than limit + 1 bytes in memory, however long the line
            if not raw:
                break
            line_no += 1
            if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
                raise DataError(f"{path}:{line_no}: line longer than {limit:,} bytes: one JSON record per line "
                                f"expected (is this a JSON array or a binary file?)")
            if line_no == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]  # written by some Windows editors: harmless, dropped
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                f"{len(raw[:err.start].decode('utf-8', 'replace')) + 1})") from None
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
            records.line_numbers.append(line_no)
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
