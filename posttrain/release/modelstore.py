"""Model folders without full copies: adapters that point at the model they adapt, one loader for all.

    posttrain eval models/rl                          # an adapter folder: base rebuilt, adapter merged
    posttrain eval models:/gsm8k-policy@champion      # a registered version, downloaded once, rebuilt the same way

A model folder is either
- plain: a Hugging Face folder (config.json + *.safetensors): models/base, models/sft;
- an adapter folder: a PEFT adapter (adapter_config.json + adapter_model.safetensors) and POINTER_FILE, which
  names the model it adapts (a path relative to the folder and the sha256 of that model's files, `digest`). models/rl is one: the RL adapter on models/sft, 20 MB instead of 517 MB.

`load_causal_lm` rebuilds an adapter folder as the merged model: the model it adapts (itself possibly an
adapter folder), loaded in fp32, the adapter merged in with PEFT's merge_and_unload, exactly what
merging in the training process and saving gave (same tensors, same arithmetic; tested).

A merged folder the merge stage wrote carries LINEAGE_FILE (the base and adapter it was made from), so
`pack` can register a candidate as adapters only: the version's `model/` holds the RL adapter,
`model/parent/` the SFT adapter, and `model/parent/posttrain_base.json` points at the base model outside
the registry (its sha256, where it was, its DVC cache entry, base.source). `posttrain gc` keeps the DVC
cache entries that kept versions point at.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from posttrain.io import DataError, atomic_path, require_safetensors

POINTER_FILE = "posttrain_base.json"
LINEAGE_FILE = "posttrain_merged.json"
PARENT = "parent"  # where a packed adapter's own base goes, inside the packed folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REGISTRY_CACHE = Path(".cache/registry")
BASES_CACHE = Path(".cache/bases")  # base folders rebuilt from a DVC cache entry (links, no copies)
# Tags a registered version carries about the base outside the registry (`posttrain gc` reads them).
TAG_BASE_SHA = "posttrain.base_sha256"
TAG_BASE_DVC = "posttrain.base_dvc_md5"


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file() and (Path(folder) / POINTER_FILE).is_file()


def is_model_folder(folder: str | Path) -> bool:
    """A folder `load_causal_lm` can load: plain (config.json) or an adapter with its pointer."""
    return (Path(folder) / "config.json").is_file() or is_adapter_folder(folder)


def digest(folder: str | Path) -> str:
    """sha256 over the files that define a model folder: config.json / adapter_config.json, the pointer
    and every *.safetensors at its top level (names and bytes)."""
    folder = Path(folder)
    names = {"config.json", "adapter_config.json", POINTER_FILE}
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name in names or p.suffix == ".safetensors"))
    sha = hashlib.sha256()
    for path in files:
        sha.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                sha.update(chunk)
    return sha.hexdigest()


def write_pointer(folder: str | Path, base_dir: str | Path, **extra) -> dict:
    """Record in `folder` which model it adapts. The relative path is taken from `folder`'s parent, so
    a temporary sibling (io.atomic_path) gets the path its final name will have."""
    folder, base_dir = Path(folder), Path(base_dir).resolve()
    # Relative paths only: an output's bytes must not depend on where the workspace is (DVC hashes them).
    pointer = {"path": os.path.relpath(base_dir, folder.resolve().parent / "x"), "sha256": digest(base_dir), **extra}
    (folder / POINTER_FILE).write_text(json.dumps(pointer, indent=2, sort_keys=True) + "\n")
    return pointer


def write_lineage(folder: str | Path, base_dir: str | Path, adapter_dir: str | Path) -> None:
    """A merged folder's record of what it was merged from (read by `pack`, never by the loader)."""
    folder = Path(folder)
    parent = folder.resolve().parent / "x"
    lineage = {role: {"path": os.path.relpath(Path(path).resolve(), parent), "sha256": digest(path)}
               for role, path in (("base", base_dir), ("adapter", adapter_dir))}
    (folder / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")


def _dvc_cache_folder(md5: str, cache: Path) -> Path | None:
    """A folder of links to the files of DVC directory object `md5` in `cache`, or None if it is not there."""
    listing = cache / "files" / "md5" / md5[:2] / md5[2:]
    if not md5.endswith(".dir") or not listing.is_file():
        return None
    entries = json.loads(listing.read_text())
    objects = [(cache / "files" / "md5" / e["md5"][:2] / e["md5"][2:], e["relpath"]) for e in entries]
    if not all(path.is_file() for path, _ in objects):
        return None
    target = BASES_CACHE.resolve() / md5.removesuffix(".dir")
    if not target.is_dir():
        with atomic_path(target, is_dir=True) as tmp:
            for path, relpath in objects:
                (tmp / relpath).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(path, tmp / relpath)
    return target


def resolve_base(folder: str | Path) -> Path:
    """The folder the adapter in `folder` was trained on, wherever it is now, checked by its sha256."""
    folder = Path(folder)
    pointer = json.loads((folder / POINTER_FILE).read_text())
    candidates = []
    if pointer.get("path"):
        candidates.append(folder / pointer["path"])
    if pointer.get("absolute_path"):
        candidates.append(Path(pointer["absolute_path"]))
    if pointer.get("workspace_path"):
        candidates.append(Path.cwd() / pointer["workspace_path"])
    seen = set()
    for candidate in candidates:
        if candidate.resolve() in seen or not is_model_folder(candidate):
            continue
        seen.add(candidate.resolve())
        if not pointer.get("sha256") or digest(candidate) == pointer["sha256"]:
            return candidate
    md5 = pointer.get("dvc_md5")
    for cache in dict.fromkeys(Path(p) for p in (pointer.get("dvc_cache"), Path.cwd() / ".dvc" / "cache") if p):
        rebuilt = _dvc_cache_folder(md5, cache) if md5 else None
        if rebuilt is not None and digest(rebuilt) == pointer["sha256"]:
            return rebuilt
    where = ", ".join(str(c) for c in candidates) + (f", DVC cache entry {md5}" if md5 else "")
    source = f" (base.source {pointer['source']})" if pointer.get("source") else ""
    raise DataError(f"{folder / POINTER_FILE}: the model this adapter was trained on{source}, sha256 "
                    f"{pointer.get('sha256', '?')[:16]}, is at none of: {where}; rebuild it where it was made "
                    "(`dvc repro base merge` or `dvc pull`)")


def load_causal_lm(folder: str | Path, dtype: str = "float32"):
    """The model a folder holds: plain folders load as they are; adapter folders are rebuilt (the model
    they adapt, recursively, in fp32; the adapter merged in), then cast to `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not is_adapter_folder(folder):
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"model folder '{folder}' not found (or it has no config.json)")
        require_safetensors(folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), use_safetensors=True)
    from peft import PeftModel

    if not (folder / ADAPTER_WEIGHTS).is_file():  # PEFT would fall back to a pickled adapter_model.bin
        raise DataError(f"{folder}: no {ADAPTER_WEIGHTS}")
    base = load_causal_lm(resolve_base(folder), "float32")
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    return merged.to(getattr(torch, dtype))


def save_merged(folder: str | Path, out_dir: str | Path) -> Path:
    """A plain HF folder of the model `folder` holds (what the rl stage wrote before it kept adapters)."""
    from transformers import AutoTokenizer

    with atomic_path(out_dir, is_dir=True) as tmp:
        load_causal_lm(folder).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    return Path(out_dir)


def _parts(folder: Path) -> tuple[Path, Path] | None:
    """(the folder holding the adapter's files, the model it adapts) of an adapter folder or of a merged
    folder with its lineage; None for a plain model (a base)."""
    if is_adapter_folder(folder):
        return folder, resolve_base(folder)
    if (folder / LINEAGE_FILE).is_file():
        lineage = json.loads((folder / LINEAGE_FILE).read_text())
        found = []
        for role in ("adapter", "base"):
            path = folder / lineage[role]["path"]
            if not path.is_dir() or digest(path) != lineage[role]["sha256"]:
                raise DataError(f"{folder / LINEAGE_FILE}: the {role} it was merged from is no longer at {path} "
                                "(gone or changed): rerun the merge stage")
            found.append(path)
        return found[0], found[1]
    return None


def _dvc_md5(folder: Path, root: Path) -> str | None:
    """The md5 dvc.lock records for `folder` as some stage's output, if it is one."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if (root / out["path"]).resolve() == folder.resolve():
                return out.get("md5")
    return None


def pack(folder: str | Path, dest: str | Path, source: str | None = None, root: str | Path = ".") -> dict | None:
    """Write into `dest` the adapters `folder` is made of, and a pointer to the base they sit on.

    Returns the base pointer (sha256, paths, DVC md5, source), or None when `folder` is a plain model
    without lineage (nothing to pack: register it whole)."""
    folder, dest, root = Path(folder), Path(dest), Path(root).resolve()
    parts = _parts(folder)
    if parts is None:
        return None
    files, base = parts
    dest.mkdir(parents=True, exist_ok=True)
    for path in files.iterdir():
        if path.is_file() and path.name not in (POINTER_FILE, LINEAGE_FILE):
            shutil.copy2(path, dest / path.name)
    pointer = pack(base, dest / PARENT, source, root)
    if pointer is not None:  # the base is itself adapters: it travels inside, under parent/
        (dest / POINTER_FILE).write_text(json.dumps({"path": PARENT, "sha256": digest(dest / PARENT)}, indent=2) + "\n")
        return pointer
    base = base.resolve()
    pointer = {"sha256": digest(base), "absolute_path": str(base), "source": source,
               "workspace_path": os.path.relpath(base, root) if base.is_relative_to(root) else None,
               "dvc_md5": _dvc_md5(base, root),
               "dvc_cache": str(root / ".dvc" / "cache") if (root / ".dvc" / "cache").is_dir() else None}
    (dest / POINTER_FILE).write_text(json.dumps(pointer, indent=2, sort_keys=True) + "\n")
    return pointer


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/<name>/<version> or models:/<name>@<alias> -> (name, version, alias)."""
    body = uri.removeprefix("models:/")
    name, sep, alias = body.partition("@")
    if sep and name and alias:
        return name, None, alias
    name, _, version = body.rpartition("/")
    if sep or not name or not version.isdigit():
        raise DataError(f"{uri}: a registered version is models:/<name>/<version> or models:/<name>@<alias>")
    return name, version, None


def fetch_registered(uri: str, cache_root: str | Path = REGISTRY_CACHE) -> Path:
    """The local folder of a registered version (downloaded once into cache_root/<name>/v<version>-<run>)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name, number, alias = parse_model_uri(uri)
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as err:
        message = str(err.message).splitlines()[0][:200]
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise DataError(f"{uri}: not in the model registry at {mlflow.get_tracking_uri()} ({message})") from None
        raise DataError(f"{uri}: cannot read the model registry ({err.error_code}: {message})") from None
    target = Path(cache_root) / name / f"v{version.version}-{(version.run_id or 'norun')[:8]}"
    if not target.is_dir():
        with atomic_path(target, is_dir=True) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(tmp))
    return target
