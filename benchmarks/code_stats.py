"""Code statistics of `latentseg/` quoted by the redesign issue: `if`/ternary tests that compare a
mode field, function lengths, and import cycles. `python -m benchmarks.code_stats`."""

from __future__ import annotations

import ast
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "latentseg"
MODE_FIELDS = {
    "mode",
    "prediction_type",
    "denoiser_heads",
    "text_fusion",
    "prompt",
    "sampler",
    "timesteps",
    "condition",
    "label_autoencoder",
    "image_encoder",
    "label_encoder",
    "x0_estimate",
    "staged_final_head",
}


def _names(node: ast.AST) -> set[str]:
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute):
            found.add(sub.attr)
        elif isinstance(sub, ast.Name):
            found.add(sub.id)
    return found


def mode_tests(tree: ast.AST) -> list[int]:
    """Lines of `if` / ternary tests holding a comparison that names a mode field."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp)):
            compares = [c for c in ast.walk(node.test) if isinstance(c, ast.Compare)]
            if any(_names(c) & MODE_FIELDS for c in compares):
                lines.append(node.lineno)
    return lines


def function_lengths(tree: ast.AST) -> list[tuple[str, int]]:
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def imports(path: Path, tree: ast.AST) -> set[str]:
    """Modules of the package imported anywhere in the file (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("latentseg"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("latentseg")}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules (package __init__ re-exports excluded)."""
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def main() -> None:
    tests, lengths, graph = {}, [], {}
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(ROOT.parent))
        found = mode_tests(tree)
        if found:
            tests[rel] = len(found)
        lengths += [(f"{rel}:{name}", n) for name, n in function_lengths(tree)]
        if path.name != "__init__.py":
            graph[module_name(path)] = {m for m in imports(path, tree) if not m.endswith("__init__")}
    for m in list(graph):  # an import of a package means its __init__, which only re-exports
        graph[m] = {n for n in graph[m] if n in graph}
    longest = sorted(lengths, key=lambda x: -x[1])[:8]
    report = {
        "mode_tests": sum(tests.values()),
        "mode_tests_by_file": dict(sorted(tests.items(), key=lambda x: -x[1])),
        "functions": len(lengths),
        "median_function_lines": statistics.median(n for _, n in lengths),
        "functions_over_60_lines": [f"{name} ({n})" for name, n in lengths if n > 60],
        "longest": [f"{name} ({n})" for name, n in longest],
        "import_cycles": [" -> ".join(c) for c in cycles(graph)],
    }
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
