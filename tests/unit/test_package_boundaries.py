"""Capabilities never import each other; the shared training core imports no capability, node schema or server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CAPABILITIES = ("unitune", "instantstyle", "controlnet_zero")
SHARED = "training"
NEVER_IN_ALGORITHMS = ("comfy_api", "server", "nodes")


def imported_packages(path: Path) -> set[str]:
    """First-level pack packages (relative imports) and top-level modules a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 2 and node.module:  # from ..unitune.x import y
                found.add(node.module.split(".")[0])
            elif node.level >= 2:  # from .. import unitune
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


@pytest.mark.parametrize("package", (*CAPABILITIES, SHARED))
def test_package_imports_only_the_shared_core(package):
    others = set(CAPABILITIES) - {package} | ({"nodes"} if package == SHARED else set())
    if package == SHARED:
        others |= set(CAPABILITIES)
    bad = {}
    for path in sorted((REPO / package).rglob("*.py")):
        hits = imported_packages(path) & (others | set(NEVER_IN_ALGORITHMS))
        if hits:
            bad[str(path.relative_to(REPO))] = sorted(hits)
    assert not bad, f"{package}/ imports what it must not: {bad}"


def test_the_checker_sees_a_cross_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..unitune.finetune import fingerprint\nfrom comfy_api.latest import io\n")
    assert imported_packages(probe) == {"unitune", "comfy_api"}
