"""The package layers, read from the source with `ast`: runtime (model, engine) at the bottom, then
calibration, quantize, recipes; the CLI (`runtime/cli/`) is the one top layer that may import them all.
No module imports a layer above its own, nothing imports the CLI, and module-level imports form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
RANK = {"runtime": 0, "calibration": 1, "quantize": 2, "recipes": 3}
CLI = "runtime.cli"


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
    return {n for n in names if n.split(".")[0] in RANK}


def _layer(module: str) -> str:
    return "cli" if module == CLI or module.startswith(CLI + ".") else module.split(".")[0]


def test_no_module_imports_a_layer_above_its_own() -> None:
    violations = []
    for module, path in _modules().items():
        source = _layer(module)
        for target in _imports(module, path, top_level_only=False):
            target_layer = _layer(target)
            if target_layer == "cli" and source != "cli":
                violations.append(f"{module} imports the CLI ({target})")
            elif source != "cli" and RANK[target_layer] > RANK[source]:
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
    """The walker is not vacuous: an upward import in runtime is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from quantize.gptq import gptq_quantize\n\ndef f():\n    from calibration import rows\n")
    found = _imports("runtime.probe", probe, top_level_only=False)
    assert {"quantize.gptq", "calibration"} <= found
    assert _imports("runtime.probe", probe, top_level_only=True) == {"quantize.gptq", "quantize.gptq.gptq_quantize"}
