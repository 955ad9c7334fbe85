"""The package's import graph (module-level and function-local imports alike): no new cycles, no floor importing a later one."""

import ast
from pathlib import Path

from helpers import REPO

PKG = REPO / "cbir"
#: cycles allowed (none: the torch/onnx switch is the bottom floor cbir.runtime, the onnx runners register there by name)
KNOWN: set = set()


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


#: the floors, bottom up (../shared/DESIGN.md, "The shape"): a module imports only from its own floor or below. The longest matching prefix
#: decides; every module of the package must have one.
FLOORS = {
    "cbir": 0, "cbir.errors": 0, "cbir.registry": 0, "cbir.cliutil": 0, "cbir.progress": 0, "cbir.vectors": 0,
    "cbir.data": 1, "cbir.folders": 1, "cbir.demo": 1, "cbir.weights": 1, "cbir.runtime": 1,  # decoding, weights, the torch/onnx switch
    "cbir.models": 2,  # network definitions
    "cbir.index": 3, "cbir.eval": 3,  # the index folder and backends; metrics and plots
    "cbir.extractors": 4, "cbir.local": 4,  # global descriptors; local features, matchers, re-ranking
    "cbir.build": 5, "cbir.query": 5, "cbir.distributed": 5,  # the stages
    "cbir.update": 6, "cbir.sync": 6, "cbir.duplicates": 6, "cbir.eval.evaluate": 6, "cbir.eval.protocol": 6, "cbir.export": 6,  # stages built on the query stage; ONNX export
    "cbir.engine": 7,  # the facade over the stages
    "cbir.cli": 8, "cbir.serve": 8,  # the command line (one module per command) and the service
    "cbir.__main__": 9,
}


def _floor(mod):
    hits = [p for p in FLOORS if mod == p or mod.startswith(p + ".")]
    return FLOORS[max(hits, key=len)] if hits else None


def test_every_module_has_a_floor():
    assert not sorted(m for m in _graph() if _floor(m) is None)


def test_no_module_imports_a_later_floor():
    graph = _graph()
    bad = sorted(f"{m} ({_floor(m)}) -> {t} ({_floor(t)})" for m, ts in graph.items() for t in ts
                 if _floor(m) is not None and _floor(t) is not None and _floor(t) > _floor(m))
    assert not bad, bad


def test_nothing_below_the_engine_imports_it_or_the_cli():
    graph = _graph()
    top = {"cbir.engine", "cbir.cli"}
    allowed = {m for m in graph if (_floor(m) or 0) >= FLOORS["cbir.engine"]} | {"cbir"}
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if m not in allowed for t in ts & top)
    assert not bad, bad


def test_the_index_folder_layer_is_self_contained():
    graph = _graph()
    for m in ("cbir.index.atomic", "cbir.index.rows", "cbir.index.manifest", "cbir.index.folder", "cbir.index.verify",
              "cbir.index.store", "cbir.index.faiss_index", "cbir.index.backend", "cbir.index.gallery"):
        assert all(t.startswith("cbir.index") or t in ("cbir.errors",) for t in graph[m]), (m, graph[m])


# ----------------------------------------------------------------------------- private names stay in their module


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _owned_names(tree) -> set:
    """Private names a module's own classes define: class-body names, methods and ``self._x`` / ``cls._x`` targets."""
    out = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node in cls.body:
                out.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node in cls.body:
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Name):
                        out.add(t.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) \
                    and node.value.id in ("self", "cls"):
                out.add(node.attr)
    return out


def _private_reach_ins():
    """``FILE:LINE: what`` for each place a module of cbir imports, reads or sets another module's ``_name``:
    ``from x import _y``; ``x._y`` / ``getattr(x, "_y")`` on an imported module ``x``; ``obj._y = ...``,
    ``del obj._y`` or ``setattr(obj, "_y", ...)`` on anything but ``self`` / ``cls`` when no class of the module
    defines ``_y``. A private *module* (``local/_torch.py``) is the package's own: its siblings may import it."""
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    out = []
    for m, p in sorted(mods.items()):
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        tree = ast.parse(p.read_text(encoding="utf-8"))
        owned = _owned_names(tree)
        where = f"{p.relative_to(REPO)}"
        bound = {}  # local name -> the cbir module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                root = base[: len(base) - node.level + 1] if node.level else []
                mod = ".".join(root + ([node.module] if node.module else [])) if node.level else (node.module or "")
                for a in node.names:
                    full = f"{mod}.{a.name}"
                    if full in mods:
                        bound[a.asname or a.name] = full
                        if _is_private(a.name) and mod != package:
                            out.append(f"{where}:{node.lineno}: from {mod} import {a.name} (a module private to {mod})")
                    elif mod in mods and _is_private(a.name):
                        out.append(f"{where}:{node.lineno}: from {mod} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        bound[a.asname] = a.name if a.asname else None
                        bound.setdefault(a.name.split(".")[0], a.name.split(".")[0])
        bound = {k: v for k, v in bound.items() if k and v}

        def module_of(expr):
            if isinstance(expr, ast.Name):
                return bound.get(expr.id)
            if isinstance(expr, ast.Attribute):
                parent = module_of(expr.value)
                return f"{parent}.{expr.attr}" if parent and f"{parent}.{expr.attr}" in mods else None
            return None

        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                target = module_of(node.value)
                writes = isinstance(node.ctx, (ast.Store, ast.Del))
                if target and target != m:
                    out.append(f"{where}:{node.lineno}: {'sets' if writes else 'reads'} {target}.{node.attr}")
                elif writes and not target and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) \
                        and node.attr not in owned:
                    out.append(f"{where}:{node.lineno}: sets {ast.unparse(node)} (no class of {m} defines {node.attr})")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "delattr") \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                    and _is_private(node.args[1].value):
                name, target = node.args[1].value, module_of(node.args[0])
                if target and target != m:
                    out.append(f"{where}:{node.lineno}: {node.func.id}({target}, {name!r})")
                elif node.func.id != "getattr" and not target and name not in owned \
                        and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls")):
                    out.append(f"{where}:{node.lineno}: {node.func.id}({ast.unparse(node.args[0])}, {name!r}) (no class of {m} defines it)")
    return out


def test_no_module_imports_reads_or_sets_another_modules_private_names():
    """What several modules share is public; a module's ``_name`` is its own (``from x import _y``, ``x._y`` on a
    module, ``obj._y = v`` from outside the class that owns ``_y`` are what this refuses)."""
    bad = _private_reach_ins()
    assert not bad, f"{len(bad)} private reach-in(s):\n" + "\n".join(bad)
