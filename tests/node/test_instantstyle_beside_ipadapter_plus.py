"""InstantStyle beside cubiq's ComfyUI_IPAdapter_plus, the incumbent IP-Adapter pack most users also have:

- no socket type name of ours is one of his (the frontend would link his values into our nodes and ours into his);
- his Plus unconditional tokens (an all-black image through CLIP vision) are an option, ours stay the default;
- his IPAdapter node applied after ours stops the run with an error that names the order that works, and leaves
  our patch as it was.

His code is not vendored (GPL-3.0, and CI cannot fetch it): what these tests need is recorded here as data, or
restated in a few lines, with the commit and the file and lines it was read from.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.hashing import object_hash

CUBIQ_REPO = "github.com/cubiq/ComfyUI_IPAdapter_plus"
CUBIQ_COMMIT = "9d076a3df0d2763cef5510ec5ab807f6632c39f5"  # 2025-02-26, "Merge pull request #793"
# Every socket type name in IPAdapterPlus.py at CUBIQ_COMMIT: the INPUT_TYPES and RETURN_TYPES of the 37 nodes of
# its NODE_CLASS_MAPPINGS (his __init__.py exports only those; no other file of his defines a node).
CUBIQ_OWN_TYPES = frozenset({"IPADAPTER", "EMBEDS", "INSIGHTFACE", "IPADAPTER_PARAMS", "WEIGHTS_STRATEGY"})
CUBIQ_STOCK_TYPES = frozenset({"MODEL", "IMAGE", "MASK", "CLIP_VISION", "CONDITIONING", "FLOAT", "INT", "STRING",
                               "BOOLEAN"})
CUBIQ_SOCKET_TYPES = CUBIQ_OWN_TYPES | CUBIQ_STOCK_TYPES
PREFIX = "FROZENTUNE_"


# --- socket type names -------------------------------------------------------------------------------------------

def stock_types() -> set[str]:
    """The io_type of every type ComfyUI's V3 API defines (MODEL, IMAGE, CLIP_VISION, ...)."""
    from comfy_api.latest import io

    return {str(v.io_type) for v in vars(io).values() if isinstance(v, type) and getattr(v, "io_type", None)}


def our_custom_types() -> dict[str, set[str]]:
    """Non-stock socket type name -> the 'node id.socket' places that use it, over every FrozenTune node."""
    from frozentune.nodes import NODE_CLASSES

    stock = stock_types()
    found: dict[str, set[str]] = {}
    for cls in NODE_CLASSES:
        schema = cls.GET_SCHEMA()
        for socket in [*schema.inputs, *schema.outputs]:
            name = str(socket.get_io_type())
            if name not in stock:
                found.setdefault(name, set()).add(f"{schema.node_id}.{socket.id or socket.display_name}")
    return found


def type_name_problems(types) -> list[str]:
    problems = [f"{t} is a socket type of cubiq's IPAdapter_plus ({CUBIQ_COMMIT[:7]})" for t in types
                if t in CUBIQ_SOCKET_TYPES]
    return problems + [f"{t} does not start with {PREFIX}" for t in types if not t.startswith(PREFIX)]


def test_our_socket_types_are_ours_and_none_is_cubiqs(pack):
    ours = our_custom_types()
    assert {"FROZENTUNE_IPADAPTER", "FROZENTUNE_IPADAPTER_EMBEDS"} <= set(ours), ours
    assert not type_name_problems(ours), type_name_problems(ours)
    assert CUBIQ_STOCK_TYPES <= stock_types()  # his stock names are ComfyUI's: only his own ones can collide


def test_the_type_name_check_catches_his_names_and_unprefixed_ones():
    assert len(type_name_problems(["IPADAPTER", "EMBEDS", "FROZENTUNE_OK"])) == 4  # 2 his, 2 unprefixed
    assert type_name_problems(["IPADAPTER_EMBEDS"]) == ["IPADAPTER_EMBEDS does not start with FROZENTUNE_"]
    assert not type_name_problems(["FROZENTUNE_IPADAPTER"])


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_checkpoints, pack):
    import nodes

    return {f: nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints[f].name)[0]
            for f in ("sdxl_blocks", "sd15")}


@pytest.fixture(scope="module")
def stand_ins(models):
    from frozentune.instantstyle import adapter_file
    from harness import tiny_ipadapter

    return dict(
        xl=adapter_file.load(tiny_ipadapter.ipadapter_path("sdxl_blocks")),
        xl_plus=adapter_file.load(tiny_ipadapter.ipadapter_path("sdxl_blocks", "plus", 64)),  # tiny ViT is 64 wide
        sd15=adapter_file.load(tiny_ipadapter.ipadapter_path("sd15", embed_width=1024)),
        clip_vision=tiny_ipadapter.clip_vision_model(),
    )


def style(model, adapter, clip_vision, image, **kw):
    from harness import tiny_ipadapter

    return tiny_ipadapter.apply_style(model, adapter, clip_vision, image, **kw)


def encode(adapter, clip_vision, image, **kw):
    from frozentune.nodes.instantstyle_nodes import InstantStyleEncode

    return InstantStyleEncode.execute(ipadapter=adapter, clip_vision=clip_vision, image=image, content_text="",
                                      subtract=0.5, **kw).args


def attn2(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


# --- plus_negative -----------------------------------------------------------------------------------------------

def black_penultimate(clip_vision) -> torch.Tensor:
    """cubiq's Plus uncond features (IPAdapterPlus.py:381-383): an all-black [0, 1] image through CLIP vision,
    here ComfyUI's own ``encode_image`` (CLIP normalisation included)."""
    size = clip_vision.image_size
    return clip_vision.encode_image(torch.zeros(1, size, size, 3))["penultimate_hidden_states"].float()


def test_plus_negative_is_the_last_widget_of_apply_and_encode_and_defaults_to_zeros(pack):
    from frozentune.instantstyle import apply
    from frozentune.nodes.instantstyle_nodes import InstantStyleApply, InstantStyleEncode

    assert apply.PLUS_NEGATIVES == ("zeros (official IP-Adapter)", "black image (IPAdapter_plus)")
    for cls in (InstantStyleApply, InstantStyleEncode):
        widgets = [i for i in cls.GET_SCHEMA().inputs if i.get_io_type() in ("INT", "FLOAT", "STRING", "BOOLEAN",
                                                                               "COMBO")]
        last = widgets[-1]
        assert last.id == "plus_negative" and last.default == "zeros (official IP-Adapter)", cls.__name__
        assert list(last.options) == list(apply.PLUS_NEGATIVES)


def test_black_image_option_gives_cubiqs_plus_uncond_and_the_default_stays_the_official_zeros(
        models, stand_ins, style_image):
    from frozentune.instantstyle import projection

    model, cv, plus = models["sdxl_blocks"], stand_ins["clip_vision"], stand_ins["xl_plus"]
    default = attn2(style(model, plus, cv, style_image))[("output", 1, 0)]
    black = attn2(style(model, plus, cv, style_image, plus_negative="black image (IPAdapter_plus)"))[("output", 1, 0)]
    zero_pixels = cv.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1].float()
    assert torch.equal(default.uncond, projection.project(plus, zero_pixels))  # unchanged: h94 / diffusers
    assert torch.equal(black.uncond, projection.project(plus, black_penultimate(cv)))
    assert (black.uncond - default.uncond).abs().max() > 1e-2
    assert torch.equal(black.cond, default.cond)  # only the unconditional side changes

    # Encode: the same features as its negative_embeds, labelled; a connected negative_image wins over the option
    _, negative = encode(plus, cv, style_image, plus_negative="black image (IPAdapter_plus)")
    assert torch.equal(negative.features, black_penultimate(cv)) and negative.source == "black image"
    _, zeros = encode(plus, cv, style_image)
    assert torch.equal(zeros.features, zero_pixels) and zeros.source == "zeros"
    noise = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    with_image = [encode(plus, cv, style_image, negative_image=noise, plus_negative=choice)[1].features
                  for choice in ("zeros (official IP-Adapter)", "black image (IPAdapter_plus)")]
    assert torch.equal(*with_image)


def test_plain_adapters_use_zero_embeds_under_both_choices_as_cubiq_does(models, stand_ins, style_image):
    """cubiq: ``img_uncond_embeds = torch.zeros_like(img_cond_embeds)`` for non-Plus (IPAdapterPlus.py:391)."""
    model, cv, plain = models["sdxl_blocks"], stand_ins["clip_vision"], stand_ins["xl"]
    for choice in ("zeros (official IP-Adapter)", "black image (IPAdapter_plus)"):
        embeds, negative = encode(plain, cv, style_image, plus_negative=choice)
        assert torch.equal(negative.features, torch.zeros_like(embeds.features[:1])) and negative.source == "zeros"
    tokens = [attn2(style(model, plain, cv, style_image, plus_negative=c))[("output", 1, 0)].uncond
              for c in ("zeros (official IP-Adapter)", "black image (IPAdapter_plus)")]
    assert torch.equal(*tokens)


def test_an_unknown_plus_negative_is_refused(models, stand_ins, style_image):
    with pytest.raises(ValueError, match="plus_negative 'black'"):
        style(models["sdxl_blocks"], stand_ins["xl_plus"], stand_ins["clip_vision"], style_image, plus_negative="black")
    with pytest.raises(ValueError, match="plus_negative 'black'"):
        encode(stand_ins["xl_plus"], stand_ins["clip_vision"], style_image, plus_negative="black")


# --- his IPAdapter node after ours -------------------------------------------------------------------------------

class HisAttn2Replace:
    """Stand-in for cubiq's ``Attn2Replace`` (CrossAttentionPatch.py:7-22 at CUBIQ_COMMIT): the stock attention
    plus his callbacks; ``add`` appends another callback in place. Records its calls."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs, self.calls = [callback], [kwargs], 0

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        self.calls += 1
        return optimized_attention(q, k, v, extra_options["n_heads"])


def his_attention(*args, **kwargs):  # his ipadapter_attention callback; never reached in these tests
    raise AssertionError("not called")


def his_set_model_patch_replace(model, patch_kwargs: dict, key: tuple) -> None:
    """cubiq's ``set_model_patch_replace`` (IPAdapterPlus.py:210-226 at CUBIQ_COMMIT), restated: shallow copies of
    transformer_options, patches_replace and attn2; a free key gets a new Attn2Replace and the copies are set on
    the model; a taken key gets the exact call of IPAdapterPlus.py:226, ``.add(ipadapter_attention, **kwargs)``
    on whatever object sits there (without setting the copies back)."""
    to = model.model_options["transformer_options"].copy()
    to["patches_replace"] = to.get("patches_replace", {}).copy()
    to["patches_replace"]["attn2"] = to["patches_replace"].get("attn2", {}).copy()
    if key not in to["patches_replace"]["attn2"]:
        to["patches_replace"]["attn2"][key] = HisAttn2Replace(his_attention, **patch_kwargs)
        model.model_options["transformer_options"] = to
    else:
        to["patches_replace"]["attn2"][key].add(his_attention, **patch_kwargs)


def his_ipadapter_node(model, sdxl: bool):
    """His IPAdapter / IPAdapterAdvanced: ``ipadapter_execute(model.clone(), ...)`` (IPAdapterPlus.py:752, 818)
    patching every cross-attention layer in the order input, output, middle (IPAdapterPlus.py:509-537): keys
    (block, id, index) on SDXL and (block, id) on SD1.5. His id lists are the full-size models'; the tiny
    models' own layers are used here, in the same order."""
    from frozentune.instantstyle import blocks

    work = model.clone()
    kwargs = dict(weight=1.0, sigma_start=math.inf, sigma_end=0.0, embeds_scaling="V only")
    keys = [layer.key if sdxl else layer.key[:2] for layer in blocks.attention_layers(work.model.diffusion_model)]
    for number, key in enumerate(dict.fromkeys(keys)):
        his_set_model_patch_replace(work, {**kwargs, "module_key": str(number * 2 + 1)}, key)
    return work


ORDER = "Put his IPAdapter nodes first and InstantStyle Apply (or Apply Embeds) after them"


def test_his_node_after_ours_on_sdxl_stops_naming_the_order_and_leaves_our_patch_alone(models, stand_ins,
                                                                                        style_image):
    model, cv = models["sdxl_blocks"], stand_ins["clip_vision"]
    ours = style(model, stand_ins["xl"], cv, style_image, preset="style+layout")
    patches = dict(attn2(ours))
    hashes = {key: object_hash(p) for key, p in patches.items()}
    with pytest.raises(ValueError, match="cubiq's IPAdapter node .* applied after FrozenTune InstantStyle") as err:
        his_ipadapter_node(ours, sdxl=True)
    assert ORDER in str(err.value)
    assert attn2(ours) == patches and {key: object_hash(p) for key, p in patches.items()} == hashes

    # the order that works: his first, then ours, which wraps his patch on every layer it patches
    his = his_ipadapter_node(model, sdxl=True)
    both = style(his, stand_ins["xl"], cv, style_image, preset="style+layout")
    for key, patch in attn2(both).items():  # (ModelPatcher.clone deep-copies his patches, not ours)
        assert patch.prev is attn2(his)[key] if key in patches else isinstance(patch, HisAttn2Replace)


def sd15_sample(model):
    import nodes

    cond = [[torch.zeros(1, 77, 768), {}]]
    return nodes.common_ksampler(model, 3, 1, 5.0, "euler", "normal", cond, cond,
                                 {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]


def sd15_style(model, adapter):
    """InstantStyle Apply Embeds on the tiny SD1.5 (whose adapter's 1024-d embeds the tiny ViT does not make), on
    one of its two cross-attention layers (output 0; input 1 stays his alone)."""
    from frozentune.instantstyle.embeds import StyleEmbeds
    from frozentune.nodes.instantstyle_nodes import InstantStyleApplyEmbeds

    embeds = StyleEmbeds(torch.randn(1, 1024, generator=torch.Generator().manual_seed(3)), "image_embeds")
    return InstantStyleApplyEmbeds.execute(model=model, ipadapter=adapter, embeds=embeds, weight=1.0,
                                           composition_weight=1.0, preset="custom", custom_blocks="output 0",
                                           combine_embeds="average", embeds_scaling="V only", start_at=0.0,
                                           end_at=1.0).args[0]


def test_his_node_after_ours_on_sd15_stops_at_sampling_instead_of_being_silently_skipped(models, stand_ins):
    """On SD1.5 his keys are (block, id) and ours (block, id, index): his node finds no patch of ours to ``.add`` to
    and puts his own beside it, which ComfyUI would never run on our layers (it prefers the per-layer key)."""
    model, adapter = models["sd15"], stand_ins["sd15"]
    ours = sd15_style(model, adapter)
    patches = dict(attn2(ours))
    hashes = {key: object_hash(p) for key, p in patches.items()}
    after = his_ipadapter_node(ours, sdxl=False)
    with pytest.raises(ValueError, match="added after FrozenTune InstantStyle") as err:
        sd15_sample(after)
    assert ORDER in str(err.value) and "SD1.5" in str(err.value)
    assert attn2(ours) == patches and {key: object_hash(p) for key, p in patches.items()} == hashes

    # the order that works: his first, then ours wraps his block patch, and sampling runs both
    his = his_ipadapter_node(model, sdxl=False)
    both = sd15_style(his, adapter)
    wrapped = [p for key, p in attn2(both).items() if len(key) == 3]
    assert wrapped and all(p.prev is attn2(his)[key[:2]] for key, p in attn2(both).items() if len(key) == 3)
    assert torch.isfinite(sd15_sample(both)).all()
    assert all(p.prev.calls > 0 for p in wrapped)
    assert torch.isfinite(sd15_sample(ours)).all()  # ours alone still samples
