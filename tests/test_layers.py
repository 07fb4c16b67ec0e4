"""The layers of DESIGN.md: a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import conveyor

ROOT = Path(conveyor.__file__).parent

# what each layer may import from conveyor (besides itself)
ALLOWED = {
    "_errors": set(),
    "_engine": {"_errors"},
    # metrics and traces: what the parts report to (they import no part)
    "metrics": {"_errors", "_engine"},
    "tracing": {"_errors"},
    "pipeline": {"_errors", "_engine", "metrics"},
    "tasks": {"_errors", "_engine", "metrics", "tracing"},
    "dispatch": {"_errors", "_engine"},
    "channels": {"_errors", "_engine"},
    "compat": set(),
    "cli": set(),
    "dashboard": set(),
    "top": set(),
    "__main__": set(),
}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0].removesuffix(".py") if len(rel) > 1 or rel[0] != "__init__.py" else ""


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    # the package a relative import starts from: the module's own package
    package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.add(mod)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "conveyor" or m.startswith("conveyor.")}


def test_no_layer_imports_a_higher_one() -> None:
    problems = []
    for path in ROOT.rglob("*.py"):
        layer = _layer(path)
        if layer not in ALLOWED:
            continue
        for mod in _imports(path):
            parts = mod.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if target == layer:
                continue
            if layer in ("compat", "cli", "dashboard", "top", "__main__"):
                # the thin layer uses the public API only (and __main__ runs the CLI)
                if target not in ("", "pipeline", "channels", "compat") and not (
                    (layer == "__main__" and target == "cli")
                    or (layer == "cli" and target in ("dashboard", "top"))
                    # the dashboard's rates are read as conveyor top reads them
                    or (layer == "dashboard" and target == "top")
                ):
                    problems.append(f"{path.relative_to(ROOT)} imports {mod}")
                continue
            if target not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert problems == []
