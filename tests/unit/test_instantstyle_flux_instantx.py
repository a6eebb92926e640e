"""InstantX Flux IP-Adapter without ComfyUI: the file (and refusing others), the image projection and the per-block
keys/values against a reference written from InstantX's source, SigLIP's pooling head against transformers'."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from harness import tiny_flux_instantx as tiny
from harness import tiny_ipadapter
from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; its root import is lazy, so ComfyUI is not needed here
from frozentune.instantstyle import flux_adapter_file  # noqa: E402
from frozentune.instantstyle import flux_instantx as ix  # noqa: E402

# References written from InstantX's source live in the harness (tiny.MLPProjModel, tiny.IPAFluxAttnProcessorIP).
MLPProjModel, IPAFluxAttnProcessorIP = tiny.MLPProjModel, tiny.IPAFluxAttnProcessorIP


def assert_close(got, expected, tol=1e-5):
    err = (got.float() - expected.float()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g}"


def adapter(**kw) -> ix.InstantXAdapter:
    return ix.from_state_dict(tiny.instantx_state_dict(**kw), "tiny.bin")


# --- the file -----------------------------------------------------------------------------------------------------

def test_bin_and_safetensors_layouts_load_the_same_adapter():
    a, b = ix.load(tiny.instantx_path("bin")), ix.load(tiny.instantx_path("safetensors"))
    for x in (a, b):
        assert (x.embed_width, x.cross_dim, x.tokens_per_image, x.hidden, len(x.layers)) == (144, 64, 8, 64, 4)
    assert all(torch.equal(p, q) for (p, _), (q, _) in zip(a.layers, b.layers, strict=True))
    assert all(torch.equal(a.image_proj[k], b.image_proj[k]) for k in ix.PROJ_KEYS)
    assert "InstantX Flux IP-Adapter" in a.describe() and "8 tokens of 64" in a.describe()


def test_a_legacy_non_zip_bin_loads_without_memory_mapping(tmp_path):
    path = tmp_path / "old.bin"
    torch.save(tiny.instantx_state_dict(), path, _use_new_zipfile_serialization=False)
    assert torch.equal(ix.load(path).layers[3][1], ix.load(tiny.instantx_path("bin")).layers[3][1])


def test_the_flux_loader_reads_instantx_files_as_a_flux_adapter():
    for kind in ("bin", "safetensors"):
        a = flux_adapter_file.load(tiny.instantx_path(kind))
        assert isinstance(a, ix.InstantXAdapter) and flux_adapter_file.is_flux_adapter(a)
        assert (a.format, a.label, a.embed_kind) == ("instantx", "InstantX Flux IP-Adapter", "last_hidden_state")
        a = a.fit(2, 2, 64, 2)
        assert [a.placement(t) for t in ("double", "single")] == ["attention_output"] * 2
        assert [a.query_rows(t) for t in ("double", "single")] == ["image", "all"]
        assert "2 double + 2 single blocks" in flux_adapter_file.describe(a)


def test_57_layers_split_as_instantx_does_19_double_then_38_single():
    a = adapter(double=19, single=38, hidden=8, cross=8, embed=4, tokens=2)
    blocks = a.blocks()
    assert blocks[:19] == tuple(("double", i) for i in range(19))
    assert blocks[19:] == tuple(("single", j) for j in range(38))
    assert a.layer_index("single", 0) == 19 and a.layer_index("double", 18) == 18
    assert a.layer_index("single", 38) is None
    assert a.layer_index("single_block", 0) == 19  # the patches_replace names work too
    with pytest.raises(ValueError, match="covers 19 double \\+ 38 single blocks; the model has 20 \\+ 37"):
        a.fit(20, 37, 8, 2)


def test_an_unfitted_57_layer_file_norms_keys_over_instantx_128_wide_heads():
    """InstantX's ``RMSNorm(128)``: without ``fit`` the heads are Flux's 128 wide (here 256 = 2 heads of 128)."""
    sd = tiny.instantx_state_dict(double=19, single=38, hidden=256, cross=16, embed=4, tokens=3)
    a = ix.from_state_dict(sd)
    tokens = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(8))
    q = torch.randn(1, 2, 5, 128, generator=torch.Generator().manual_seed(9))
    ref = tiny.reference_processors(sd, head_dim=128)[40]
    k, v = a.kv("single", 21, tokens)  # file layer 19 + 21
    with torch.no_grad():
        assert_close(ix.ip_attention(q, k, v), ref(q, tokens))


def test_fit_binds_the_tiny_split_and_refuses_other_models():
    a = adapter()
    with pytest.raises(ValueError, match="fitted to a model"):
        a.blocks()
    fitted = a.fit(2, 2, 64, 2)
    assert fitted.blocks() == (("double", 0), ("double", 1), ("single", 0), ("single", 1))
    assert a.double_count is None, "fit must not change the loaded adapter"
    with pytest.raises(ValueError, match="tiny.bin \\(InstantX Flux IP-Adapter\\) is for a 64-wide Flux; the model "
                                         "is 3072-wide"):
        a.fit(19, 38, 3072, 24)
    with pytest.raises(ValueError, match="has 4 block layers; the model has 3 double \\+ 2 single"):
        a.fit(3, 2, 64, 2)


def save(tmp_path, name, sd) -> str:
    path = tmp_path / name
    safetensors.torch.save_file(sd, str(path))
    return path


def xlabs_keys() -> dict[str, torch.Tensor]:
    sd = {"ip_adapter_proj_model.proj.weight": torch.zeros(4 * 64, 48), "ip_adapter_proj_model.proj.bias": torch.zeros(256),
          "ip_adapter_proj_model.norm.weight": torch.ones(64), "ip_adapter_proj_model.norm.bias": torch.zeros(64)}
    for i in range(2):
        for kv in "kv":
            sd[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = torch.zeros(64, 64)
            sd[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = torch.zeros(64)
    return sd


FOREIGN = {
    "xlabs.safetensors": (xlabs_keys, "XLabs Flux IP-Adapter"),
    "ip-adapter_sdxl.safetensors": (lambda: tiny_ipadapter.ipadapter_state_dict([(640, 2048)], 1280),
                                    "SD1.5/SDXL IP-Adapter"),
    "ip-adapter-plus.safetensors": (lambda: tiny_ipadapter.ipadapter_state_dict([(640, 2048)], 1280, "plus"),
                                    "SD1.5/SDXL IP-Adapter"),
    "faceid.safetensors": (lambda: {**tiny.flat(tiny.instantx_state_dict()),
                                    "ip_adapter.1.to_k_lora.down.weight": torch.zeros(4, 64)}, "FaceID"),
    "sd35_ipa.safetensors": (lambda: {"image_proj.time_embedding.linear_1.weight": torch.zeros(4, 4),
                                      "ip_adapter.0.norm_ip.linear.weight": torch.zeros(4, 4)}, "SD3.5 IP-Adapter"),
    "flux_model.safetensors": (lambda: {"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, "Flux/DiT model"),
    "siglip.safetensors": (lambda: {"vision_model.head.probe": torch.zeros(1, 1, 4)}, "SigLIP vision model"),
    "random.safetensors": (lambda: {"foo.weight": torch.zeros(2)}, "is not an InstantX Flux IP-Adapter file"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_files_are_refused_naming_the_file_and_the_format_expected(tmp_path, name):
    make, what = FOREIGN[name]
    with pytest.raises(ix.InstantXFileError) as err:
        ix.load(save(tmp_path, name, make()))
    message = str(err.value)
    assert message.startswith(name) and what in message and "InstantX Flux.1 IP-Adapter" in message, message


@pytest.mark.parametrize("damage, match", [
    (lambda sd: sd["image_proj"].pop("norm.bias"), "missing \\['norm.bias'\\]"),
    (lambda sd: sd["image_proj"].__setitem__("proj.2.weight", torch.zeros(8 * 64 + 1, 288)), "do not chain"),
    (lambda sd: sd["ip_adapter"].pop("3.to_v_ip.weight"), "to_k_ip and to_v_ip each"),
    (lambda sd: sd["ip_adapter"].__setitem__("5.to_k_ip.weight", torch.zeros(64, 64)), "numbered 0..N-1"),
    (lambda sd: sd["ip_adapter"].__setitem__("1.to_k_ip.weight", torch.zeros(32, 64)), "layer 1 has to_k_ip"),
    (lambda sd: sd["ip_adapter"].__setitem__("0.norm_added_k.weight", torch.ones(32)), "unexpected key"),
    (lambda sd: sd["ip_adapter"]["2.to_k_ip.weight"].__setitem__((0, 0), math.nan), "NaN or infinite"),
])
def test_damaged_files_are_refused(tmp_path, damage, match):
    sd = tiny.instantx_state_dict()
    damage(sd)
    path = tmp_path / "damaged.bin"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=match):
        ix.load(path)


def test_a_truncated_bin_is_refused_naming_it(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(tiny.instantx_path("bin").read_bytes()[:200])
    with pytest.raises(ix.InstantXFileError, match="cut.bin could not be read"):
        ix.load(path)


# --- the maths ----------------------------------------------------------------------------------------------------

def test_tokens_equal_instantx_mlp_projection():
    sd = tiny.instantx_state_dict()
    ref = MLPProjModel(tiny.CROSS, tiny.EMBED, tiny.TOKENS)
    ref.load_state_dict(sd["image_proj"], strict=True)
    embeds = torch.randn(3, tiny.EMBED, generator=torch.Generator().manual_seed(1))
    got = ix.from_state_dict(sd).tokens(embeds)
    assert got.shape == (3, tiny.TOKENS, tiny.CROSS) and got.dtype == torch.float32
    with torch.no_grad():
        assert_close(got, ref(embeds))
    with pytest.raises(ValueError, match="no pooling head: choose the SigLIP file"):
        ix.from_state_dict(sd).tokens(torch.zeros(1, 16, 144))  # SigLIP patch tokens need the head
    with pytest.raises(ValueError, match="takes SigLIP so400m-patch14-384 features \\(144-d\\)"):
        ix.from_state_dict(sd).tokens(torch.zeros(1, 32))


def test_tokens_from_patch_tokens_pool_them_with_the_siglip_head_first(tmp_path):
    path = tmp_path / "siglip.safetensors"
    safetensors.torch.save_file(tiny.siglip_state_dict(), str(path))
    a = adapter().with_siglip_head(path)  # heads from the width alone (72 each), as the loader node reads it
    hidden = torch.randn(2, 16, tiny.EMBED, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pooled = tiny.hf_siglip().head(hidden)
    assert_close(a.pooled(hidden), pooled)
    assert a.pooled(pooled) is pooled
    assert_close(a.tokens(hidden), a.tokens(pooled))
    assert adapter().head is None, "with_siglip_head must not change the loaded adapter"


def test_an_fp16_file_projects_in_float32_a_slice_of_rows_at_a_time():
    """InstantX ships fp16; proj.2 is cast to float32 in row slices (no 4.8 GB copy), with the same result."""
    sd = tiny.instantx_state_dict()
    half = {section: {k: v.half() for k, v in t.items()} for section, t in sd.items()}
    ref = MLPProjModel(tiny.CROSS, tiny.EMBED, tiny.TOKENS)
    ref.load_state_dict({k: v.float() for k, v in half["image_proj"].items()}, strict=True)
    embeds = torch.randn(2, tiny.EMBED, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert_close(ix.from_state_dict(half).tokens(embeds), ref(embeds))
    w, b = half["image_proj"]["proj.2.weight"], half["image_proj"]["proj.2.bias"]
    x = torch.randn(3, w.shape[1])
    assert_close(ix._linear_f32(x, w, b, rows=7), torch.nn.functional.linear(x, w.float(), b.float()))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_kv_and_ip_attention_equal_instantx_processor(dtype, tol):
    heads, head_dim = 2, 32
    sd = tiny.instantx_state_dict()
    a = ix.from_state_dict(sd).fit(2, 2, 64, heads)
    gen = torch.Generator().manual_seed(2)
    tokens = a.tokens(torch.randn(2, tiny.EMBED, generator=gen))
    q = torch.randn(2, heads, 10, head_dim, generator=gen)  # the block's query: QK-normed, no RoPE
    for file_index, (block_type, index) in enumerate(a.blocks()):
        ref = IPAFluxAttnProcessorIP(64, tiny.CROSS, head_dim).to(dtype)  # InstantX: RMSNorm(128) = head_dim
        ref.load_state_dict({f"to_{x}_ip.weight": sd["ip_adapter"][f"{file_index}.to_{x}_ip.weight"] for x in "kv"},
                            strict=True)
        k, v = a.kv(block_type, index, tokens.to(dtype))
        assert k.dtype == v.dtype == dtype and k.shape == (2, tiny.TOKENS, 64)
        with torch.no_grad():
            expected = ref(q.to(dtype), tokens.to(dtype))
        assert_close(ix.ip_attention(q.to(dtype), k, v), expected, tol)
    assert a.kv("single", 2, tokens) is None and a.kv("double", 5, tokens) is None


def test_keys_are_rms_normed_per_head_and_values_are_not():
    a = adapter().fit(2, 2, 64, 2)
    tokens = a.tokens(torch.randn(1, tiny.EMBED))
    k, v = a.kv("double", 0, tokens)
    rms = k.reshape(1, tiny.TOKENS, 2, 32).pow(2).mean(-1).sqrt()
    assert_close(rms, torch.ones_like(rms), 1e-4)
    assert_close(v, tokens @ a.layers[0][1].T)  # InstantX's processor has norm_added_k only


def test_the_adapter_is_shared_not_copied_and_weights_stay_untouched():
    import copy

    a = adapter().fit(2, 2, 64, 2)
    before = [w.clone() for pair in a.layers for w in pair]
    assert copy.deepcopy(a) is a
    tokens = a.tokens(torch.randn(1, tiny.EMBED))
    for block in a.blocks():
        a.kv(*block, tokens.to(torch.bfloat16))
    assert all(torch.equal(x, y) for x, y in zip(before, [w for pair in a.layers for w in pair], strict=True))


# --- SigLIP's pooling head ---------------------------------------------------------------------------------------

def test_siglip_head_equals_transformers_pooling_head():
    hf = tiny.hf_siglip()
    head = ix.siglip_head_from_tensors(tiny.siglip_state_dict(), heads=tiny.SIGLIP["num_attention_heads"])
    hidden = torch.randn(2, 16, tiny.SIGLIP["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(head(hidden), hf.head(hidden))


def test_a_siglip_file_without_its_head_is_refused():
    tensors = {k: v for k, v in tiny.siglip_state_dict().items() if ".head." not in k}
    with pytest.raises(ix.InstantXFileError, match="no complete SigLIP pooling head .*so400m-patch14-384"):
        ix.siglip_head_from_tensors(tensors, name="sigclip_vision_patch14_384.safetensors")
