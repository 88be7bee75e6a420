"""Imports point down only: kernels <- io <- model <- train <- cli.

Read from the source with ``ast``, so imports inside functions count too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fusedgpt"
LAYERS = ("kernels", "io", "model", "train", "cli")


def imported_layers(path: Path) -> set[str]:
    """The fusedgpt layers (``LAYERS``) that one source file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fusedgpt" and len(parts) > 1 and parts[1] in LAYERS:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_a_layer_imports_nothing_above_it(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no sources under fusedgpt/{layer}"
    upward = {str(f.relative_to(PACKAGE)): sorted(imported_layers(f) & above) for f in files}
    assert {f: layers for f, layers in upward.items() if layers} == {}


def test_the_scan_sees_an_upward_import(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from fusedgpt.train.trainer import Trainer\n")
    assert imported_layers(source) == {"train"}
