"""InstantStyle on Flux.1 with an XLabs Flux IP-Adapter, on the tiny Flux (harness.tiny_dits).

The maths against a reference written from x-flux's source (``IPDoubleStreamBlockProcessor`` and
``ImageProjModel``, src/flux/modules/layers.py), block selection per block, scale 0, no mutation, the refusals
between SD and Flux adapters/models, content subtraction in CLIP ViT-L space, bf16 native and fp8 storage.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.hashing import object_hash, weight_hash


@pytest.fixture(scope="module")
def flux(tiny_dit):
    return tiny_dit("flux1")


@pytest.fixture(scope="module")
def adapter(pack):
    from frozentune.instantstyle import flux_adapter_file
    from harness import tiny_flux_ipadapter

    return flux_adapter_file.load(tiny_flux_ipadapter.xlabs_path())


@pytest.fixture(scope="module")
def clip_vision(pack):
    from harness import tiny_flux_ipadapter

    return tiny_flux_ipadapter.clip_vision_l_model()


def apply_flux(model, adapter, clip_vision, image, **kw):
    from frozentune.nodes.instantstyle_nodes import InstantStyleApplyFlux

    args = dict(weight=1.0, preset="all", custom_blocks="", combine_images="average", content_text="", subtract=0.5,
                start_at=0.0, end_at=1.0)
    args.update(kw)
    return InstantStyleApplyFlux.execute(model=model, flux_ipadapter=adapter, clip_vision=clip_vision, image=image,
                                         **args).args[0]


def sample(flux, model, steps=1, cfg=1.0):
    import nodes
    from comfy_extras.nodes_flux import FluxGuidance

    positive = FluxGuidance.execute(flux.encode("a photo of a cat"), 3.5).args[0]
    negative = FluxGuidance.execute(flux.encode(""), 3.5).args[0]
    return nodes.common_ksampler(model, 0, steps, cfg, "euler", "simple", positive, negative,
                                 flux.empty_latent(64))[0]["samples"]


def dit_replaces(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})


# --- the maths against x-flux ----------------------------------------------------------------------------

def xflux_attention(q, k, v, pe):
    """x-flux ``src/flux/math.py`` attention: RoPE on q and k, SDPA, 'B H L D -> B L (H D)'."""
    from comfy.ldm.flux.math import apply_rope

    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def xflux_ip_double_block(block, img, txt, vec, pe, image_proj, k_w, k_b, v_w, v_b, ip_scale):
    """x-flux ``IPDoubleStreamBlockProcessor.__call__`` step by step, on a ComfyUI DoubleStreamBlock's modules."""
    heads = block.num_heads
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)

    def qkv(norm, mod, attn, x):
        x = attn.qkv((1 + mod.scale) * norm(x) + mod.shift)
        b, n, _ = x.shape
        q, k, v = x.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # "B L (K H D) -> K B H L D"
        q, k = attn.norm(q, k, v)
        return q, k, v

    img_q, img_k, img_v = qkv(block.img_norm1, img_mod1, block.img_attn, img)
    txt_q, txt_k, txt_v = qkv(block.txt_norm1, txt_mod1, block.txt_attn, txt)
    attn1 = xflux_attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                            pe)
    txt_attn, img_attn = attn1[:, :txt.shape[1]], attn1[:, txt.shape[1]:]
    img = img + img_mod1.gate * block.img_attn.proj(img_attn)
    img = img + img_mod2.gate * block.img_mlp((1 + img_mod2.scale) * block.img_norm2(img) + img_mod2.shift)
    txt = txt + txt_mod1.gate * block.txt_attn.proj(txt_attn)
    txt = txt + txt_mod2.gate * block.txt_mlp((1 + txt_mod2.scale) * block.txt_norm2(txt) + txt_mod2.shift)
    # IP-adapter processing: ip_query = img_q (no RoPE), k/v projections of image_proj, plain SDPA
    ip_key = F.linear(image_proj, k_w, k_b)
    ip_value = F.linear(image_proj, v_w, v_b)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    ip_attention = F.scaled_dot_product_attention(img_q, split(ip_key), split(ip_value))
    ip_attention = ip_attention.transpose(1, 2).reshape(img.shape[0], img.shape[1], -1)
    return img + ip_scale * ip_attention, txt


def xflux_image_proj(sd, embeds, tokens):
    """x-flux ``ImageProjModel``: Linear -> reshape(-1, tokens, C) -> LayerNorm(C)."""
    proj = torch.nn.Linear(sd["proj.weight"].shape[1], sd["proj.weight"].shape[0])
    norm = torch.nn.LayerNorm(sd["norm.weight"].shape[0])
    proj.load_state_dict({"weight": sd["proj.weight"], "bias": sd["proj.bias"]})
    norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
    with torch.no_grad():
        return norm(proj(embeds).reshape(-1, tokens, sd["norm.weight"].shape[0]))


@pytest.fixture(scope="module")
def block_inputs(flux):
    import comfy.model_management as mm

    mm.load_models_gpu([flux.model])
    dm = flux.model.model.diffusion_model
    gen = torch.Generator().manual_seed(5)
    txt_len, img_len, rows = 8, 16, 2
    ids = torch.randint(0, 8, (rows, txt_len + img_len, 3), generator=gen).float()
    return dict(dm=dm, img=torch.randn(rows, img_len, 64, generator=gen), txt=torch.randn(rows, txt_len, 64, generator=gen),
                vec=torch.randn(rows, 64, generator=gen), pe=dm.pe_embedder(ids))


@pytest.mark.parametrize("index", [0, 1])
def test_xlabs_double_block_equals_the_x_flux_processor(adapter, block_inputs, index):
    from frozentune.instantstyle.flux_attention import FluxIPBlock

    b = block_inputs
    block = b["dm"].double_blocks[index]
    features = torch.randn(1, adapter.embed_width, generator=torch.Generator().manual_seed(9))
    tokens = adapter.tokens(features)
    assert torch.allclose(tokens, xflux_image_proj(adapter.image_proj, features, adapter.n_tokens), atol=1e-6)
    kv = adapter.kv("double", index, tokens)
    patch = FluxIPBlock("double", index, kv, kv, weight=0.7)

    def original_block(args):
        img, txt = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                         transformer_options=args["transformer_options"])
        return {"img": img, "txt": txt}

    with torch.no_grad():
        got = patch({"img": b["img"].clone(), "txt": b["txt"].clone(), "vec": b["vec"], "pe": b["pe"], "attn_mask": None,
                     "transformer_options": {"cond_or_uncond": [0]}}, {"original_block": original_block})
        k_w, k_b, v_w, v_b = adapter.layers[index]
        img, txt = xflux_ip_double_block(block, b["img"].clone(), b["txt"].clone(), b["vec"], b["pe"],
                                         tokens.expand(2, -1, -1), k_w, k_b, v_w, v_b, 0.7)
        plain = original_block({**b, "img": b["img"].clone(), "txt": b["txt"].clone(), "transformer_options": {}})
    assert (got["img"] - img).abs().max().item() < 1e-5
    assert (got["txt"] - txt).abs().max().item() < 1e-5
    assert (got["img"] - plain["img"]).abs().max().item() > 1e-2, "the image attention must act"
    assert torch.equal(got["txt"], plain["txt"]), "XLabs changes the image stream only"


@pytest.mark.half
def test_bf16_double_block_matches_the_x_flux_processor_in_bf16(tiny_dit, adapter, block_inputs):
    """Computing natively in bf16, the patch stays within bf16 rounding of the reference run in bf16 (the query
    is recovered from the RoPE'd one, one extra rounding)."""
    import comfy.model_management as mm

    from frozentune.instantstyle.flux_attention import FluxIPBlock
    from harness import tiny_dits

    model = tiny_dits.load_model("flux1", dtype="bf16")
    mm.load_models_gpu([model])
    block = model.model.diffusion_model.double_blocks[0]
    bf = {k: block_inputs[k].to(torch.bfloat16) for k in ("img", "txt", "vec")}
    pe = block_inputs["pe"]
    tokens = adapter.tokens(torch.randn(1, adapter.embed_width, generator=torch.Generator().manual_seed(9)))
    patch = FluxIPBlock("double", 0, adapter.kv("double", 0, tokens), adapter.kv("double", 0, tokens), weight=1.0)

    def original_block(args):
        img, txt = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                         transformer_options=args["transformer_options"])
        return {"img": img, "txt": txt}

    with torch.no_grad():
        got = patch({"img": bf["img"].clone(), "txt": bf["txt"].clone(), "vec": bf["vec"], "pe": pe,
                     "transformer_options": {}}, {"original_block": original_block})
        k_w, k_b, v_w, v_b = (t.to(torch.bfloat16) for t in adapter.layers[0])
        img, _ = xflux_ip_double_block(block, bf["img"].clone(), bf["txt"].clone(), bf["vec"], pe,
                                       tokens.to(torch.bfloat16).expand(2, -1, -1), k_w, k_b, v_w, v_b, 1.0)
        plain = original_block({"img": bf["img"].clone(), "txt": bf["txt"].clone(), "vec": bf["vec"], "pe": pe,
                                "transformer_options": {}})
    assert got["img"].dtype == torch.bfloat16
    ip = (img.float() - plain["img"].float()).abs().max().item()
    err = (got["img"].float() - img.float()).abs().max().item()
    print(f"bf16 block: max |patch - x-flux reference| {err:.4g}, max |image term| {ip:.4g}")
    assert ip > 0.1 and err < 0.03 * ip + 0.02, (err, ip)


def test_unrope_inverts_comfy_rope(block_inputs):
    from comfy.ldm.flux.math import apply_rope1

    from frozentune.instantstyle.flux_attention import unrope

    q = torch.randn(2, 2, 24, 32)
    assert (unrope(apply_rope1(q, block_inputs["pe"]), block_inputs["pe"]) - q).abs().max().item() < 1e-5


# --- block selection ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, custom, keys", [
    ("all", "", {("double_block", 0), ("double_block", 1)}),
    ("style", "", {("double_block", 1)}),  # tiny double 1 of 2 -> real double 14: style (10-18)
    ("layout", "", {("double_block", 0)}),  # tiny double 0 of 2 -> real double 4: layout (0-9)
    ("custom", "double 1:0.5", {("double_block", 1)}),
])
def test_presets_patch_their_blocks_only(flux, adapter, clip_vision, style_image, preset, custom, keys):
    patched = apply_flux(flux.model, adapter, clip_vision, style_image, preset=preset, custom_blocks=custom)
    assert set(dit_replaces(patched)) == keys
    if preset == "custom":
        assert dit_replaces(patched)[("double_block", 1)].weight == 0.5


def test_real_depth_presets_follow_the_family_table(pack):
    from frozentune.instantstyle import flux_blocks

    real = flux_blocks.REFERENCE_DEPTHS
    xlabs = {("double", i) for i in range(19)}
    assert set(flux_blocks.plan("style", "", real, xlabs, "x")) == {("double", i) for i in range(10, 19)}
    assert set(flux_blocks.plan("layout", "", real, xlabs, "x")) == {("double", i) for i in range(10)}
    everything = xlabs | {("single", i) for i in range(38)}
    style = set(flux_blocks.plan("style", "", real, everything, "x"))
    assert {("single", i) for i in range(10, 38)} <= style and ("single", 9) not in style
    with pytest.raises(ValueError, match="no weights for single 0"):
        flux_blocks.plan("custom", "single 0-3", real, xlabs, "flux-ip-adapter.safetensors")
    with pytest.raises(ValueError, match="outside the model"):
        flux_blocks.plan("custom", "double 19", real, xlabs, "x")


class BlockInputs:
    """Forward pre-hooks recording what double block 1 and single block 0 receive (the previous block's output)."""

    def __init__(self, model):
        dm = model.model.diffusion_model
        self.seen: dict[str, list[torch.Tensor]] = {"double 1 img": [], "double 1 txt": [], "single 0": []}
        self.handles = [
            dm.double_blocks[1].register_forward_pre_hook(self._double, with_kwargs=True),
            dm.single_blocks[0].register_forward_pre_hook(self._single, with_kwargs=True)]

    def _double(self, module, args, kwargs):
        self.seen["double 1 img"].append(kwargs["img"].clone())
        self.seen["double 1 txt"].append(kwargs["txt"].clone())

    def _single(self, module, args, kwargs):
        self.seen["single 0"].append(args[0].clone())

    def close(self):
        for h in self.handles:
            h.remove()


def recorded(flux, model):
    rec = BlockInputs(flux.model)
    try:
        out = sample(flux, model)
    finally:
        rec.close()
    return out, {k: torch.cat(v) for k, v in rec.seen.items()}


def test_each_block_changes_only_from_itself_on(flux, adapter, clip_vision, style_image):
    """Patching double block j leaves every block before j bitwise as it was and changes block j's output."""
    base_out, base = recorded(flux, flux.model)
    only0 = apply_flux(flux.model, adapter, clip_vision, style_image, preset="custom", custom_blocks="double 0")
    out0, seen0 = recorded(flux, only0)
    assert not torch.equal(seen0["double 1 img"], base["double 1 img"]), "double 0's image output must change"
    assert torch.equal(seen0["double 1 txt"], base["double 1 txt"]), "double 0's text output is not XLabs'"
    only1 = apply_flux(flux.model, adapter, clip_vision, style_image, preset="custom", custom_blocks="double 1")
    out1, seen1 = recorded(flux, only1)
    assert torch.equal(seen1["double 1 img"], base["double 1 img"]), "block 0 must be untouched when only 1 is patched"
    assert torch.equal(seen1["double 1 txt"], base["double 1 txt"])
    assert not torch.equal(seen1["single 0"], base["single 0"]), "double 1's output must change"
    assert not torch.equal(out0, base_out) and not torch.equal(out1, base_out)


def test_weight_zero_is_bitwise_unchanged(flux, adapter, clip_vision, style_image):
    patched = apply_flux(flux.model, adapter, clip_vision, style_image, weight=0.0)
    assert torch.equal(sample(flux, patched), sample(flux, flux.model))


def test_window_outside_the_schedule_is_bitwise_unchanged(flux, adapter, clip_vision, style_image):
    base = sample(flux, flux.model, steps=2)
    late = apply_flux(flux.model, adapter, clip_vision, style_image, start_at=0.99, end_at=1.0)
    assert torch.equal(sample(flux, late, steps=2), base)


def test_never_mutates_the_input_model_and_chains(flux, adapter, clip_vision, style_image):
    import comfy.model_management as mm

    mm.load_models_gpu([flux.model])
    before = (weight_hash(flux.model.model.diffusion_model), dict(dit_replaces(flux.model)))
    first = apply_flux(flux.model, adapter, clip_vision, style_image, preset="custom", custom_blocks="double 0")
    first_patch = dit_replaces(first)[("double_block", 0)]
    first_hash = object_hash(first_patch)
    second = apply_flux(first, adapter, clip_vision, style_image, preset="all", weight=0.5)
    assert dit_replaces(second)[("double_block", 0)].prev is first_patch, "a replace already there is wrapped"
    assert object_hash(first_patch) == first_hash and set(dit_replaces(first)) == {("double_block", 0)}
    sample(flux, second)
    mm.load_models_gpu([flux.model])
    assert (weight_hash(flux.model.model.diffusion_model), dict(dit_replaces(flux.model))) == before


def test_true_cfg_gives_the_unconditional_chunk_the_black_image_tokens(flux, adapter, clip_vision, style_image,
                                                                     monkeypatch):
    from frozentune.instantstyle import flux_attention

    seen = []
    stock = flux_attention.FluxIPBlock.image_attention

    def recording(self, func, q, heads, options):
        seen.append(tuple(options.get("cond_or_uncond") or ()))
        return stock(self, func, q, heads, options)

    monkeypatch.setattr(flux_attention.FluxIPBlock, "image_attention", recording)
    patched = apply_flux(flux.model, adapter, clip_vision, style_image)
    patch = dit_replaces(patched)[("double_block", 0)]
    assert not torch.equal(patch.cond_kv[0], patch.uncond_kv[0])
    out = sample(flux, patched, cfg=2.0)
    assert torch.isfinite(out).all() and seen and all(sorted(s) == [0, 1] for s in seen)


# --- refusals ------------------------------------------------------------------------------------------------

def sd_adapter():
    from frozentune.instantstyle import adapter_file
    from harness import tiny_ipadapter

    flat = tiny_ipadapter.ipadapter_state_dict([(64, 768), (64, 768)], 1280)
    return adapter_file.from_sections(adapter_file.split_sections(flat), "ip-adapter_sd15.safetensors")


def fake_model(config_class: str):
    """Enough of a MODEL for ``families.family_of`` (no weights): its config class decides the family."""
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=type(config_class, (), {})()))


def test_sd_adapter_into_flux_is_refused_naming_both(flux, clip_vision, style_image):
    with pytest.raises(ValueError, match=r"sd15 IP-Adapter ip-adapter_sd15.safetensors for MODEL Flux.1 dev"):
        apply_flux(flux.model, sd_adapter(), clip_vision, style_image)


def test_sd_node_refuses_flux_adapters_and_flux_models_naming_both(flux, adapter, clip_vision, style_image):
    from harness import tiny_ipadapter

    with pytest.raises(ValueError, match=r"XLabs Flux IP-Adapter .* for MODEL Flux.1 dev, which is not an SD1.5/SDXL"):
        tiny_ipadapter.apply_style(flux.model, adapter, clip_vision, style_image)
    with pytest.raises(ValueError, match=r"ip-adapter_sd15.safetensors is sd15 but MODEL is Flux.1 dev"):
        tiny_ipadapter.apply_style(flux.model, sd_adapter(), clip_vision, style_image)


def test_flux_adapter_into_an_sdxl_model_is_refused_naming_both(adapter):
    from frozentune.instantstyle import flux_apply

    with pytest.raises(ValueError, match=r"XLabs Flux IP-Adapter .* is for Flux.1 but MODEL is SDXL family"):
        flux_apply.prepare(fake_model("SDXL"), adapter, flux_apply.FluxStyleSettings())


def write(tmp_path, name, tensors):
    import safetensors.torch

    path = tmp_path / name
    safetensors.torch.save_file(tensors, str(path))
    return path


def test_loader_refuses_foreign_and_broken_files_naming_file_and_format(pack, tmp_path):
    from frozentune.instantstyle import flux_adapter_file
    from harness import tiny_flux_ipadapter, tiny_ipadapter

    sd = write(tmp_path, "ip-adapter_sdxl.safetensors", tiny_ipadapter.ipadapter_state_dict([(64, 2048)], 1280))
    with pytest.raises(flux_adapter_file.FluxAdapterFileError, match=r"ip-adapter_sdxl.safetensors is an sdxl "
                                                                     "IP-Adapter .*not a Flux one"):
        flux_adapter_file.load(sd)
    other = write(tmp_path, "lora.safetensors", {"lora_unet_x.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(flux_adapter_file.FluxAdapterFileError, match=r"lora.safetensors is not a Flux IP-Adapter: "
                                                                     "expected an XLabs Flux IP-Adapter"):
        flux_adapter_file.load(other)
    flat = tiny_flux_ipadapter.xlabs_state_dict()
    flat.pop("double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias")
    broken = write(tmp_path, "flux-ip-adapter.safetensors", flat)
    with pytest.raises(flux_adapter_file.FluxAdapterFileError, match=r"flux-ip-adapter.safetensors: double block 1 "
                                                                     "lacks ip_adapter_double_stream v_bias"):
        flux_adapter_file.load(broken)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(tiny_flux_ipadapter.xlabs_path().read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.safetensors"):
        flux_adapter_file.load(truncated)


def test_loader_node_reads_the_xlabs_file(pack):
    import folder_paths

    from frozentune.nodes.instantstyle_nodes import FluxIPAdapterLoader
    from harness import tiny_flux_ipadapter

    path = tiny_flux_ipadapter.xlabs_path()
    folder_paths.add_model_folder_path("ipadapter", str(path.parent))
    ad = FluxIPAdapterLoader.execute(path.name).args[0]
    assert (ad.format, ad.hidden, ad.n_tokens, ad.embed_width, ad.blocks()) == (
        "xlabs", 64, 4, 64, (("double", 0), ("double", 1)))


# --- content subtraction --------------------------------------------------------------------------------

def test_content_text_is_the_projected_clip_l_embedding(flux, adapter):
    from frozentune.instantstyle import flux_apply

    got = flux_apply.content_embedding(flux.clip, "a cat", adapter)
    _, unprojected = flux.clip.encode_from_tokens(flux.clip.tokenize("a cat"), return_pooled=True)
    w = flux.clip.cond_stage_model.clip_l.transformer.text_projection.weight.float()
    assert got.shape == (1, adapter.embed_width)
    assert torch.allclose(got, unprojected.float() @ w.T, atol=1e-6)
    assert not torch.allclose(got, unprojected.float(), atol=1e-3), "Flux's pooled CLIP-L output is unprojected"


def test_subtraction_changes_the_style_tokens_only(flux, adapter, clip_vision, style_image):
    plain = apply_flux(flux.model, adapter, clip_vision, style_image)
    minus = apply_flux(flux.model, adapter, clip_vision, style_image, content_text="a cat", clip=flux.clip)
    a, b = dit_replaces(plain)[("double_block", 0)], dit_replaces(minus)[("double_block", 0)]
    assert not torch.equal(a.cond_kv[0], b.cond_kv[0]) and torch.equal(a.uncond_kv[0], b.uncond_kv[0])


# --- precision -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, weight_dtype", [("bf16", None), (None, "fp8"), ("bf16", "fp8")])
def test_half_models_run_the_adapter(tiny_dit, adapter, clip_vision, style_image, dtype, weight_dtype):
    from harness import tiny_dits

    dit = tiny_dits.load("flux1", dtype=dtype, weight_dtype=weight_dtype)
    base = sample(dit, dit.model)
    patched = apply_flux(dit.model, adapter, clip_vision, style_image)
    out = sample(dit, patched)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert dit_replaces(patched)[("double_block", 0)].cond_kv[0].dtype == torch.float32, "k/v are never quantized"
    assert torch.equal(sample(dit, apply_flux(dit.model, adapter, clip_vision, style_image, weight=0.0)), base)


# --- composition -----------------------------------------------------------------------------------------

def test_composes_with_the_prompt_guidance_guider(flux, adapter, clip_vision, style_image, monkeypatch):
    """The guider's [positive, negative, baseline] chunks at cfg > 1: the negative gets the unconditional tokens,
    positive and baseline the style tokens; and the style changes the guided result."""
    import comfy.sample
    import comfy.samplers

    from frozentune.instantstyle import flux_attention
    from frozentune.sampling import cond_chunks
    from harness import guiders

    seen = []
    stock = flux_attention.FluxIPBlock.image_attention

    def recording(self, func, q, heads, options):
        seen.append((tuple(options.get("cond_or_uncond") or ()), cond_chunks.unconditional_indexes(options)))
        return stock(self, func, q, heads, options)

    monkeypatch.setattr(flux_attention.FluxIPBlock, "image_attention", recording)
    p = {"positive": flux.encode("a photo of a cat"), "negative": flux.encode(""), "baseline": flux.encode("a photo")}

    def run(model):
        guider = guiders.ours(model, p, 2.0, 1.0)
        latent = flux.empty_latent(64)["samples"]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 1).cpu()
        return guider.sample(comfy.sample.prepare_noise(latent, 3), latent, comfy.samplers.sampler_object("euler"),
                             sigmas, disable_pbar=True, seed=3)

    patched = apply_flux(flux.model, adapter, clip_vision, style_image)
    styled, plain = run(patched), run(flux.model)
    assert torch.isfinite(styled).all() and not torch.equal(styled, plain)
    assert seen and {tuple(sorted(c)) for c, _ in seen} == {(0, 1, 2)} and {u for _, u in seen} == {frozenset({1})}


def test_composes_with_a_flux_controlnet(flux, adapter, clip_vision, style_image):
    """ControlNet's residuals and the image attention both act on one sampling run."""
    import copy

    import nodes

    from frozentune.controlnet_zero import flux_xlabs
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroCreate

    with torch.inference_mode():
        zero = ControlNetZeroCreate.execute(model=flux.model, seed=0).args[0]
    module = copy.deepcopy(zero.control_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(("controlnet_blocks.", "input_hint_block.14.")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    control = flux_xlabs.wrap(module)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(7))

    def run(model, with_control):
        positive = flux.encode("a photo of a cat")
        negative = positive
        if with_control:
            positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint,
                                                                                1.0, 0.0, 1.0)
        return nodes.common_ksampler(model, 0, 1, 1.0, "euler", "simple", positive, negative,
                                     flux.empty_latent(64))[0]["samples"]

    patched = apply_flux(flux.model, adapter, clip_vision, style_image)
    both, style_only = run(patched, True), run(patched, False)
    control_only, plain = run(flux.model, True), run(flux.model, False)
    assert torch.isfinite(both).all()
    assert not torch.equal(both, style_only) and not torch.equal(both, control_only)
    assert not torch.equal(control_only, plain) and not torch.equal(style_only, plain)


# --- embeds ----------------------------------------------------------------------------------------------

def test_embeds_encode_save_load_apply_equals_apply(flux, adapter, clip_vision, style_image, tmp_path, monkeypatch):
    """Encode (Flux) -> Save -> Load -> Apply Embeds (Flux) gives the same patch as Apply (Flux) from the image;
    SD embeds of another width are refused."""
    import folder_paths

    from frozentune.instantstyle.embeds import StyleEmbeds
    from frozentune.nodes.instantstyle_nodes import (
        InstantStyleApplyEmbedsFlux,
        InstantStyleEncodeFlux,
        InstantStyleLoadEmbeds,
        InstantStyleSaveEmbeds,
    )

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ipadapter_embeds", ([str(tmp_path)], {".safetensors"}))
    embeds, negative = InstantStyleEncodeFlux.execute(adapter, clip_vision, style_image, "a cat", 0.5,
                                                      clip=flux.clip).args
    path = InstantStyleSaveEmbeds.execute(embeds, "style", negative).args[2]
    loaded, loaded_negative = InstantStyleLoadEmbeds.execute(Path(path).name).args
    via_embeds = InstantStyleApplyEmbedsFlux.execute(flux.model, adapter, loaded, 1.0, "all", "", "average", 0.0, 1.0,
                                                     negative_embeds=loaded_negative).args[0]
    direct = apply_flux(flux.model, adapter, clip_vision, style_image, content_text="a cat", clip=flux.clip)
    for key, patch in dit_replaces(direct).items():
        other = dit_replaces(via_embeds)[key]
        for a, b in zip(patch.cond_kv + patch.uncond_kv, other.cond_kv + other.uncond_kv, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    wrong = StyleEmbeds(torch.zeros(1, 1280), "image_embeds")
    with pytest.raises(ValueError, match="1280-d image_embeds features but the XLabs Flux IP-Adapter"):
        InstantStyleApplyEmbedsFlux.execute(flux.model, adapter, wrong, 1.0, "all", "", "average", 0.0, 1.0)


class SingleBlockFormat:
    """A made-up format with image k/v for single block 0 only, added to the image rows of the block output:
    exercises the single-block path (the text length from the DIFFUSION_MODEL wrapper)."""

    name, format, label, hidden, embed_kind, embed_width, encoder = ("fake", "fake", "Fake Flux IP-Adapter", 64,
                                                                     "image_embeds", 64, "a fake encoder")

    def __deepcopy__(self, memo):
        return self

    def blocks(self):
        return (("single", 0),)

    def tokens(self, features):
        return features.reshape(features.shape[0], 2, 32).float()

    def kv(self, block_type, block_index, tokens):
        gen = torch.Generator().manual_seed(4)
        k, v = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
        return tokens @ k.T, tokens @ v.T

    def placement(self, block_type):
        return "block_output"

    def query_rows(self, block_type):
        return "image"


def test_single_block_image_rows_get_the_text_length_from_the_wrapper(flux, pack):
    from frozentune.instantstyle import flux_apply

    fake = SingleBlockFormat()
    settings = flux_apply.FluxStyleSettings()
    adapter, chosen = flux_apply.prepare(flux.model, fake, settings)
    tokens = fake.tokens(torch.randn(1, 64, generator=torch.Generator().manual_seed(2)))
    patched = flux_apply.patch_model(flux.model, adapter, chosen, tokens, tokens, settings)
    assert set(dit_replaces(patched)) == {("single_block", 0)}
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, []).append(args[0].clone())
        return hook

    def run(model):
        seen.clear()
        handle = flux.model.model.diffusion_model.single_blocks[1].register_forward_pre_hook(grab("s1"),
                                                                                              with_kwargs=True)
        try:
            sample(flux, model)
        finally:
            handle.remove()
        return torch.cat(seen["s1"])

    base, styled = run(flux.model), run(patched)
    txt_len = flux.encode("a photo of a cat")[0][0].shape[1]
    assert torch.equal(styled[:, :txt_len], base[:, :txt_len]), "the text rows must not change"
    assert not torch.equal(styled[:, txt_len:], base[:, txt_len:])
