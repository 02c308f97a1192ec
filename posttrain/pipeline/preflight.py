"""Before a run starts: every param checked (types, ranges, library configs, registry names), and
params.yaml written only in a form that passes those checks.

    python -m posttrain.pipeline.preflight          # check ./params.yaml; exit 2 with `params.yaml:line: ...`

Kept apart from posttrain/config/, which every stage imports: this module imports the reward
registry, and a stage's code dependencies (dvc.yaml) should not grow by it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from pathlib import Path

from posttrain.config.loader import Where, line_index, load_params
from posttrain.config.schema import ConfigError, Params, base_source_is_local

PROFILES_DIR = Path("profiles")
# Profiles renamed to say which original they follow ("seed" now only means a random seed); the old name
# still works, with a one-line warning, for one release.
RENAMED_PROFILES = {"seed002": "assignment_reinforce"}
PASSED_DIR = Path(".posttrain") / "params-passed"  # one empty file per params text that passed every check


def check_registries(params: Params, where: Where) -> None:
    """Reward names, weights, options and post-processing (either form of rl.rewards), without loading models."""
    from posttrain.rewards import composition as rewards

    spec = params.rl.rewards
    if isinstance(spec, dict) and not rewards.is_typed_spec(spec):
        for name in spec:
            if name not in rewards.FACTORIES:
                raise ConfigError(f"{where(('rl', 'rewards', name))}: unknown reward 'rl.rewards.{name}'; "
                                  f"known: {', '.join(sorted(rewards.FACTORIES))}")
    try:
        if spec or params.rl.method != "ppo":  # PPO's reward is the reward model: rule terms are optional
            rewards.validate(spec, params.rl.reward_postprocess or None)
    except ValueError as err:
        message = str(err)
        key = re.sub(r"\[\d+\]", "", message.split(":", 1)[0])  # rl.rewards.components[0] -> its nearest line
        path = tuple(key.split(".")) if key.startswith("rl.") else ("rl", "rewards")
        raise ConfigError(f"{where(path)}: {message}") from None
    from posttrain.training import optim

    for key in ("optimizer", "lr_scheduler"):
        named = dataclasses.asdict(getattr(params.rl, key))
        try:
            optim.check_names(named if key == "optimizer" else {}, named if key == "lr_scheduler" else {})
        except ValueError as err:
            raise ConfigError(f"{where(('rl', key, 'name'))}: 'rl.{key}': {err}") from None


def check_paths(params: Params, where: Where, root: str | Path) -> None:
    """A local base model folder that is not there: the base stage would fail the same way on every try."""
    source = params.base.source
    if base_source_is_local(source, root) and not (Path(root) / Path(source).expanduser()).is_dir():
        raise ConfigError(f"{where(('base', 'source'))}: 'base.source' names a local folder that does not exist: "
                          f"'{source}' (a Hugging Face model folder, smollm2, tiny, or a hub id such as org/name)")


def validate_file(path: str | Path, label: str | Path | None = None, passed_dir: Path | None = None,
                  root: str | Path | None = None) -> Params:
    """Load a params file with every check; errors name `label` (default: the path) and the line. Relative
    paths in it are the workspace's: `root` (default: the file's folder).

    Building the library configs costs about 7 s of imports (transformers, trl, peft). With `passed_dir`,
    a file whose exact text passed before, with the same library versions and checking code, skips that
    build (its keys are still checked against the libraries' field names); a pass is recorded there.
    """
    label = str(label or path)
    stamp = passed_stamp(Path(path), passed_dir) if passed_dir else None
    passed_before = stamp is not None and stamp.exists()
    params = load_params(path, label=label, build_library_configs=not passed_before)
    where = Where(label, line_index(Path(path).read_text()))
    check_registries(params, where)
    check_paths(params, where, Path(path).parent if root is None else root)
    if stamp is not None and not passed_before:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    return params


def passed_stamp(path: Path, passed_dir: Path) -> Path:
    """A name for what the library-config check's verdict depends on: the params text, the versions of
    torch and the libraries, and the checking code."""
    from importlib.metadata import version

    from posttrain.config import library_fields

    digest = hashlib.sha256(path.read_bytes())
    for name, installed in (library_fields.installed_versions() | {"torch": version("torch")}).items():
        digest.update(f"\n{name}=={installed}".encode())
    for checking_code in sorted(Path(library_fields.__file__).parent.glob("*.py")):  # schema, loader, library fields
        digest.update(checking_code.read_bytes())
    return passed_dir / digest.hexdigest()[:32]


def validate_workspace(root: str | Path = ".", params_name: str = "params.yaml") -> Params:
    return validate_file(Path(root) / params_name, label=params_name, passed_dir=Path(root) / PASSED_DIR)


def update_params_file(params_path: Path, profile: str | None, overrides: list[str]) -> None:
    """Write a profile and -S overrides into params.yaml (as `dvc exp run -S` does), keeping comments."""
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    from posttrain.config.loader import parse_override
    from posttrain.io import atomic_path

    class NullKeepingRepresenter(RoundTripRepresenter):
        """Writes None as `null`, as params.yaml spells it (ruamel's default is an empty value). A subclass:
        add_representer on RoundTripRepresenter itself would change every ruamel dump in the process."""

    NullKeepingRepresenter.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    if not profile and not overrides:
        return
    yaml = YAML()
    # Round-trip the file as written: a changed value changes its own line only (no re-wrapped long strings,
    # no "" turned into '', comments kept).
    yaml.preserve_quotes = True
    yaml.width = 1 << 16
    yaml.Representer = NullKeepingRepresenter
    data = yaml.load(params_path.read_text())
    changes: list[tuple[list[str], object]] = []
    if profile in RENAMED_PROFILES:
        print(f"warning: --profile {profile} is deprecated, use --profile {RENAMED_PROFILES[profile]} (the same "
              "file; the old name will be refused in the next release)", file=sys.stderr)
        profile = RENAMED_PROFILES[profile]
    if profile:
        profile_path = PROFILES_DIR / f"{profile}.yaml"
        if not profile_path.exists():
            known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
            raise ConfigError(f"{profile_path}: no such profile (known: {known})")

        def walk(node, prefix):
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, prefix + [key])
                else:
                    changes.append((prefix + [key], value))

        walk(YAML(typ="safe").load(profile_path.read_text()) or {}, [])
    changes += [parse_override(text) for text in overrides]
    for keys, value in changes:
        node = data
        for key in keys[:-1]:
            if key not in node or node[key] is None:
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value  # ruamel keeps a replaced string's quote style
    with atomic_path(params_path) as tmp:
        with tmp.open("w") as handle:
            yaml.dump(data, handle)
        # Refuse to write a params file that does not validate; errors name the real file, not the temporary one.
        validate_file(tmp, label=params_path, root=params_path.parent)
    print(f"params.yaml updated ({len(changes)} values{' from profile ' + profile if profile else ''})")


if __name__ == "__main__":
    try:
        validate_workspace(".")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print("params.yaml: ok")
