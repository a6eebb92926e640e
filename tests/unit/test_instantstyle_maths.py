"""InstantStyle maths without ComfyUI: file loading and detection, image projections against diffusers,
the content subtraction, custom block parsing."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from harness import tiny_ipadapter
from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; its root import is lazy, so ComfyUI is not needed here
from frozentune.instantstyle import adapter_file, blocks, projection, subtraction  # noqa: E402

SDXL_LAYERS = [(640, 2048)] * 4 + [(1280, 2048)] * 3  # a few attn2 shapes, real SDXL widths


def adapter(sd: dict, name: str = "test") -> adapter_file.IPAdapter:
    return adapter_file.from_sections(adapter_file.split_sections(sd, name), name)


def diffusers_projection(sd: dict):
    """diffusers' own loader for IP-Adapter image projections (original key layout -> diffusers module)."""
    from diffusers import UNet2DConditionModel

    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    return UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(None, proj, low_cpu_mem_usage=False).eval()


def assert_close(got, expected, tol=1e-5):
    err = (got - expected).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g}"


@pytest.mark.parametrize("cross, width", [(2048, 1280), (2048, 1024), (768, 1024)])
def test_plain_projection_equals_diffusers_image_projection(cross, width):
    from diffusers.models.embeddings import ImageProjection

    sd = tiny_ipadapter.ipadapter_state_dict([(320, cross)], width, "plain", random_norms=True)
    ref = diffusers_projection(sd)
    assert isinstance(ref, ImageProjection)
    embeds = torch.randn(3, width, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        expected = ref(embeds)
    got = projection.project(adapter(sd), embeds)
    assert got.shape == (3, 4, cross)
    assert_close(got, expected)


def test_plus_projection_equals_diffusers_resampler():
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    proj = tiny_ipadapter.resampler_sd(cross_dim=2048, embed_width=96, hidden=128, heads=2, depth=4)
    sd = {"image_proj." + k: v for k, v in proj.items()}
    sd.update({f"ip_adapter.1.to_{w}_ip.weight": torch.randn(320, 2048) for w in "kv"})
    ref = diffusers_projection(sd)
    assert isinstance(ref, IPAdapterPlusImageProjection)
    hidden = torch.randn(2, 257, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(hidden)
    ad = adapter(sd)
    assert (ad.projection, ad.tokens, ad.embed_width, ad.cross_dim) == ("plus", 16, 96, 2048)
    assert_close(projection.project(ad, hidden), expected)


def test_projection_refuses_features_of_the_wrong_encoder():
    ad = adapter(tiny_ipadapter.ipadapter_state_dict(SDXL_LAYERS, 1280))
    with pytest.raises(ValueError, match="W = 1280 \\(ViT-bigG\\).*1024"):
        projection.project(ad, torch.zeros(1, 1024))


def test_detects_family_projection_and_width_from_every_file_layout(tmp_path):
    flat = tiny_ipadapter.ipadapter_state_dict(SDXL_LAYERS, 1280)
    sections = adapter_file.split_sections(flat)
    safetensors.torch.save_file(flat, str(tmp_path / "a.safetensors"))
    torch.save(sections, tmp_path / "b.bin")  # the h94 .bin layout: {"image_proj": ..., "ip_adapter": ...}
    training = {k.replace("image_proj.", "image_proj_model.").replace("ip_adapter.", "adapter_modules."): v
                for k, v in flat.items()}
    safetensors.torch.save_file(training, str(tmp_path / "c.safetensors"))
    loaded = [adapter_file.load(tmp_path / n) for n in ("a.safetensors", "b.bin", "c.safetensors")]
    for ad in loaded:
        assert (ad.family, ad.projection, ad.tokens, ad.embed_width, ad.encoder) == ("sdxl", "plain", 4, 1280,
                                                                                       "ViT-bigG")
        assert len(ad.layers) == len(SDXL_LAYERS)
        assert torch.equal(ad.layers[3][1], flat["ip_adapter.7.to_v_ip.weight"])
    sd15 = adapter(tiny_ipadapter.ipadapter_state_dict([(320, 768), (640, 768)], 1024))
    assert (sd15.family, sd15.encoder, sd15.cross_dim) == ("sd15", "ViT-H", 768)
    plus = adapter(tiny_ipadapter.ipadapter_state_dict(SDXL_LAYERS, 1280, "plus"))
    assert (plus.projection, plus.tokens, plus.encoder) == ("plus", 16, "ViT-H")  # penultimate ViT-H is 1280 wide


def test_deepcopy_shares_the_weights():
    import copy

    ad = adapter(tiny_ipadapter.ipadapter_state_dict(SDXL_LAYERS, 1280))
    assert copy.deepcopy({"a": ad})["a"] is ad


def test_bad_files_get_clear_errors(tmp_path):
    flat = tiny_ipadapter.ipadapter_state_dict(SDXL_LAYERS, 1280)
    with pytest.raises(adapter_file.IPAdapterFileError, match="not an IP-Adapter file"):
        adapter_file.split_sections({"model.diffusion_model.x": torch.zeros(1)}, "ckpt.safetensors")
    full = {k: v for k, v in flat.items() if k.startswith("ip_adapter.")}
    full.update({"image_proj.proj.0.weight": torch.zeros(4, 4), "image_proj.proj.3.weight": torch.zeros(4)})
    with pytest.raises(adapter_file.IPAdapterFileError, match="IP-Adapter Full"):
        adapter(full)
    renumbered = {k.replace("ip_adapter.3.", "ip_adapter.4."): v for k, v in flat.items()}
    with pytest.raises(adapter_file.IPAdapterFileError, match="numbered 1, 3, 5"):
        adapter(renumbered)
    wrong_ctx = dict(flat, **{"ip_adapter.5.to_k_ip.weight": torch.zeros(640, 768)})
    with pytest.raises(adapter_file.IPAdapterFileError, match="layer 5"):
        adapter(wrong_ctx)
    (tmp_path / "x.gguf").write_bytes(b"0")
    with pytest.raises(adapter_file.IPAdapterFileError, match="unsupported file type '.gguf'"):
        adapter_file.load(tmp_path / "x.gguf")
    torch.save({"image_proj": {"proj.weight": torch.zeros(1)}, "ip_adapter": {}, "evil": object()}, tmp_path / "p.bin")
    with pytest.raises(adapter_file.IPAdapterFileError, match="weights-only"):
        adapter_file.load(tmp_path / "p.bin")


def test_subtraction_is_the_official_formula_exactly():
    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(2, 1280, generator=gen), torch.randn(1, 1280, generator=gen)
    # official: pooled *= neg_content_scale; clip_image_embeds = clip_image_embeds - pooled
    official = image - (text * 0.8)
    assert torch.equal(subtraction.subtract_content(image, text, 0.8), official)
    assert torch.equal(subtraction.subtract_content(image, text, 0.0), image)


def test_subtraction_refuses_plus_adapters_and_other_spaces():
    with pytest.raises(ValueError, match="Plus adapter"):
        subtraction.check_subtraction("plus", 1280, 1280)
    with pytest.raises(ValueError, match="768-d but .* expects 1280-d.*SDXL CLIP"):
        subtraction.check_subtraction("plain", 1280, 768)
    with pytest.raises(ValueError, match="1280-d but .* expects 1024-d.*SD2.x CLIP"):
        subtraction.check_subtraction("plain", 1024, 1280)
    subtraction.check_subtraction("plain", 1280, 1280)
    with pytest.raises(ValueError, match="widths differ"):
        subtraction.subtract_content(torch.zeros(1, 1280), torch.zeros(1, 1024), 1.0)


def test_custom_blocks_accept_comfy_keys_and_diffusers_names():
    assert blocks.parse_custom("output 1, input 8, middle 0") == [("output", 1, None), ("input", 8, None),
                                                                  ("middle", 0, None)]
    assert blocks.parse_custom("('output', 1), (\"input\", 8)") == [("output", 1, None), ("input", 8, None)]
    assert blocks.parse_custom("output:1; Output 2 3") == [("output", 1, None), ("output", 2, 3)]
    assert blocks.parse_custom("up_blocks.0.attentions.1, mid_block") == ["up_blocks.0.attentions.1", "mid_block"]
    for bad in ("output one", "up block 1", "", "output 1, banana"):
        with pytest.raises(ValueError, match="custom"):
            blocks.parse_custom(bad)


def test_unreadable_and_non_finite_files_are_refused_naming_the_file(tmp_path):
    flat = tiny_ipadapter.ipadapter_state_dict(SDXL_LAYERS, 1280)
    bad = dict(flat, **{"ip_adapter.3.to_k_ip.weight": flat["ip_adapter.3.to_k_ip.weight"].clone()})
    bad["ip_adapter.3.to_k_ip.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(bad, str(tmp_path / "nan.safetensors"))
    torch.save(adapter_file.split_sections(bad), tmp_path / "nan.bin")
    for name in ("nan.safetensors", "nan.bin"):
        with pytest.raises(ValueError, match=rf"{name}: tensor 'ip_adapter\.3\.to_k_ip\.weight' holds 1 NaN"):
            adapter_file.load(tmp_path / name)

    safetensors.torch.save_file(flat, str(tmp_path / "cut.safetensors"))
    torch.save(adapter_file.split_sections(flat), tmp_path / "cut.bin")
    for name in ("cut.safetensors", "cut.bin"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors could not be read as a safetensors file .*truncated"):
        adapter_file.load(tmp_path / "cut.safetensors")
    with pytest.raises(adapter_file.IPAdapterFileError,
                       match=r"cut\.bin could not be read as a weights-only torch file .*truncated, corrupt"):
        adapter_file.load(tmp_path / "cut.bin")
    with pytest.raises(FileNotFoundError, match=r"gone\.bin does not exist"):
        adapter_file.load(tmp_path / "gone.bin")
