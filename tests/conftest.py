"""Shared fixtures for the three test tiers.

The tier of a test is the folder it lives in (``unit/``, ``node/``, ``e2e/``); the matching
marker is added here, so ``pytest -m node`` selects a tier. So is ``half`` (the UNet in bf16/fp16
computing natively, or stored in fp8), on every node/e2e/... test with a bf16/fp16/fp8 parameter or on
the half-precision server; a half test without such a parameter carries ``@pytest.mark.half`` itself.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import pytest

from harness import comfy_env

TIERS = ("unit", "node", "e2e", "reliability", "browser")
# comfy_extras modules that fail to import without torchaudio (left out on purpose: its wheels
# need another torch build). Any other "IMPORT FAILED" in the server log fails the e2e fixture.
KNOWN_OPTIONAL_IMPORT_FAILURES = {"nodes_audio.py", "nodes_audio_encoder.py"}


# A parameter with one of these values makes a test a `half` one (left out of `make test-quick`). Exact values,
# not parts of the test id: a file name such as "style_shuffle_fp16.safetensors" is no dtype.
HALF_PARAMS = {"bf16", "fp16", "fp8", "torch.bfloat16", "torch.float16", "torch.float8_e4m3fn", "torch.float8_e5m2"}
HALF_FIXTURES = {"comfy_server_half"}


def is_half(item) -> bool:
    """A test of the half-precision tier: a bf16/fp16/fp8 parameter, or the half-precision server."""
    if HALF_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(str(v) in HALF_PARAMS for v in callspec.params.values())


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if "unit" not in parts and is_half(item):  # unit tests are cheap maths on tensors of any dtype: all quick
            item.add_marker(pytest.mark.half)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """ComfyUI importable in-process on the CPU (the `node` tier)."""
    return comfy_env.import_comfy()


@pytest.fixture(scope="session")
def pack(comfy_root):
    """The pack imported as ComfyUI imports it: as a package, its root never on sys.path."""
    return comfy_env.import_pack()


@pytest.fixture(scope="session")
def pack_node_ids(pack) -> list[str]:
    from frozentune.nodes import NODE_CLASSES

    return [cls.GET_SCHEMA().node_id for cls in NODE_CLASSES]


@pytest.fixture(scope="session")
def tiny_checkpoints(comfy_root) -> dict[str, Path]:
    """The tiny SD1.5 and SDXL-family checkpoints, built once and cached, registered with folder_paths."""
    import folder_paths

    from harness import tiny_models

    paths = {family: tiny_models.checkpoint_path(family) for family in tiny_models.RECIPES}
    folder_paths.add_model_folder_path("checkpoints", str(tiny_models.cache_dir()))
    return paths


def pack_import_failures(log_text: str) -> list[str]:
    """Lines of a ComfyUI log that report a failed import other than the known optional ones."""
    failed = []
    for line in log_text.splitlines():
        if "IMPORT FAILED" not in line:
            continue
        m = re.match(r"^IMPORT FAILED: (\S+)$", line.strip())
        if m and m.group(1) in KNOWN_OPTIONAL_IMPORT_FAILURES:
            continue
        failed.append(line.strip())
    return failed


_LIVE_SERVERS: list = []


@contextlib.contextmanager
def checked_server(base: Path, pack_node_ids: list[str], **kwargs):
    """A started ComfyUI with FrozenTune; checked to have loaded the pack; other live test servers freed first."""
    from harness.server import ComfyServer, ServerError

    for other in _LIVE_SERVERS:  # one server's models at a time in memory (the SDXL-family CLIP is ~4 GiB)
        try:
            other.free()
        except (ServerError, OSError) as err:  # a dead server holds nothing; its own tests report why
            logging.getLogger(__name__).warning("could not free the server at %s: %s", other.url, err)
    srv = ComfyServer(base, **kwargs)
    srv.start()
    _LIVE_SERVERS.append(srv)
    try:
        failures = pack_import_failures(srv.log_text())
        assert not failures, "ComfyUI reported failed imports:\n" + "\n".join(failures)
        times = {p: t for p, t in srv.import_times().items() if Path(p).name == comfy_env.PACK_NAME}
        assert times, f"FrozenTune is missing from ComfyUI's import-times table:\n{srv.log_tail()}"
        info = srv.object_info()
        missing = [nid for nid in pack_node_ids if nid not in info]
        assert not missing, f"nodes missing from /object_info: {missing}"
        yield srv
    finally:
        _LIVE_SERVERS.remove(srv)
        srv.stop()
        logging.getLogger(__name__).info("ComfyUI log kept at %s", srv.log_path)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_checkpoints, pack_node_ids):
    """A headless ComfyUI with FrozenTune and the tiny models; checked to have loaded the pack."""
    from harness.server import prepare_base

    with checked_server(prepare_base(tmp_path_factory.mktemp("comfy_base")), pack_node_ids) as srv:
        yield srv


@pytest.fixture(scope="module")
def comfy_server_half(tmp_path_factory, tiny_checkpoints, pack_node_ids):
    """The same server in half-precision mode: UNets loaded in bf16 (``--bf16-unet``) computing natively in bf16.

    Module-scoped: it runs only while the e2e module that asks for it does.
    """
    from harness.server import HALF_ARGS, NATIVE_HALF_ENV, prepare_base

    base = prepare_base(tmp_path_factory.mktemp("comfy_base_half"))
    with checked_server(base, pack_node_ids, extra_args=HALF_ARGS, env={NATIVE_HALF_ENV: "1"}) as srv:
        yield srv


@pytest.fixture(scope="session")
def tiny_dit(comfy_root):
    """``tiny_dit(family) -> harness.tiny_dits.TinyDiT`` for "flux1", "flux1_schnell", "sd3": loaded once per session.

    Built and cached like the tiny checkpoints; the Flux detection shim is installed and the cache folders are
    ComfyUI model folders, so stock UNETLoader/VAELoader calls see the files. Never mutate what it returns.
    """
    from harness import tiny_dits

    tiny_dits.install_detection_shim()
    tiny_dits.register_folders()
    tiny_dits.build_all()  # every file on disk, so a stock loader node may ask for one before get() does
    yield tiny_dits.get
    tiny_dits.forget()


@pytest.fixture(autouse=True)
def one_thread_for_tiny_dits(request):
    """Tests on the tiny DiTs run torch on one thread: their ops are so small that two OpenMP threads on a
    shared 2-core machine spend 20-30x the time synchronizing (measured in tests/node/test_tiny_dits.py)."""
    if "tiny_dit" not in request.fixturenames:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
