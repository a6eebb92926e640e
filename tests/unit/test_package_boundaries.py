"""Imports go one way: nodes -> capabilities -> shared -> comfy.*/torch, along the edges this table allows.

A package may import itself and the packages listed for it; nothing else of the pack. Only ``nodes/``
imports the node schema or the server. A node file (``*_nodes.py``) never imports another node file:
what two node files share lives in a node helper module (``checks``, ``saved_files``, ``sampling_inputs``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = ("training", "storage", "families", "sampling")
CAPABILITIES = ("unitune", "textual_inversion", "guidance", "instantstyle", "controlnet_zero")
ALLOWED: dict[str, set[str]] = {
    "nodes": {*CAPABILITIES, *SHARED},
    "unitune": {"textual_inversion", "guidance", *SHARED},  # pivotal tuning; the edit's guider
    "textual_inversion": {*SHARED},
    "guidance": {*SHARED},
    "instantstyle": {*SHARED},
    "controlnet_zero": {*SHARED},
    "training": {"storage", "families"},
    "storage": set(),
    "families": set(),
    "sampling": set(),
}
PACKAGES = set(ALLOWED)
SERVER_SIDE = {"comfy_api", "server"}  # node schema and server: nodes/ only


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


def forbidden_imports(package: str, path: Path) -> set[str]:
    """What ``path`` (a file of ``package``) imports across an edge the table does not allow."""
    hits = imported_packages(path) & (PACKAGES | SERVER_SIDE | {"nodes"})
    allowed = ALLOWED[package] | {package} | (SERVER_SIDE if package == "nodes" else set())
    return hits - allowed


def sibling_node_files(path: Path) -> set[str]:
    """The ``*_nodes`` modules a node file imports (``from .x_nodes import ...`` or ``from . import x_nodes``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found.update(n.split(".")[0] for n in names if n.split(".")[0].endswith("_nodes"))
    return found


def test_every_package_is_in_the_table():
    on_disk = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench"}
    assert on_disk == PACKAGES, f"add {sorted(on_disk - PACKAGES)} to ALLOWED / drop {sorted(PACKAGES - on_disk)}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_only_along_allowed_edges(package):
    bad = {str(path.relative_to(REPO)): sorted(hits) for path in sorted((REPO / package).rglob("*.py"))
           if (hits := forbidden_imports(package, path))}
    assert not bad, f"{package}/ imports across an edge the table does not allow: {bad}"


def test_no_node_file_imports_another():
    bad = {path.name: sorted(hits) for path in sorted((REPO / "nodes").glob("*_nodes.py"))
           if (hits := sibling_node_files(path))}
    assert not bad, f"node files import other node files (move what they share to a helper module): {bad}"


def test_the_checker_sees_a_forbidden_edge(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..unitune.finetune import fingerprint\nfrom comfy_api.latest import io\n")
    assert imported_packages(probe) == {"unitune", "comfy_api"}
    assert forbidden_imports("controlnet_zero", probe) == {"unitune", "comfy_api"}
    assert forbidden_imports("nodes", probe) == set()
    probe.write_text("from .. import instantstyle\n")
    assert forbidden_imports("training", probe) == {"instantstyle"}
    assert forbidden_imports("storage", probe) == {"instantstyle"}


def test_the_checker_sees_a_node_file_import(tmp_path):
    probe = tmp_path / "probe_nodes.py"
    probe.write_text("from .textual_inversion_nodes import embedding_target\nfrom . import checks, unitune_nodes\n")
    assert sibling_node_files(probe) == {"textual_inversion_nodes", "unitune_nodes"}


def test_no_two_modules_share_a_name():
    seen: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path.name != "__init__.py":
                seen.setdefault(path.stem, []).append(str(path.relative_to(REPO)))
    assert not {k: v for k, v in seen.items() if len(v) > 1}
