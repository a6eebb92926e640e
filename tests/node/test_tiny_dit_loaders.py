"""The e2e/demo server's stock loader nodes read the tiny Flux.1/SD3 text encoders and SD3 checkpoint.

ComfyUI builds its text encoders from fixed full-size configs, so the tiny ones carry their ``model_options``
in their metadata and ``harness.tiny_dits.install_text_encoder_shim`` (installed in the server by
``tests/harness/tiny_dit_node``) passes them on. Checked here: the stock nodes give what ``tiny_dits.get``
gives, they cannot without the shim, and every other file reaches the stock functions unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness.hashing import weight_hash

PROMPT = "a photo of a cat"


@pytest.fixture
def te_shim(tiny_dit):
    from harness import tiny_dits

    tiny_dits.install_text_encoder_shim()
    yield tiny_dits
    tiny_dits.uninstall_text_encoder_shim()


def encode(clip, text: str = PROMPT):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def assert_same_conditioning(a, b):
    assert torch.equal(a[0][0], b[0][0])
    assert torch.equal(a[0][1]["pooled_output"], b[0][1]["pooled_output"])


@pytest.mark.parametrize("family, names, kind", [("flux1", ("clip_l", "t5xxl"), "flux"),
                                                 ("sd3", ("clip_l", "clip_g"), "sd3")])
def test_stock_dual_clip_loader_reads_the_tiny_text_encoders(family, names, kind, te_shim, tiny_dit):
    import nodes

    files = [te_shim.text_encoder_path(n).name for n in names]
    clip = nodes.DualCLIPLoader().load_clip(*files, kind)[0]
    cond = encode(clip)
    assert cond[0][1]["pooled_output"].shape[-1] == te_shim.COND_WIDTHS[family][1]
    assert_same_conditioning(cond, tiny_dit(family).encode(PROMPT))


def test_stock_checkpoint_loader_reads_the_tiny_sd3_checkpoint(te_shim, tiny_dit):
    """The all-in-one SD3 checkpoint (what ComfyUI's SD3.5 templates load) is the tiny SD3, its VAE and its CLIPs."""
    import nodes

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(te_shim.checkpoint_path("sd3").name)[:3]
    sd3 = tiny_dit("sd3")
    assert type(model.model.model_config).__name__ == "SD3"
    assert weight_hash(model.model.diffusion_model) == weight_hash(sd3.model.model.diffusion_model)
    assert vae.latent_channels == 16
    assert_same_conditioning(encode(clip), sd3.encode(PROMPT))
    image = torch.rand(1, 64, 64, 3)
    assert torch.equal(vae.encode(image), sd3.vae.encode(image))


def test_without_the_shim_the_stock_loader_cannot_read_them(te_shim):
    """The shim is what makes the tiny files load (a full-size CLIP-L is built and the tiny weights do not fit)."""
    import nodes

    with te_shim.without_text_encoder_shim():
        with pytest.raises(RuntimeError, match="size mismatch"):
            nodes.CLIPLoader().load_clip(te_shim.text_encoder_path("clip_l").name, "stable_diffusion")
    assert nodes.CLIPLoader().load_clip(te_shim.text_encoder_path("clip_l").name, "stable_diffusion")[0]


@pytest.fixture
def spied(monkeypatch, tiny_dit):
    """The shim installed over recorders of what reaches ComfyUI's functions."""
    import comfy.sd

    from harness import tiny_dits

    calls = []
    with tiny_dits.without_text_encoder_shim():
        monkeypatch.setattr(comfy.sd, "load_clip", lambda *a, **k: calls.append(("load_clip", a, k)))
        monkeypatch.setattr(comfy.sd, "load_state_dict_guess_config",
                            lambda *a, **k: calls.append(("guess", a, k)))
        tiny_dits.install_text_encoder_shim()
        yield comfy.sd, calls
        monkeypatch.undo()  # the recorders go before the shim comes back


def test_the_shim_passes_other_files_unchanged(spied, tmp_path, tiny_checkpoints):
    import safetensors.torch

    from harness import tiny_dits

    sd, calls = spied
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(plain), metadata={"other": "1"})
    not_safetensors = tmp_path / "clip.pt"
    torch.save({"x": torch.zeros(1)}, not_safetensors)
    options = {"load_device": "cpu"}
    paths = [str(plain), str(not_safetensors), str(tiny_checkpoints["sd15"])]
    sd.load_clip(paths, None, sd.CLIPType.FLUX, options)
    assert calls[-1] == ("load_clip", (paths,), {"embedding_directory": None, "clip_type": sd.CLIPType.FLUX,
                                                 "model_options": options})
    assert calls[-1][2]["model_options"] is options

    state = {"x": torch.zeros(1)}
    te_options = {"a": 1}
    sd.load_state_dict_guess_config(state, True, True, False, None, True, {}, te_model_options=te_options,
                                    metadata={"other": "1"})
    assert calls[-1][2]["te_model_options"] is te_options
    sd.load_state_dict_guess_config(state)
    assert calls[-1] == ("guess", (state,), {})
    assert tiny_dits.te_options_of(paths) == {}


def test_the_shim_adds_the_tiny_options_and_keeps_the_callers(spied):
    from harness import tiny_dits

    sd, calls = spied
    paths = [str(tiny_dits.text_encoder_path("clip_l")), str(tiny_dits.text_encoder_path("t5xxl"))]
    sd.load_clip(paths, clip_type=sd.CLIPType.FLUX, model_options={"load_device": "cpu"})
    assert calls[-1][2]["model_options"] == {"load_device": "cpu", **tiny_dits.text_encoder_options("flux1")}

    metadata = {tiny_dits.TE_OPTIONS_KEY: json.dumps({"clip_l_model_config": tiny_dits.CLIP_CONFIG})}
    sd.load_state_dict_guess_config({}, True, True, False, None, True, {}, te_model_options={"keep": 1},
                                    metadata=metadata)
    assert calls[-1][2]["te_model_options"] == {"keep": 1, "clip_l_model_config": tiny_dits.CLIP_CONFIG}
    sd.load_state_dict_guess_config({}, True, True, False, None, True, {}, {"keep": 2}, metadata)  # positional
    assert calls[-1][1][7] == {"keep": 2, "clip_l_model_config": tiny_dits.CLIP_CONFIG}


def test_uninstall_puts_the_stock_functions_back(tiny_dit):
    import comfy.sd

    from harness import tiny_dits

    with tiny_dits.without_text_encoder_shim():
        stock = comfy.sd.load_clip, comfy.sd.load_state_dict_guess_config
        tiny_dits.install_text_encoder_shim()
        tiny_dits.install_text_encoder_shim()  # idempotent: one layer
        assert comfy.sd.load_clip.stock is stock[0]
        assert tiny_dits.uninstall_text_encoder_shim()
        assert (comfy.sd.load_clip, comfy.sd.load_state_dict_guess_config) == stock
        assert not tiny_dits.uninstall_text_encoder_shim()
