"""The shape of the repository (issue 28): flat top-level modules, no import circles (lazy imports inside
functions included), no module reaching into another's private names, and a reason in the docstring of
every module over ~700 lines. Each rule is checked on the real tree and, on a small made-up tree, shown to
catch what it forbids."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LONG_MODULE_LINES = 700


def import_graph(folder: Path) -> dict[str, set[str]]:
    """For each top-level module of `folder`, the modules of `folder` it imports anywhere in its code."""
    modules = {path.stem: path for path in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk meets, each as the path that closes it."""
    circles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                circles.append(path[path.index(imported) :] + [module, imported])
            elif imported not in state:
                visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return circles


def private_imports(folder: Path) -> list[str]:
    """`from other_module import _name` between modules of `folder`."""
    modules = {path.stem for path in folder.glob("*.py")}
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                found += [
                    f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    return found


def long_modules_without_a_reason(folder: Path) -> list[str]:
    """Modules over LONG_MODULE_LINES lines whose docstring does not say they hold one concept."""
    unexplained = []
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > LONG_MODULE_LINES:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            if "one concept" not in docstring.lower():
                unexplained.append(f"{path.name} ({text.count(chr(10))} lines)")
    return unexplained


def missing_names(folder: Path, scripts: list[Path]) -> list[str]:
    """`from module import name` in `scripts` where `module` is one of `folder`'s and defines no `name`."""
    defined: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        names: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    parts = target.elts if isinstance(target, ast.Tuple) else [target]
                    names |= {part.id for part in parts if isinstance(part, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        defined[path.stem] = names
    missing = []
    for script in scripts:
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in defined:
                missing += [
                    f"{script.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name != "*" and a.name not in defined[node.module]
                ]
    return missing


def test_no_import_circles_among_the_modules():
    assert import_circles(import_graph(ROOT)) == []


def test_no_module_imports_another_modules_private_names():
    assert private_imports(ROOT) == []


def test_every_module_over_700_lines_says_why_in_its_docstring():
    assert long_modules_without_a_reason(ROOT) == []


def test_every_name_the_bench_and_the_tests_import_from_a_module_is_there():
    """The bench scripts run by hand, never in CI: a name moved out of a module must not break them unseen."""
    scripts = sorted(ROOT.glob("bench/*.py")) + sorted(ROOT.glob("tests/*.py")) + sorted(ROOT.glob("*.py"))
    assert missing_names(ROOT, scripts) == []


def test_the_repository_is_flat_with_no_packages():
    assert not [path for path in ROOT.glob("*/__init__.py")], "top-level modules only: no packages"


def test_each_rule_catches_what_it_forbids(tmp_path):
    (tmp_path / "low.py").write_text('"""Low."""\nimport high\n', encoding="utf-8")
    (tmp_path / "high.py").write_text(
        '"""High."""\n\n\ndef later():\n    from low import _hidden\n', encoding="utf-8"
    )
    (tmp_path / "long.py").write_text('"""Long."""\n' + "x = 1\n" * (LONG_MODULE_LINES + 1), encoding="utf-8")
    assert import_circles(import_graph(tmp_path)) == [["high", "low", "high"]], "a lazy import closes it"
    assert private_imports(tmp_path) == ["high.py: low._hidden"]
    assert long_modules_without_a_reason(tmp_path) == [f"long.py ({LONG_MODULE_LINES + 2} lines)"]
    (tmp_path / "long.py").write_text(
        '"""Long: one concept, kept whole."""\n' + "x = 1\n" * (LONG_MODULE_LINES + 1), encoding="utf-8"
    )
    assert long_modules_without_a_reason(tmp_path) == []
    (tmp_path / "script.py").write_text("from low import gone\nfrom high import later\n", encoding="utf-8")
    assert missing_names(tmp_path, [tmp_path / "script.py"]) == ["script.py: low.gone"]
