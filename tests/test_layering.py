"""The package layers, read from the source with `ast`, bottom to top: pixtral (the model library and
the EXL2 format), convert, calibration, quantize, recipes, runtime (engine, backends, chat, server,
eval, demo), cli. No module imports a layer above its own or beside it, no library module imports the
test fixtures, and module-level imports form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
RANK = {"pixtral": 0, "convert": 1, "calibration": 2, "quantize": 3, "recipes": 4, "runtime": 5, "cli": 6}
OURS = set(RANK) | {"tests"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in RANK:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of our modules that `module` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in OURS}


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_no_module_imports_a_layer_above_its_own() -> None:
    violations = []
    for module, path in _modules().items():
        source = _layer(module)
        for target in _imports(module, path, top_level_only=False):
            target_layer = _layer(target)
            if target_layer == "tests":
                violations.append(f"{module} imports a test fixture ({target})")
            elif target_layer != source and RANK[target_layer] >= RANK[source]:
                violations.append(f"{module} ({source}) imports {target} ({target_layer})")
    assert not violations, "\n".join(violations)


def test_module_level_imports_have_no_cycle() -> None:
    modules = _modules()
    graph = {m: {t for t in _imports(m, p, top_level_only=True) if t in modules and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The walker is not vacuous: an upward import in the model library is found, at any depth."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from quantize.gptq import gptq_quantize\n\ndef f():\n    from calibration import rows\n    from "
        "tests.support import synthetic\n"
    )
    found = _imports("pixtral.probe", probe, top_level_only=False)
    assert {"quantize.gptq", "calibration", "tests.support"} <= found
    assert _imports("pixtral.probe", probe, top_level_only=True) == {"quantize.gptq", "quantize.gptq.gptq_quantize"}


def _reach_throughs(path: Path) -> list[str]:
    """Where a module goes past the engine: `engine.backend…`, or another object's private names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute):
            base = node.value
            owner = base.attr if isinstance(base, ast.Attribute) else base.id if isinstance(base, ast.Name) else ""
            if node.attr == "backend" and owner == "engine":
                found.append(f"{path.name}:{node.lineno} engine.backend")
            elif node.attr.startswith("_") and not node.attr.startswith("__") and owner not in ("self", "cls"):
                found.append(f"{path.name}:{node.lineno} {owner}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and str(name.value).startswith("_"):
                found.append(f"{path.name}:{node.lineno} getattr(…, {name.value!r})")
    return found


def test_the_server_uses_the_engine_s_public_surface_only(tmp_path: Path) -> None:
    found = [hit for path in sorted((ROOT / "runtime" / "server").rglob("*.py")) for hit in _reach_throughs(path)]
    assert not found, "\n".join(found)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f(loaded, engine):\n    loaded.engine.backend.cfg\n    engine.backend\n    getattr(engine, "
        "'_worker')\n    loaded._x\n"
    )
    assert len(_reach_throughs(probe)) == 4
