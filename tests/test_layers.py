"""The package's import direction: a module imports only from its own layer or a lower one (docs/design.md,
"Package layout"). Function-level imports count too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gencnp"
# Lowest first; a module may import from its own layer and from the layers before it.
LAYERS = [
    {"io", "settings", "registry", "threads", "version"},
    {"targets"},
    {"data", "pathways"},
    {"banks"},
    {"systems", "callbacks", "tracking"},
    {"evaluation", "detection"},
    {"pipeline", "cli", "commands"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str | None:
    """``gencnp.<unit>[...]`` -> ``unit``; anything outside gencnp -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "gencnp" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "gencnp":  # from gencnp import x
                found += [(node.lineno, f"gencnp.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "__init__.py")


def test_every_unit_of_the_package_has_a_layer():
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()}
    assert units - set(LAYER_OF) == set(), "new module or sub-package: give it a layer in LAYERS and docs/design.md"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_to_the_same_or_a_lower_layer(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    upward = []
    for line, module in _imports(path):
        unit = _unit(module)
        if unit is None or unit == own:
            continue
        if unit not in LAYER_OF or LAYER_OF[unit] > LAYER_OF[own]:
            upward.append(f"line {line}: {module} (layer {LAYER_OF.get(unit, '?')} > {own}'s {LAYER_OF[own]})")
    assert not upward, f"{path.relative_to(PACKAGE)} imports from a higher layer: " + "; ".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from gencnp.pipeline.run import main\n    import gencnp.evaluation.report\n")
    units = [_unit(m) for _, m in _imports(bad)]
    assert units == ["pipeline", "evaluation"]
    assert all(LAYER_OF[u] > LAYER_OF["targets"] for u in units)
