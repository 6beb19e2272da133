"""osa_lib's layers run one way: every import, read from the source (imports inside functions too),
goes to the importer's own layer or a lower one, and no modules import each other in a loop.

A new module must be placed in ``LAYERS`` (the test fails until it is), so the map below stays the
map of the package. ``README.md`` draws the same layers.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "osa_lib"

#: Bottom to top. A module may import from its own layer (without loops) and from the layers below.
LAYERS = {
    "foundations": ["osa_lib.config", "osa_lib.layers", "osa_lib.transfer", "osa_lib.masks", "osa_lib.records",
                    "osa_lib.figures", "osa_lib.block_figures", "osa_lib.testing", "osa_lib.sdxl_metrics", "osa_lib.shipped",
                    "osa_lib.toy"],
    "toy world": ["osa_lib.toy.world", "osa_lib.toy.analyzer", "osa_lib.toy.metrics", "osa_lib.toy.flipbook"],
    "toy model": ["osa_lib.toy.model", "osa_lib.toy.reference", "osa_lib.toy.drawn_pool", "osa_lib.toy.train",
                  "osa_lib.toy.delta"],
    "backbones": ["osa_lib.backbones"],
    "method": ["osa_lib.attention", "osa_lib.bank", "osa_lib.baselines", "osa_lib.isolation", "osa_lib.locate"],
    "stories": ["osa_lib.story", "osa_lib.llm", "osa_lib.generation", "osa_lib.video"],
    "experiments": ["osa_lib.experiments", "osa_lib.experiments.maps", "osa_lib.experiments.stories",
                    "osa_lib.experiments.teaching", "osa_lib.experiments.exercises",
                    "osa_lib.inside_block", "osa_lib.controls", "osa_lib.claims"],
    "toy probes": ["osa_lib.toy.probes", "osa_lib.toy.probes.appearance", "osa_lib.toy.probes.binding",
                   "osa_lib.toy.probes.evaluate"],
    "face": ["osa_lib"],
}
#: Leaves: they import nothing from osa_lib, so anything can check its input or install a processor cheaply.
LEAVES = ("osa_lib.config", "osa_lib.layers", "osa_lib.transfer", "osa_lib.shipped", "osa_lib.toy.world")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> dict[str, int]:
    """The osa_lib modules that ``name`` imports, anywhere in its source, with a line number each.

    ``from . import world`` names the submodule ``world``; ``from .model import X`` names ``model``.
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES and target.startswith("osa_lib"):
                target = target.rpartition(".")[0]  # osa_lib.x.Name -> osa_lib.x
            if target in MODULES and target != name:
                found.setdefault(target, node.lineno)
    return found


def layer_of(name: str) -> int:
    for index, members in enumerate(LAYERS.values()):
        if name in members:
            return index
    raise KeyError(name)


def test_every_module_has_a_layer_and_only_one():
    placed = [m for members in LAYERS.values() for m in members]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert sorted(placed) == sorted(MODULES), (
        f"modules without a layer: {sorted(set(MODULES) - set(placed))}; layers naming no module: "
        f"{sorted(set(placed) - set(MODULES))}. Place the module in LAYERS (tests/test_layering.py) and README.md.")


def test_imports_run_downward_only():
    names = list(LAYERS)
    upward = [f"{module} ({names[layer_of(module)]}) imports {target} ({names[layer_of(target)]}) "
              f"at {MODULES[module].relative_to(ROOT)}:{line}"
              for module in MODULES for target, line in imports_of(module).items()
              if layer_of(target) > layer_of(module)]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_nothing_from_osa_lib(leaf):
    assert imports_of(leaf) == {}


def test_no_import_cycles():
    graph = {m: set(imports_of(m)) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_test_reads_imports_inside_functions_and_relative_submodules():
    """The reader itself: delta imports the training loop inside two functions, and the probes
    import ``world`` as ``from .. import world``."""
    assert "osa_lib.toy.train" in imports_of("osa_lib.toy.delta")
    assert "osa_lib.toy.world" in imports_of("osa_lib.toy.probes.binding")
    assert "osa_lib.backbones" in imports_of("osa_lib.toy.probes.binding")  # imported inside main()


def test_import_osa_lib_does_not_load_the_training_loop():
    code = "import sys, osa_lib; print('osa_lib.toy.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
