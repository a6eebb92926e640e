"""InstantX's Flux IP-Adapter on the tiny Flux.1, through InstantStyle's Flux injection: the patched model against
a reference written from InstantX's / Shakker-Labs' source, only the selected blocks changed (each block checked),
weight 0 bitwise unchanged, no mutation; SigLIP pooled through the stock ClipVisionModel against transformers."""

from __future__ import annotations

import pytest
import torch

from harness import hashing
from harness import tiny_flux_instantx as tiny

WEIGHT = 0.8


@pytest.fixture(scope="module")
def flux(tiny_dit, pack):
    return tiny_dit("flux1")


def inputs(model, seed: int = 5) -> dict:
    """Latent, timestep and conditioning for one direct call of the tiny Flux (fp32 inputs; cast to the model's)."""
    dtype = model.model.get_dtype()
    dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    gen = torch.Generator().manual_seed(seed)
    dm = model.model.diffusion_model
    return {"x": torch.randn(1, 16, 8, 8, generator=gen).to(dtype), "timestep": torch.tensor([0.7], dtype=dtype),
            "context": torch.randn(1, 7, dm.params.context_in_dim, generator=gen).to(dtype),
            "y": torch.randn(1, dm.params.vec_in_dim, generator=gen).to(dtype),
            "guidance": torch.tensor([3.5], dtype=dtype)}


def forward(model, replaces: dict | None = None, options: dict | None = None, **kw) -> torch.Tensor:
    """The diffusion model's output with these ``patches_replace["dit"]`` (or a patched clone's options)."""
    opts = dict(options if options is not None else {"patches_replace": {"dit": dict(replaces or {})}})
    opts = {**opts, "cond_or_uncond": [0]}
    with torch.no_grad():
        return model.model.diffusion_model(transformer_options=opts, **kw)


def instantx(model, weight: float = WEIGHT, preset: str = "all", custom: str = ""):
    """(fitted adapter, style tokens, patched clone) through the Flux loader and InstantStyle's Flux injection."""
    from frozentune.instantstyle import flux_adapter_file, flux_apply

    adapter = flux_adapter_file.load(tiny.instantx_path("bin"))
    settings = flux_apply.FluxStyleSettings(weight=weight, preset=preset, custom_blocks=custom)
    adapter, chosen = flux_apply.prepare(model, adapter, settings)
    gen = torch.Generator().manual_seed(6)
    cond = adapter.tokens(torch.randn(1, tiny.EMBED, generator=gen))
    uncond = adapter.tokens(torch.zeros(1, tiny.EMBED))
    return adapter, cond, flux_apply.patch_model(model, adapter, chosen, cond, uncond, settings)


def reference_replaces(model, adapter, cond: torch.Tensor, weight: float, only=None, dtype=torch.float32) -> dict:
    """Reference block replaces; ``dtype``: what InstantX's processors and tokens compute in (it runs them in the
    model's half dtype)."""
    dm = model.model.diffusion_model
    head_dim = dm.params.hidden_size // dm.params.num_heads
    procs = [p.to(dtype) for p in tiny.reference_processors(tiny.instantx_state_dict(), head_dim)]
    cond = cond.to(dtype)
    out = {}
    for i, (block_type, index) in enumerate(adapter.blocks()):
        if only is not None and (block_type, index) not in only:
            continue
        if block_type == "double":
            out[("double_block", index)] = tiny.reference_double(dm.double_blocks[index], procs[i], cond, weight)
        else:
            out[("single_block", index)] = tiny.reference_single(dm.single_blocks[index], procs[i], cond, weight)
    return out


def test_the_patched_tiny_flux_equals_instantx_reference(flux):
    model = flux.model
    adapter, cond, patched = instantx(model)
    assert adapter.blocks() == (("double", 0), ("double", 1), ("single", 0), ("single", 1))
    x = inputs(model)
    base = forward(model, **x)
    got = forward(patched, options=patched.model_options["transformer_options"], **x)
    expected = forward(model, reference_replaces(model, adapter, cond, WEIGHT), **x)
    assert (expected - base).abs().max() > 1e-3, "the reference image attention must visibly act"
    err = (got - expected).abs().max().item()
    assert err <= 1e-5 * max(1.0, expected.abs().max().item()), f"max abs error {err:.3g}"


@pytest.mark.parametrize("dtype, weight_dtype", [("bf16", None), ("fp16", None), ("fp32", "fp8")])
def test_half_precision_and_fp8_storage_match_the_reference(tiny_dit, pack, dtype, weight_dtype):
    """bf16/fp16 computing natively, and fp8-stored weights computing in fp32: the patched model against the
    reference on the same model (InstantX runs its processors in the model's dtype; ours keeps k/v in float32 and
    casts them at use), relative to the size of the image-attention effect."""
    from harness import tiny_dits

    model = tiny_dits.load("flux1", None if dtype == "fp32" else dtype, weight_dtype).model
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    adapter, cond, patched = instantx(model)
    x = inputs(model)
    base = forward(model, **x).float()
    got = forward(patched, options=patched.model_options["transformer_options"], **x).float()
    expected = forward(model, reference_replaces(model, adapter, cond, WEIGHT, dtype=compute), **x).float()
    effect = (expected - base).abs().max().item()
    err = (got - expected).abs().max().item()
    assert torch.isfinite(got).all() and effect > 1e-2
    assert err <= (1e-4 if compute == torch.float32 else 0.1) * effect, f"error {err:.3g} for an effect of {effect:.3g}"


def test_weight_zero_is_bitwise_the_unpatched_model_and_nothing_is_mutated(flux):
    model = flux.model
    before = hashing.weight_hash(model.model.diffusion_model)
    options_before = repr(model.model_options)
    x = inputs(model)
    base = forward(model, **x)
    _, _, zero = instantx(model, weight=0.0)
    assert torch.equal(forward(zero, options=zero.model_options["transformer_options"], **x), base)
    _, _, patched = instantx(model)
    forward(patched, options=patched.model_options["transformer_options"], **x)
    assert hashing.weight_hash(model.model.diffusion_model) == before
    assert repr(model.model_options) == options_before, "the input MODEL's options (patches) changed"
    assert torch.equal(forward(model, **x), base)


class BlockRecorder:
    """Records each block's inputs (cloned before the block runs: single blocks add in place) and outputs."""

    def __init__(self, dm):
        self.calls: dict[tuple[str, int], tuple] = {}
        self.handles = []
        for kind, blocks in (("double", dm.double_blocks), ("single", dm.single_blocks)):
            for i, block in enumerate(blocks):
                self.handles.append(block.register_forward_pre_hook(self._pre((kind, i)), with_kwargs=True))
                self.handles.append(block.register_forward_hook(self._post((kind, i)), with_kwargs=True))

    @staticmethod
    def _clone(v):
        return v.clone() if isinstance(v, torch.Tensor) else v

    def _pre(self, key):
        def hook(module, args, kwargs):
            self.calls[key] = (tuple(self._clone(a) for a in args),
                               {k: self._clone(v) for k, v in kwargs.items() if k != "transformer_options"})
        return hook

    def _post(self, key):
        def hook(module, args, kwargs, output):
            out = tuple(o.clone() for o in output) if isinstance(output, tuple) else (output.clone(),)
            self.calls[key] = (*self.calls[key], out)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("block", [("double", 0), ("double", 1), ("single", 0), ("single", 1)])
def test_only_the_selected_block_computes_differently(flux, block):
    """Each block's recorded output against the stock block run on the same recorded input: equal bitwise for
    every block but the selected one, which differs (and equals the reference there)."""
    model = flux.model
    dm = model.model.diffusion_model
    adapter, cond, patched = instantx(model, preset="custom", custom=f"{block[0]} {block[1]}")
    x = inputs(model)
    recorder = BlockRecorder(dm)
    try:
        forward(patched, options=patched.model_options["transformer_options"], **x)
    finally:
        recorder.close()
    assert set(recorder.calls) == {("double", 0), ("double", 1), ("single", 0), ("single", 1)}
    for key, (args, kwargs, out) in recorder.calls.items():
        module = (dm.double_blocks if key[0] == "double" else dm.single_blocks)[key[1]]
        with torch.no_grad():
            stock = module(*[a.clone() for a in args], **{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                         for k, v in kwargs.items()}, transformer_options={})
        stock = stock if isinstance(stock, tuple) else (stock,)
        same = all(torch.equal(a, b) for a, b in zip(stock, out, strict=True))
        assert same == (key != block), f"{key}: {'unchanged' if same else 'changed'} with only {block} selected"
    # the selected block alone, against the reference written from InstantX's source
    expected = forward(model, reference_replaces(model, adapter, cond, WEIGHT, only={block}), **x)
    got = forward(patched, options=patched.model_options["transformer_options"], **x)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_siglip_pooled_through_the_stock_clip_vision_model_equals_transformers_pooler_output(pack):
    """ComfyUI's SigLIP (no head) + FrozenTune's pooling head == transformers' SiglipVisionModel.pooler_output, what
    InstantX feeds its projection, on the same pixels (ComfyUI's clip_preprocess, no crop as InstantX's processor)."""
    import comfy.clip_vision

    from frozentune.instantstyle import flux_instantx as ix

    clip_vision = tiny.clip_vision_model()
    head = ix.load_siglip_head(tiny.siglip_path(), clip_vision=clip_vision)
    assert head.heads == tiny.SIGLIP["num_attention_heads"]
    image = torch.rand(2, 40, 70, 3, generator=torch.Generator().manual_seed(7))
    got = ix.pooled_embeds(clip_vision, image, head)
    pixels = comfy.clip_vision.clip_preprocess(image, size=56, mean=[0.5] * 3, std=[0.5] * 3, crop=False)
    with torch.no_grad():
        expected = tiny.hf_siglip()(pixel_values=pixels.float()).pooler_output
    assert got.shape == (2, tiny.EMBED)
    # ComfyUI keeps CLIP vision weights in fp16 on this CPU, and its SigLIP layer norms use eps 1e-5 (HF: 1e-6)
    assert (got - expected).abs().max().item() < 1e-2
    clip_vision.model.float()  # a test-local copy: with fp32 weights and HF's eps nothing else differs
    clip_vision.load_sd(tiny.siglip_state_dict())
    for module in clip_vision.model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    exact = ix.pooled_embeds(clip_vision, image, head)
    assert (exact - expected).abs().max().item() < 1e-5
    adapter = ix.load(tiny.instantx_path("bin")).with_siglip_head(tiny.siglip_path())
    features = clip_vision.encode_image(image, crop=adapter.crop)[adapter.embed_kind]
    assert (adapter.tokens(features) - adapter.tokens(expected)).abs().max().item() < 1e-2


# --- through the nodes: loader (with the SigLIP file for the head) and InstantStyle Apply (Flux) -------------------

def load_node(instantx_kind: str = "bin", siglip: bool = True):
    import folder_paths

    from frozentune.nodes.instantstyle_nodes import FluxIPAdapterLoader

    path, siglip_path = tiny.instantx_path(instantx_kind), tiny.siglip_path()
    folder_paths.add_model_folder_path("ipadapter", str(path.parent))
    folder_paths.add_model_folder_path("clip_vision", str(siglip_path.parent))
    return FluxIPAdapterLoader.execute(path.name, siglip_path.name if siglip else "none").args[0]


def loaded(siglip: bool = True):
    """The adapter as the loader node makes it (flux_adapter_file.load, then with_siglip_head)."""
    from frozentune.instantstyle import flux_adapter_file

    adapter = flux_adapter_file.load(tiny.instantx_path("bin"))
    return adapter.with_siglip_head(tiny.siglip_path()) if siglip else adapter


def fp32_clip_vision():
    """The tiny SigLIP as the stock ClipVisionModel, in fp32 with transformers' layer-norm eps (see the SigLIP test)."""
    clip_vision = tiny.clip_vision_model()
    clip_vision.model.float()
    clip_vision.load_sd(tiny.siglip_state_dict())
    for module in clip_vision.model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    return clip_vision


def test_loader_node_reads_instantx_with_the_siglip_head_and_without(pack):
    from frozentune.instantstyle import flux_instantx as ix

    adapter = load_node()
    assert isinstance(adapter, ix.InstantXAdapter) and adapter.head is not None and adapter.head.heads == 2
    assert load_node("safetensors", siglip=False).head is None


def test_apply_node_image_to_output_equals_instantx_reference(flux):
    """The whole chain, image -> SigLIP pooled -> MLPProjModel -> 57-style per-block attention, against transformers'
    SigLIP pooler_output fed to the reference projection and blocks (InstantX's pipeline)."""
    import comfy.clip_vision

    from frozentune.nodes.instantstyle_nodes import InstantStyleApplyFlux

    model, adapter, clip_vision = flux.model, loaded(), fp32_clip_vision()
    image = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(10))
    patched = InstantStyleApplyFlux.execute(
        model=model, flux_ipadapter=adapter, clip_vision=clip_vision, image=image, weight=WEIGHT, preset="all",
        custom_blocks="", combine_images="average", content_text="", subtract=0.0, start_at=0.0, end_at=1.0).args[0]
    pixels = comfy.clip_vision.clip_preprocess(image, size=56, mean=[0.5] * 3, std=[0.5] * 3, crop=False)
    proj = tiny.MLPProjModel(tiny.CROSS, tiny.EMBED, tiny.TOKENS)
    proj.load_state_dict(tiny.instantx_state_dict()["image_proj"], strict=True)
    with torch.no_grad():
        cond = proj(tiny.hf_siglip()(pixel_values=pixels.float()).pooler_output)
    x = inputs(model)
    fitted = adapter.fit_model(model.model.diffusion_model)
    expected = forward(model, reference_replaces(model, fitted, cond, WEIGHT), **x)
    got = forward(patched, options=patched.model_options["transformer_options"], **x)
    err = (got - expected).abs().max().item()
    assert err <= 1e-4 * max(1.0, expected.abs().max().item()), f"max abs error {err:.3g}"


def test_apply_node_samples_and_refuses_without_the_siglip_head(flux):
    import nodes
    from comfy_extras.nodes_flux import FluxGuidance

    from frozentune.nodes.instantstyle_nodes import InstantStyleApplyFlux

    args = dict(weight=1.0, preset="all", custom_blocks="", combine_images="average", content_text="", subtract=0.0,
                start_at=0.0, end_at=1.0)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(11))
    clip_vision = tiny.clip_vision_model()

    def sample(model):
        positive = FluxGuidance.execute(flux.encode("a photo of a cat"), 3.5).args[0]
        return nodes.common_ksampler(model, 0, 2, 1.0, "euler", "simple", positive, positive,
                                     flux.empty_latent(64))[0]["samples"]

    base = sample(flux.model)
    patched = InstantStyleApplyFlux.execute(model=flux.model, flux_ipadapter=loaded(), clip_vision=clip_vision,
                                            image=image, **args).args[0]
    out = sample(patched)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    with pytest.raises(ValueError, match="no pooling head: choose the SigLIP file"):
        InstantStyleApplyFlux.execute(model=flux.model, flux_ipadapter=loaded(siglip=False),
                                      clip_vision=clip_vision, image=image, **args)
