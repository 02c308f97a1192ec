"""`posttrain gc`: delete old registered versions and DVC cache entries nothing uses, after confirming.

    posttrain gc                 # lists what it would delete, asks, deletes
    posttrain gc --keep 5 --yes  # keep the champion and the last 5 versions, no question

Registry: every version of the registered model (promote.registered_model) except those holding an alias
(`champion`) and the last N by version number is deleted (MlflowClient.delete_model_version), with its run's
`model/` artifacts when they are local files (the `eval/` report stays: it is small and `posttrain compare`
reads it); its downloads under .cache/ go too. DVC: the objects of the local cache that the workspace does
not use (`dvc gc --workspace`), except the base models kept versions point at (their `posttrain.base_dvc_md5`
tag): a kept version keeps loading. What is deleted is computed again after the answer, and only what is
still unused then goes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from posttrain.release.modelstore import REGISTRY_CACHE, TAG_BASE_DVC

CHAMPION_CACHE = Path(".cache/champion_evals")


@dataclass(frozen=True)
class Version:
    version: str
    run_id: str
    decision: str
    aliases: tuple[str, ...]
    files: Path | None  # local model/ artifacts to delete with it (None: kept for another version, or not local)
    size: int


@dataclass
class Plan:
    name: str
    delete: list[Version] = field(default_factory=list)
    keep: list[Version] = field(default_factory=list)
    caches: list[Path] = field(default_factory=list)  # local downloads of deleted versions
    objects: list[tuple[Path, int]] = field(default_factory=list)  # unused DVC cache objects
    notes: list[str] = field(default_factory=list)
    dvc: bool = True  # the folder is a DVC workspace

    @property
    def empty(self) -> bool:
        return not (self.delete or self.caches or self.objects)


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def registry_plan(client, name: str, keep: int) -> tuple[list[Version], list[Version], list[str]]:
    """(versions to delete, versions kept, notes): kept = every aliased version and the last `keep`."""
    from mlflow.exceptions import MlflowException

    from posttrain.release.tracking import RegistryError

    try:
        registered = client.get_registered_model(name)
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return [], [], [f"registry: no registered model '{name}'"]
        raise RegistryError(f"model registry: cannot list '{name}' ({err.error_code}: "
                            f"{str(err.message).splitlines()[0][:300]})") from None
    aliases: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    newest = sorted(versions, key=lambda v: int(v.version), reverse=True)
    kept_numbers = {str(v.version) for v in newest[:keep]} | set(aliases)
    kept_sources = {v.source for v in versions if str(v.version) in kept_numbers}
    delete, kept, notes = [], [], []
    for v in sorted(versions, key=lambda v: int(v.version)):
        files = _local_path(v.source or "")
        if files is not None and (not files.exists() or v.source in kept_sources):
            files = None
        entry = Version(str(v.version), v.run_id or "", v.tags.get("gate.decision", "?"),
                        tuple(aliases.get(str(v.version), ())), files, _size(files) if files else 0)
        (kept if str(v.version) in kept_numbers else delete).append(entry)
        if entry in delete and files is None and _local_path(v.source or "") is None:
            notes.append(f"registry: v{v.version}'s model files are at {v.source}, not local: they stay")
    return delete, kept, notes


def _pinned_objects(client, name: str, kept: list[Version]) -> set[str]:
    """DVC md5s of the base models that kept versions point at."""
    pinned = set()
    for entry in kept:
        md5 = client.get_model_version(name, entry.version).tags.get(TAG_BASE_DVC)
        if md5:
            pinned.add(md5)
    return pinned


def dvc_unused(root: Path, pinned: set[str], remove: set[Path] | None = None) -> list[tuple[Path, int]]:
    """Objects of the workspace's local DVC cache that the workspace does not use (what
    `dvc gc --workspace` removes), less the `pinned` directory objects and the files they list.
    With `remove`, those of them that are in it are deleted (under DVC's lock) and returned."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    from posttrain.pipeline.lifecycle import WorkspaceBusy

    repo = Repo(str(root))
    try:
        try:
            repo.lock.lock()
        except LockError as err:
            raise WorkspaceBusy(f"dvc: {str(err).splitlines()[0]} (a dvc command is running here)") from None
        try:
            used: set[tuple[str, str]] = set()
            for ids in repo.used_objs().values():
                used |= {(h.name, h.value) for h in ids if h.value}
            unused, seen = [], set()
            for _, odb in repo.cache.by_scheme():
                if not odb or id(odb) in seen:
                    continue
                seen.add(id(odb))
                keep = {value for hash_name, value in used if hash_name == odb.hash_name}
                for md5 in pinned:
                    listing = Path(odb.oid_to_path(md5))
                    if odb.hash_name == "md5" and listing.is_file():
                        keep |= {md5} | {entry["md5"] for entry in json.loads(listing.read_text())}
                for oid in odb.all():
                    if oid not in keep:
                        path = Path(odb.oid_to_path(oid))
                        unused.append((path, _size(path)))
            if remove is not None:
                unused = [(path, size) for path, size in unused if path in remove]
                for path, _ in unused:
                    path.unlink(missing_ok=True)
            return sorted(unused)
        finally:
            repo.lock.unlock()
    finally:
        repo.close()


def plan(client, name: str, keep: int, root: Path = Path(".")) -> Plan:
    delete, kept, notes = registry_plan(client, name, keep)
    result = Plan(name, delete, kept, notes=notes)
    for entry in delete:  # its download (modelstore.fetch_registered) and cached eval answers (posttrain/release/registry.py)
        for folder in (root / REGISTRY_CACHE / name, root / CHAMPION_CACHE):
            result.caches += sorted(folder.glob(f"v{entry.version}-*")) if folder.is_dir() else []
    if (root / ".dvc").is_dir():
        result.objects = dvc_unused(root, _pinned_objects(client, name, kept))
    else:
        result.dvc = False
        result.notes.append(f"dvc: {root.resolve()} is not a DVC workspace: no cache to collect")
    return result


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def render(p: Plan, limit: int = 20) -> str:
    lines = [f"registry '{p.name}': keeping " + (", ".join(
        f"v{k.version}" + (f" ({', '.join(k.aliases)})" if k.aliases else "") for k in p.keep) or "nothing")]
    for d in p.delete:
        files = f"model files {d.files} ({_mb(d.size)})" if d.files else "no local model files"
        lines.append(f"  delete v{d.version} ({d.decision}, run {d.run_id[:12]}): {files}")
    lines += [f"  delete {c} (local download)" for c in p.caches]
    total = sum(size for _, size in p.objects)
    if p.dvc:
        lines.append(f"dvc cache: {len(p.objects)} objects not used by the workspace ({_mb(total)})")
    lines += [f"  delete {path} ({_mb(size)})" for path, size in p.objects[:limit]]
    if len(p.objects) > limit:
        lines.append(f"  ... and {len(p.objects) - limit} more")
    lines += p.notes
    freed = sum(d.size for d in p.delete) + total
    lines.append(f"frees about {_mb(freed)}")
    return "\n".join(lines)


def execute(client, listed: Plan, keep: int, root: Path = Path(".")) -> Plan:
    """Delete what `listed` named and is still to be deleted now (a version that got an alias meanwhile stays)."""
    delete_now, kept_now, _ = registry_plan(client, listed.name, keep)
    still = {d.version: d for d in delete_now}
    done = Plan(listed.name, keep=kept_now)
    for entry in listed.delete:
        if entry.version not in still:
            continue
        client.delete_model_version(listed.name, entry.version)
        if entry.files is not None and still[entry.version].files == entry.files:
            shutil.rmtree(entry.files, ignore_errors=True)
        done.delete.append(entry)
    for cache in listed.caches:
        if any(cache.name.startswith(f"v{d.version}-") for d in done.delete):
            shutil.rmtree(cache, ignore_errors=True)
            done.caches.append(cache)
    if listed.objects:
        done.objects = dvc_unused(root, _pinned_objects(client, listed.name, kept_now),
                                  remove={path for path, _ in listed.objects})
    return done
