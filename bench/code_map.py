#!/usr/bin/env python3
"""Measure the package's shape from its source: the import graph and the largest functions.

    python bench/code_map.py [--top 10]

Read with `ast`, nothing is imported or run. A command-line module is one with a top-level `main()`
and an `if __name__ == "__main__"` block (run as `python -m graspGPT.X`); every other module is a
library module, and no library module should import a command-line one. docs/DESIGN.md quotes
this script's output; tests/test_layout.py keeps the import rule from getting worse.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "graspGPT"


def modules() -> dict[str, Path]:
    """{dotted name: file} for every module of the package (`__init__` files are their package)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def imports(name: str, path: Path, known: set[str]) -> dict[str, bool]:
    """{imported package module: imported at module level} (a module imported lazily too counts as top-level)."""
    tree = ast.parse(path.read_text())
    top = set(id(n) for n in tree.body) | {id(n) for b in tree.body if isinstance(b, (ast.If, ast.Try))
                                             for n in ast.walk(b)}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from . import x
                pkg = _package_of(name, path).split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # graspGPT.data.vocab.Vocab -> graspGPT.data.vocab
                t = t.rpartition(".")[0]
            if t and t != name and t != "graspGPT":
                out[t] = out.get(t, False) or id(node) in top
    return out


def external_imports(path: Path) -> set[str]:
    """Top-level names of the modules from outside the package that a file imports (numpy, torch, ...)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add((node.module or "").split(".")[0])
    return out - {"graspGPT", "__future__"}


def is_command_line(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    runs_main = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
    return has_main and runs_main or path.name == "__main__.py"


def graph() -> dict[str, dict[str, bool]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def command_line_modules() -> list[str]:
    return [name for name, path in modules().items() if is_command_line(path)]


def library_imports_of_command_line() -> list[tuple[str, str]]:
    """(library module, command-line module it imports): what the layering rule forbids."""
    cli = set(command_line_modules())
    return sorted((a, b) for a, deps in graph().items() if a not in cli for b in deps if b in cli)


def command_line_imports_of_command_line() -> list[tuple[str, str]]:
    """(command-line module, command-line module it imports): library code that lives in a command-line module."""
    cli = set(command_line_modules())
    return sorted((a, b) for a, deps in graph().items() if a in cli for b in deps if b in cli)


def largest_functions(top: int) -> list[tuple[int, str]]:
    """[(lines, module:qualified name)], longest first; a function's lines include its docstring and nested defs."""
    found = []
    for name, path in modules().items():
        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.append((child.end_lineno - child.lineno + 1, f"{name}:{prefix}{child.name}"))
                    visit(child, f"{prefix}{child.name}.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
        visit(ast.parse(path.read_text()), "")
    return sorted(found, key=lambda f: (-f[0], f[1]))[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description="The package's import graph and largest functions.")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    cli, edges = set(command_line_modules()), graph()
    print("module | kind | imports (package modules; * = only inside a function)")
    for name, deps in edges.items():
        shown = ", ".join(f"{d.removeprefix('graspGPT.')}{'' if top else '*'}" for d, top in sorted(deps.items()))
        print(f"{name.removeprefix('graspGPT.')} | {'command line' if name in cli else 'library'} | {shown or '-'}")
    print("\nlibrary modules importing a command-line module:")
    for a, b in library_imports_of_command_line() or [("none", "")]:
        print(f"  {a} -> {b}" if b else "  none")
    print("command-line modules importing another command-line module (* = only inside a function):")
    for a, b in command_line_imports_of_command_line() or [("none", "")]:
        print(f"  {a} -> {b}{'' if edges[a][b] else '*'}" if b else "  none")
    print(f"\nthe {args.top} largest functions (lines):")
    for lines, where in largest_functions(args.top):
        print(f"  {lines:4d}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
