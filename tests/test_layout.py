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


MAX_FUNCTION_LINES = 60
# Argument parsing: one add_argument call after another, read top to bottom; splitting it hides the command's shape.
LONG_FUNCTIONS_ALLOWED = {"posttrain/cli/command.py:build_parser"}


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'file:function (n lines)' for every function or method over `limit` lines (decorators and docstring included)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - first + 1 > limit:
                    found.append(f"{relative}:{node.name} ({node.end_lineno - first + 1} lines)")
    return found


def test_no_function_is_over_60_lines_outside_argument_parsing():
    long = [entry for entry in long_functions(PACKAGE) if entry.split(" ")[0] not in LONG_FUNCTIONS_ALLOWED]
    assert long == [], "split these into well-named helpers (or, for argument parsing only, allow-list them)"
    assert {entry.split(" ")[0] for entry in long_functions(PACKAGE)} == LONG_FUNCTIONS_ALLOWED  # no stale entry


def test_the_length_check_sees_a_long_function(tmp_path):
    (tmp_path / "posttrain").mkdir()
    body = "".join(f"        x{i} = {i}\n" for i in range(59))
    (tmp_path / "posttrain" / "m.py").write_text(f"class A:\n    def short(self):\n        pass\n\n    @property\n"
                                                  f"    def long(self):\n{body}        return 0\n")
    assert long_functions(tmp_path / "posttrain") == ["posttrain/m.py:long (62 lines)"]
