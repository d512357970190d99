"""The import graph of vlmedge/: layers point one way and no module imports itself back through others.

Every import is read (module level and inside functions: a lazy import is still a dependency), so an arrow from a
lower layer to a higher one fails here, as docs/architecture.md says: models, data and the runtime know
nothing of stages; targets need no training code; stages know no CLI.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlmedge"

# Higher layers may import lower ones, never the reverse. Modules of one layer may import each other.
LAYERS = [
    {"errors", "disk", "_hf", "_registry", "_progress", "preprocess", "artifact", "options"},
    {"runtime", "data", "models", "evaluate", "losses"},  # the shared kit: ONNX Runtime, datasets, model surgery,
    # metrics, the losses several families train with
    {"families"},  # one package per family: its model, data adapters, tasks, export graphs, scenarios
    {"train"},
    {"stages"},
    {"targets", "recipe", "gate"},
    {"bench", "report", "pipeline"},
    {"cli", "__main__"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """vlmedge modules imported anywhere in a file (absolute names)."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found.update(n for n in [target, *names] if n.startswith("vlmedge"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vlmedge"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else "vlmedge"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    wrong = []
    for module, imports in _graph().items():
        if _top(module) == "vlmedge":
            continue
        for target in imports:
            if _top(target) == "vlmedge":
                continue
            if LAYER_OF[_top(target)] > LAYER_OF[_top(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_every_module_has_a_layer():
    assert {_top(m) for m in _graph()} - {"vlmedge"} <= set(LAYER_OF)


def test_no_import_circle_between_packages():
    edges = {}
    for module, imports in _graph().items():
        for target in imports:
            a, b = _top(module), _top(target)
            if a != b and "vlmedge" not in (a, b):
                edges.setdefault(a, set()).add(b)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in edges.get(start, ()))

    circles = sorted(a for a in edges if reaches(a, a))
    assert not circles, circles


def test_the_board_runner_needs_no_vlmedge_beyond_its_bundle():
    """The runner and the runtime modules copied to a board import only each other (and numpy, ONNX Runtime)."""
    from vlmedge.targets.jetson import BUNDLE_CODE

    bundle = {_module(PACKAGE / name) for name in BUNDLE_CODE}
    for name in BUNDLE_CODE:
        assert _imports(PACKAGE / name) - {"vlmedge.runtime"} <= bundle, name


def test_no_module_outside_a_family_package_imports_a_family():
    """Shared code names no family: only `families/<name>/` imports `families/<name>/` (the registry finds each
    package by its name in `families.MODULES`, not by an import)."""
    packages = {p.parent.name for p in (PACKAGE / "families").glob("*/__init__.py")}
    assert packages >= {"dual_encoder", "generative", "matching"}
    wrong = []
    for module, imports in _graph().items():
        for target in imports:
            parts = target.split(".")
            if len(parts) > 2 and parts[1] == "families" and parts[2] in packages \
                    and module.split(".")[:3] != parts[:3]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong
