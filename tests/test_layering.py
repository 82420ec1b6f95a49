"""Imports follow the layering in docs/design.md: a package imports only packages below it (or itself),
and the entry points on top do not import each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. Entry points and tools share the entry-point layer but never import each other; sail-chat
# sits above it, as it loads models through the converter's name mapping and checkpoint reader.
LAYERS = [
    ["config"],
    ["platform"],
    ["kernels"],
    ["data"],
    ["model"],
    ["training"],
    ["convert", "bench", "train"],
    ["chat"],
]
ENTRY_POINTS = len(LAYERS) - 2
RANK = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def _package_of(path: Path) -> str:
    if path.parts[0] == "kernels":
        return "kernels"
    rel = path.relative_to("sail_megatron")
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_packages(source: str):
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "sail_megatron" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_imports_follow_the_layers():
    wrong = []
    for folder in ("sail_megatron", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            own = _package_of(rel)
            if own in ("__init__", "__main__"):
                continue
            for line, imported in _imported_packages(path.read_text()):
                if imported not in RANK or imported == own:
                    continue
                upward = RANK[imported] > RANK[own]
                sideways = RANK[imported] == RANK[own] == ENTRY_POINTS
                if upward or sideways:
                    wrong.append(f"{rel}:{line} ({own}) imports {imported}")
    assert not wrong, "imports against the layering (docs/design.md, Layering):\n" + "\n".join(wrong)


def test_every_package_has_a_layer():
    packages = {p.name for p in (ROOT / "sail_megatron").iterdir() if p.is_dir() and not p.name.startswith("__")}
    packages |= {p.stem for p in (ROOT / "sail_megatron").glob("*.py") if not p.stem.startswith("__")}
    assert packages <= set(RANK), f"give these a layer: {sorted(packages - set(RANK))}"
