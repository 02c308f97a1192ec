"""The package's layering: stages and the CLI sit on top of the library; the library never imports a stage.

    .venv/bin/python -m pytest tests/test_layout.py
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "posttrain"
# Who may import posttrain.stages: the stages themselves and the command that dispatches to them.
MAY_IMPORT_STAGES = ("posttrain/stages/", "posttrain/cli/")


def imported_names(path: Path) -> set[str]:
    """Every module a file imports (module level and inside functions), plus importlib.import_module strings."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("posttrain.stages"):
            names.add(node.value)  # a dynamic import by name
    return names


def stage_imports_from_the_library() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(MAY_IMPORT_STAGES):
            continue
        found += [f"{relative} imports {name}" for name in sorted(imported_names(path))
                  if name == "posttrain.stages" or name.startswith("posttrain.stages.")]
    return found


def test_the_library_never_imports_a_stage():
    assert stage_imports_from_the_library() == []


def test_the_check_sees_an_import_from_the_library_into_a_stage(tmp_path, monkeypatch):
    """The walk itself must catch one: a library module that imports a stage, written into a copy of the tree."""
    library = tmp_path / "posttrain" / "release"
    library.mkdir(parents=True)
    (library / "bad.py").write_text("def f():\n    from posttrain.stages import promote\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "posttrain")
    assert stage_imports_from_the_library() == ["posttrain/release/bad.py imports posttrain.stages",
                                                 "posttrain/release/bad.py imports posttrain.stages.promote"]


def test_only_the_posttrain_package_is_installed():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["posttrain*"]' in text
    assert not (ROOT / "tasks").exists() and not (ROOT / "flows").exists()


def markdown_links(text: str) -> list[str]:
    import re

    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in target and not target.startswith("mailto:")]


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", ROOT / "bench/results/README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in pages for target in markdown_links(page.read_text())
              if target.split("#")[0] and not (page.parent / target.split("#")[0]).exists()]
    assert broken == []
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_the_link_check_sees_a_broken_link():
    assert markdown_links("see [x](docs/nope.md) and [y](https://example.org)") == ["docs/nope.md"]
