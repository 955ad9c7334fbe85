"""The package's import graph (module-level and function-local imports alike): no new cycles, no floor importing a later one."""

import ast
from pathlib import Path

from helpers import REPO

PKG = REPO / "cbir"
#: the one cycle left, through the torch/onnx runtime switch (export/runtime <-> export/onnx <-> extractors, local);
#: moving the switch to the bottom floor removes it (issue 12). Any other cycle, or a larger one, fails.
KNOWN = {frozenset({"cbir.export.onnx", "cbir.export.runtime", "cbir.extractors", "cbir.extractors.base", "cbir.extractors.classmap",
                    "cbir.extractors.colour", "cbir.extractors.fused", "cbir.extractors.hashing", "cbir.extractors.pooled",
                    "cbir.extractors.semantic", "cbir.extractors.vlad", "cbir.extractors.whitening", "cbir.local", "cbir.local._torch",
                    "cbir.local.base", "cbir.local.loftr"})}


def _graph():
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        base = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                root = base[: len(base) - node.level + 1] if node.level else []
                mod = ".".join(root + ([node.module] if node.module else [])) if node.level else (node.module or "")
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def _cycles(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return set(out)


def test_no_new_import_cycles():
    cycles = _cycles(_graph())
    assert cycles <= KNOWN, [sorted(c) for c in cycles - KNOWN]


def test_nothing_below_the_engine_imports_it_or_the_cli():
    graph = _graph()
    top = {"cbir.engine", "cbir.cli"}
    allowed = {"cbir", "cbir.__main__", "cbir.cli", "cbir.engine", "cbir.local.cli", "cbir.export.cli", "cbir.paddle_cli", "cbir.segment_cli"}
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if m not in allowed for t in ts & top)
    assert not bad, bad


def test_the_index_folder_layer_is_self_contained():
    graph = _graph()
    for m in ("cbir.index.store", "cbir.index.faiss_index", "cbir.index.backend"):
        assert all(t.startswith("cbir.index") or t in ("cbir.errors",) for t in graph[m]), (m, graph[m])
