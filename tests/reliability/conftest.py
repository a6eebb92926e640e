"""The reliability tier's server: a real ComfyUI with FrozenTune and the tiny models, started under umask 022.

umask 022 is ComfyUI's usual default (a plain ``python main.py`` on most Linux systems), so the file modes
the saves produce are the ones a shared install would see. One server serves the whole tier; the soak test
starts a second, fresh one to compare against.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from harness import graphs, hostile

UMASK = 0o022


def root_conftest(config):
    """tests/conftest.py as pytest loaded it (its ``checked_server`` keeps the list of live servers)."""
    for plugin in config.pluginmanager.get_plugins():
        if hasattr(plugin, "checked_server") and hasattr(plugin, "_LIVE_SERVERS"):
            return plugin
    raise RuntimeError("tests/conftest.py is not loaded")


@contextlib.contextmanager
def start_checked(config, base: Path, pack_node_ids: list[str]):
    """``conftest.checked_server`` under umask 022 (the server process inherits the umask at start)."""
    old = os.umask(UMASK)
    try:
        cm = root_conftest(config).checked_server(base, pack_node_ids)
        srv = cm.__enter__()
    finally:
        os.umask(old)
    try:
        yield srv
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def hostile_server(request, tmp_path_factory, tiny_checkpoints, pack_node_ids):
    from harness.server import prepare_base

    base = prepare_base(tmp_path_factory.mktemp("reliability") / "base")
    with start_checked(request.config, base, pack_node_ids) as srv:
        yield srv


def saved_by(srv, graph: graphs.Graph, relative: str) -> Path:
    """Run ``graph`` (it saves a file) and return the file it wrote at ``relative`` under the base directory."""
    outcome = hostile.run(srv, graph.prompt())
    assert outcome.status == "success", outcome.message
    path = srv.base / relative
    assert path.is_file(), sorted(p.name for p in path.parent.iterdir())
    return path


@pytest.fixture(scope="session")
def unitune_file(hostile_server) -> Path:
    """A real UniTune result (one LoRA step on the tiny SD1.5) in models/unitune/, saved by UniTune Save."""
    return saved_by(hostile_server, graphs.unitune_save(filename="unitune/reliability_base"),
                    "models/unitune/reliability_base.safetensors")


@pytest.fixture(scope="session")
def embeds_file(hostile_server) -> Path:
    """Real InstantStyle embeds (and negative) of the example image in models/ipadapter_embeds/, by Save Embeds."""
    return saved_by(hostile_server, graphs.instantstyle_save_embeds(filename="reliability_base"),
                    "models/ipadapter_embeds/reliability_base.safetensors")


@pytest.fixture
def fresh_server(request, tmp_path_factory, tiny_checkpoints, pack_node_ids):
    """Call it to start another, fresh server (``with fresh_server() as srv:``); it frees the shared one first."""
    from harness.server import prepare_base

    def start():
        return start_checked(request.config, prepare_base(tmp_path_factory.mktemp("fresh") / "base"), pack_node_ids)

    return start
