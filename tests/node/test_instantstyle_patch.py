"""The InstantStyle attn2 patch against diffusers' IPAdapterAttnProcessor2_0, and the block maps of the
real SDXL / SD1.5 layouts (ComfyUI's UNetModel built on the meta device)."""

from __future__ import annotations

import copy

import pytest
import torch

HEADS, DIM_HEAD, CTX, TEXT, TOKENS, SEQ = 4, 16, 96, 7, 4, 36


@pytest.fixture(scope="module")
def layer(pack):
    """A diffusers cross-attention layer with an IP-Adapter processor, and image tokens for it."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=HEADS * DIM_HEAD, cross_attention_dim=CTX, heads=HEADS, dim_head=DIM_HEAD).eval()
    proc = IPAdapterAttnProcessor2_0(hidden_size=HEADS * DIM_HEAD, cross_attention_dim=CTX, num_tokens=(TOKENS,),
                                     scale=0.7)
    attn.set_processor(proc)
    gen = torch.Generator().manual_seed(1)
    return dict(attn=attn, proc=proc, cond=torch.randn(1, TOKENS, CTX, generator=gen),
                uncond=torch.randn(1, TOKENS, CTX, generator=gen))


def ours(layer, weight=0.7, **kw):
    from frozentune.instantstyle.attention import IPAttention

    proc = layer["proc"]
    kw = {"cond": layer["cond"], "uncond": layer["uncond"], **kw}
    return IPAttention(to_k_ip=proc.to_k_ip[0].weight.detach(), to_v_ip=proc.to_v_ip[0].weight.detach(),
                       weight=weight, **kw)


def run_ours(layer, patch, x, text, cond_or_uncond, **extra):
    attn = layer["attn"]
    opts = dict(n_heads=HEADS, dim_head=DIM_HEAD, attn_precision=None, cond_or_uncond=cond_or_uncond, **extra)
    with torch.no_grad():
        out = patch(attn.to_q(x), attn.to_k(text), attn.to_v(text), opts)
        return attn.to_out[0](out)


def run_diffusers(layer, x, text, tokens):
    with torch.no_grad():
        return layer["attn"](x, encoder_hidden_states=(text, [tokens]))


def inputs(rows, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, SEQ, HEADS * DIM_HEAD, generator=gen), torch.randn(rows, TEXT, CTX, generator=gen)


def assert_close(got, expected, tol=1e-5):
    err = (got - expected).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g}"


@pytest.mark.parametrize("order", [[0], [0, 1], [1, 0], [0, 1, 2], [2, 1, 0]])
def test_equals_diffusers_ip_adapter_processor_for_every_chunk_order(layer, order):
    """Chunks with cond_or_uncond 1 get the uncond tokens, every other value (0, the guider's baseline 2)
    the style tokens; each row equals diffusers' processor fed that row's tokens."""
    per = 2
    x, text = inputs(per * len(order))
    got = run_ours(layer, ours(layer), x, text, order)
    tokens = torch.cat([(layer["uncond"] if c == 1 else layer["cond"]).expand(per, -1, -1) for c in order])
    assert_close(got, run_diffusers(layer, x, text, tokens))


def test_three_chunks_positive_negative_baseline(layer):
    """The Prompt Guidance Guider's batch [positive, negative, baseline] = cond_or_uncond [0, 1, 2]."""
    x, text = inputs(3)
    got = run_ours(layer, ours(layer), x, text, [0, 1, 2])
    for row, chunk in enumerate([0, 1, 2]):
        alone = run_ours(layer, ours(layer), x[row:row + 1], text[row:row + 1], [chunk])
        assert_close(got[row:row + 1], alone)
    assert_close(got[0:1], run_diffusers(layer, x[0:1], text[0:1], layer["cond"]))
    assert_close(got[2:3], run_diffusers(layer, x[2:3], text[2:3], layer["cond"]))
    assert_close(got[1:2], run_diffusers(layer, x[1:2], text[1:2], layer["uncond"]))
    assert not torch.allclose(got[1], got[0], atol=1e-3)


def stock(layer, x, text):
    """ComfyUI's own attention on the same projections (what an unpatched attn2 computes)."""
    from comfy.ldm.modules.attention import optimized_attention

    attn = layer["attn"]
    with torch.no_grad():
        return attn.to_out[0](optimized_attention(attn.to_q(x), attn.to_k(text), attn.to_v(text), HEADS))


def test_weight_zero_and_gated_off_rows_are_the_stock_attention_bitwise(layer):
    x, text = inputs(4)
    base = stock(layer, x, text)
    assert torch.equal(run_ours(layer, ours(layer, weight=0.0), x, text, [0, 1]), base)
    # sigma gating: active while sigma_end <= sigma <= sigma_start, per row
    gated = ours(layer, sigma_start=5.0, sigma_end=1.0)
    assert torch.equal(run_ours(layer, gated, x, text, [0, 1], sigmas=torch.full((4,), 9.0)), base)
    assert torch.equal(run_ours(layer, gated, x, text, [0, 1], sigmas=torch.full((4,), 0.5)), base)
    inside = run_ours(layer, gated, x, text, [0, 1], sigmas=torch.full((4,), 3.0))
    assert_close(inside, run_ours(layer, ours(layer), x, text, [0, 1]))
    mixed = run_ours(layer, gated, x, text, [0, 1], sigmas=torch.tensor([3.0, 9.0, 3.0, 9.0]))
    assert torch.equal(mixed[1], base[1]) and torch.equal(mixed[3], base[3])
    assert_close(mixed[0], inside[0])


def test_mask_limits_the_image_attention_to_its_region(layer):
    x, text = inputs(2)
    shape = dict(original_shape=[2, 4, 6, 6])  # 6x6 latent, SEQ = 36 tokens
    base = stock(layer, x, text)
    full = run_ours(layer, ours(layer), x, text, [0, 1])
    zeros = run_ours(layer, ours(layer, mask=torch.zeros(1, 48, 48)), x, text, [0, 1], **shape)
    ones = run_ours(layer, ours(layer, mask=torch.ones(1, 48, 48)), x, text, [0, 1], **shape)
    assert_close(zeros, base)
    assert_close(ones, full)
    left = torch.zeros(1, 48, 48)
    left[:, :, :24] = 1
    half = run_ours(layer, ours(layer, mask=left), x, text, [0, 1], **shape).reshape(2, 6, 6, -1)
    assert_close(half[:, :, :3], full.reshape(2, 6, 6, -1)[:, :, :3])
    assert_close(half[:, :, 3:], base.reshape(2, 6, 6, -1)[:, :, 3:])


def test_wraps_a_previous_replace_and_never_changes_it(layer):
    x, text = inputs(2)
    first = ours(layer, weight=0.5)
    second = ours(layer, weight=0.25, prev=first)
    chained = run_ours(layer, second, x, text, [0, 1])
    attn = layer["attn"]
    with torch.no_grad():
        q = attn.to_q(x)
        opts = dict(n_heads=HEADS, attn_precision=None, cond_or_uncond=[0, 1])
        ip = ours(layer, weight=1.0).image_attention(q, opts)
    assert_close(chained, attn.to_out[0](first(q, attn.to_k(text), attn.to_v(text), opts) + 0.25 * ip).detach())
    assert first.weight == 0.5 and first.prev is None


def test_patch_objects_are_shared_by_deepcopy_moved_by_copy_and_keep_their_dtype(layer):
    patch = ours(layer, mask=torch.ones(1, 8, 8))
    assert copy.deepcopy({"p": patch})["p"] is patch
    assert patch.to(torch.device("cpu")) is patch  # nothing to move
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):  # what model_patches_to(model dtype) passes
        assert patch.to(dtype) is patch
    moved = patch.to(torch.device("meta"))
    assert moved is not patch and patch.to_k_ip.device.type == "cpu"
    for name in ("to_k_ip", "to_v_ip", "cond", "uncond", "mask"):
        assert getattr(moved, name).device.type == "meta" and getattr(moved, name).dtype == torch.float32
    # a dtype still reaches the wrapped replace (another pack's patch gets what ComfyUI would give it)
    seen = []

    class Prev:
        def to(self, target):
            seen.append(target)
            return self

        def __call__(self, q, k, v, extra):
            raise AssertionError("not called")

    prev = Prev()
    assert ours(layer, prev=prev).to(torch.float16).prev is prev and seen == [torch.float16]


@pytest.mark.half
def test_half_precision_queries_get_the_patch_cast_to_their_dtype(layer):
    """A natively bf16/fp16 UNet sends half queries: the fp32 patch computes in that dtype, close to fp32."""
    x, text = inputs(2)
    attn = layer["attn"]
    opts = dict(n_heads=HEADS, attn_precision=None, cond_or_uncond=[0, 1])
    patch = ours(layer)
    with torch.no_grad():
        q = attn.to_q(x)
        full = patch.image_attention(q, opts)
        for dtype in (torch.bfloat16, torch.float16):
            half = patch.image_attention(q.to(dtype), opts)
            assert half.dtype == dtype and patch.to_k_ip.dtype == torch.float32
            rel = ((half.float() - full).norm() / full.norm()).item()
            assert rel < (2e-2 if dtype == torch.bfloat16 else 3e-3), rel


def meta_unet(config: dict):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(image_size=32, use_checkpoint=False, use_spatial_transformer=True, legacy=False, dtype=torch.float32,
                     device="meta", operations=comfy.ops.disable_weight_init, **config)


SDXL_CONFIG = dict(model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                   transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                   transformer_depth_middle=10, context_dim=2048, num_heads=-1, num_head_channels=64,
                   use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")
SD15_CONFIG = dict(model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2, 2],
                   channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                   context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False)


def ids(layers):
    return [2 * layer.index + 1 for layer in layers]


def test_sdxl_presets_are_the_papers_blocks_with_the_h94_key_ids(pack):
    from frozentune.instantstyle import blocks

    layers = blocks.attention_layers(meta_unet(SDXL_CONFIG))
    assert len(layers) == 70 and blocks.model_family(layers) == "sdxl"
    style = blocks.select(layers, "style")
    assert [s.key for s in style] == [("output", 1, t) for t in range(10)]
    assert ids(style) == list(range(69, 88, 2)) and {s.inner_dim for s in style} == {1280}
    layout = blocks.select(layers, "layout")
    assert [s.key for s in layout] == [("input", 8, t) for t in range(10)] and ids(layout) == list(range(29, 48, 2))
    assert [s.key for s in blocks.select(layers, "style+layout")] == [s.key for s in layout + style]
    middle = blocks.select_custom(layers, "middle 0")
    assert [s.key for s in middle] == [("middle", 0, t) for t in range(10)] and ids(middle) == list(range(121, 140, 2))
    assert [s.key for s in blocks.select_custom(layers, "up_blocks.1.attentions.2")] == [("output", 5, 0),
                                                                                        ("output", 5, 1)]
    assert len(blocks.select(layers, "all blocks")) == 70


def test_sd15_experimental_presets_follow_the_official_code(pack):
    from frozentune.instantstyle import blocks

    layers = blocks.attention_layers(meta_unet(SD15_CONFIG))
    assert len(layers) == 16 and blocks.model_family(layers) == "sd15"
    assert [s.key[:2] for s in blocks.select(layers, "style")] == [("output", 3), ("output", 4), ("output", 5)]
    assert ids(blocks.select(layers, "style")) == [13, 15, 17]
    assert [s.key[:2] for s in blocks.select(layers, "layout")] == [("input", 7), ("input", 8), ("middle", 0)]
    assert ids(blocks.select(layers, "layout")) == [9, 11, 31]


def test_missing_blocks_are_errors_never_skipped(pack):
    from frozentune.instantstyle import blocks

    koala = dict(SDXL_CONFIG, num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 5],
                 transformer_depth_output=[0, 0, 1, 1, 1, 1], transformer_depth_middle=-1, channel_mult=[1, 1, 1])
    layers = blocks.attention_layers(meta_unet(koala))
    assert [s.key for s in blocks.select(layers, "style")] == [("output", 1, 0)]  # up_blocks.0.attentions.1 exists
    with pytest.raises(ValueError, match="down_blocks.2.attentions.1, which this model does not have"):
        blocks.select(layers, "layout")
    with pytest.raises(ValueError, match="'middle 0' does not exist"):
        blocks.select_custom(layers, "middle 0")
    with pytest.raises(ValueError, match="'output 1 4' does not exist"):
        blocks.select_custom(layers, "output 1 4")


def formula(q, k_ip, v_ip, heads, weight, scaling):
    """cubiq's embeds_scaling (CrossAttentionPatch.py at f204d6f), written out in float64 per head."""
    if scaling == "K+V w/ C penalty":
        weight = weight * k_ip.shape[-1] / 1280.0
    if scaling != "V only":
        k_ip, v_ip = k_ip * weight, v_ip * weight
    b, n, inner = q.shape
    d = inner // heads

    def split(t):
        return t.double().reshape(b, -1, heads, d).transpose(1, 2)

    attn = torch.softmax(split(q) @ split(k_ip).transpose(-1, -2) / d ** 0.5, dim=-1)
    out = (attn @ split(v_ip)).transpose(1, 2).reshape(b, n, inner)
    return out * weight if scaling == "V only" else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaling", ["V only", "K+V", "K+V w/ C penalty"])
def test_the_three_embeds_scalings_match_their_formulas(layer, scaling, dtype):
    """V only = w * attn(q, k, v); K+V = attn(q, w k, w v); C penalty = K+V with w * inner / 1280
    (here inner = 64, so w / 20). K+V at w = 3 differs from V only: scaling the keys sharpens the softmax."""
    x, _ = inputs(4)
    attn = layer["attn"]
    with torch.no_grad():
        q = attn.to_q(x).to(dtype)
    opts = dict(n_heads=HEADS, attn_precision=None, cond_or_uncond=[0, 1])
    patch = ours(layer, weight=3.0, scaling=scaling)
    got = patch.image_attention(q, opts)
    assert got.dtype == dtype
    w_k, w_v = patch.to_k_ip.double(), patch.to_v_ip.double()
    tokens = torch.cat([layer["cond"].expand(2, -1, -1), layer["uncond"].expand(2, -1, -1)]).double()
    expected = formula(q, tokens @ w_k.T, tokens @ w_v.T, HEADS, 3.0, scaling)
    rel = ((got.double() - expected).norm() / expected.norm()).item()
    assert rel < {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype], rel
    if scaling == "K+V" and dtype == torch.float32:
        v_only = ours(layer, weight=3.0).image_attention(q, opts)
        assert not torch.allclose(got, v_only, rtol=1e-2)
    if scaling == "K+V w/ C penalty" and dtype == torch.float32:
        assert patch.effective_weight() == 3.0 * HEADS * DIM_HEAD / 1280


def test_batch_mode_gives_row_i_the_tokens_of_image_i(layer):
    """cond tokens [3, T, C]: in every chunk, row r attends to image min(r, 2) (the last repeats)."""
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(3, TOKENS, CTX, generator=gen)
    per = 4
    x, text = inputs(2 * per)
    patch = ours(layer, cond=images, uncond=layer["uncond"])
    got = run_ours(layer, patch, x, text, [1, 0])
    for r in range(per):
        row = per + r  # the conditional chunk is the second one
        alone = run_diffusers(layer, x[row:row + 1], text[row:row + 1], images[min(r, 2)][None])
        assert_close(got[row:row + 1], alone)
        assert_close(got[r:r + 1], run_diffusers(layer, x[r:r + 1], text[r:r + 1], layer["uncond"]))
    assert not torch.allclose(got[per], got[per + 1], atol=1e-3)


@pytest.mark.parametrize("declared, uncond_chunks", [(None, {1}), ((1, 2), {1, 2}), ((0,), {0})])
def test_the_guiders_declaration_says_which_chunks_get_the_unconditional_tokens(layer, declared, uncond_chunks):
    from frozentune.sampling import cond_chunks

    x, text = inputs(3)
    extra = {} if declared is None else {cond_chunks.KEY: declared}
    got = run_ours(layer, ours(layer), x, text, [0, 1, 2], **extra)
    for row in range(3):
        tokens = layer["uncond"] if row in uncond_chunks else layer["cond"]
        assert_close(got[row:row + 1], run_diffusers(layer, x[row:row + 1], text[row:row + 1], tokens))
