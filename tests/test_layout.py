"""The package's shape: layers import only downwards, no import cycle, torch stays optional.

Every ``import`` inside ``emdppl`` counts, at module level and inside functions (lazy imports
are still dependencies); only ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import emdppl

ROOT = Path(emdppl.__file__).parent

#: Lower layers first; a module may import only from strictly earlier lines (``emdppl/__init__``
#: excepted). Must match the layout in ``emdppl/__init__.py``.
LAYERS = [
    ["base"],
    ["timing", "sharding", "distributed", "curvature", "datasets"],
    ["diagnostics"],
    ["driver"],
    ["initialization"],
    ["kernels", "kernels.mala", "kernels.ula"],
    ["samplers"],
    ["reparam"],
    ["target"],
    ["predictive"],
    ["bridge", "bridge.callback", "bridge.aten"],
    ["bridge.pyro_model"],
    ["bridge.pyro_target", "bridge.pyro_predictive"],
    ["problem"],
    ["inference_data"],
    ["mcmc", "svi"],
    ["bridge.pyro_svi"],
    ["schedule"],
    ["losses"],
    ["teachers"],
    ["networks", "image_metrics"],
    ["bridge.torch_teacher"],
    ["generators"],
    ["distill_config"],
    ["estep"],
    ["emd"],
    ["distillation"],
    ["infer"],
    ["models", "pyro"],
    ["digits"],
    ["demo"],
    ["cli"],
]

#: Upward imports kept for one release as deprecation paths (they warn when used).
DEPRECATED = {("teachers", "bridge.torch_teacher")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The emdppl modules ``path`` imports (``from emdppl import x`` counts x if a module)."""
    found: set[str] = set()

    def add(module: str) -> None:
        while module and module not in known:
            module = module.rpartition(".")[0]
        if module and module != name:
            found.add(module)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("emdppl."):
                    add(alias.name.removeprefix("emdppl."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "emdppl":
                for alias in node.names:
                    add(alias.name)
            elif node.module.startswith("emdppl."):
                base = node.module.removeprefix("emdppl.")
                for alias in node.names:
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def test_every_module_has_a_layer():
    layered = {m for layer in LAYERS for m in layer}
    assert set(_modules()) - {""} <= layered, sorted(set(_modules()) - layered)


def test_imports_only_go_down_the_layers():
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = sorted(
        (module, imported)
        for module, imports in _graph().items()
        for imported in imports
        if module in level
        and level[imported] >= level[module]
        and (module, imported) not in DEPRECATED
        and not imported.startswith(module + ".")  # a package re-exporting its modules
    )
    assert not upward, f"imports from a layer to the same or a higher one: {upward}"


def test_no_import_cycle():
    graph = _graph()
    graph["bridge"] = set()  # the package's lazy __getattr__ re-exports are not dependencies
    for module, imported in DEPRECATED:
        graph[module].discard(imported)
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path, node, nxt]))
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == [], f"import cycles: {cycles}"


def test_import_emdppl_does_not_import_torch_pyro_arviz_or_xarray():
    """Each is imported where it is first needed (xarray and pandas: about 0.7 s)."""
    heavy = "{'torch', 'pyro', 'arviz', 'xarray', 'pandas'}"
    code = f"import sys, emdppl; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
