"""Fixtures the node tests of several files share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def style_image(comfy_root):
    """A smooth 64 px IMAGE for the InstantStyle tests (``harness.tiny_ipadapter.style_image``)."""
    from harness import tiny_ipadapter

    return tiny_ipadapter.style_image()


@pytest.fixture(scope="module")
def flux(tiny_dit, pack):
    """The tiny Flux.1 dev kit (``harness.tiny_dits``) of the ControlNet-Zero Flux tests; a module's own ``flux``
    fixture replaces it."""
    return tiny_dit("flux1")


@pytest.fixture()
def controlnet_folder(tmp_path, monkeypatch):
    """ComfyUI's controlnet folder (what Save writes and ControlNetLoader reads), and its output, input and temp
    folders, in a temp folder."""
    import folder_paths

    folder = tmp_path / "controlnet"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnet", ([str(folder)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    return folder


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory, pack):
    """A fresh folder as ComfyUI's only ``embeddings`` folder for the module (restored after)."""
    import folder_paths

    folder = tmp_path_factory.mktemp("embeddings")
    saved = folder_paths.folder_names_and_paths["embeddings"]
    folder_paths.folder_names_and_paths["embeddings"] = ([str(folder)], saved[1])
    yield folder
    folder_paths.folder_names_and_paths["embeddings"] = saved


@pytest.fixture
def captured(monkeypatch):
    """The conditioning UniTune Fine-Tune hands to the trainer, per run."""
    from frozentune.unitune import finetune

    seen = []
    stock = finetune.fine_tune

    def fine_tune(base, latents, conditioning, settings, **kwargs):
        seen.append(conditioning)
        return stock(base, latents, conditioning, settings, **kwargs)

    monkeypatch.setattr(finetune, "fine_tune", fine_tune)
    return seen
