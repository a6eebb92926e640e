"""The family table and its rules, without ComfyUI: ids, lookups, messages, train-target patterns.

The rules on the real ComfyUI module trees (SD1.5, SDXL, Flux, SD3 built on the meta device) are in
tests/node/test_families_dit.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from harness.comfy_env import REPO_ROOT, import_pack

import_pack()
from frozentune import families  # noqa: E402

SUPPORTED = ("sd15", "sdxl", "flux1", "flux1_schnell", "sd3", "qwen_image", "z_image", "chroma")
SUPPORTED_LABELS = "SD1.x, SDXL family, Flux.1 dev, Flux.1 schnell, SD3/SD3.5, Qwen-Image, Z-Image, Chroma"


def stand_in(config_class: str, patcher: bool = False):
    """A stand-in for a BaseModel (or a MODEL wrapping one) whose model_config is of class ``config_class``."""
    base = SimpleNamespace(model_config=type(config_class, (), {})())
    return SimpleNamespace(model=base) if patcher else base


def legacy_is_attention(name: str) -> bool:
    """unitune/finetune.py ``_is_attention`` at 28daab5 (before the family table), for comparison."""
    return any(part in f".{name}." for part in (".attn1.", ".attn2."))


def legacy_lora(name: str) -> bool:
    """unitune/finetune.py's lora selection at 28daab5 (by name; it also requires a ``weight_function``)."""
    return legacy_is_attention(name) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))


def test_import_needs_neither_torch_nor_comfy():
    code = ("import sys; sys.path.insert(0, 'tests'); from harness.comfy_env import import_pack; import_pack(); "
            "from frozentune import families; families.train_targets('flux1', 'lora')('x'); "
            "print(sorted(m for m in ('torch', 'comfy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_table_has_the_fixed_ids_and_each_config_class_once():
    assert tuple(families.FAMILIES) == SUPPORTED
    assert (families.SD15, families.SDXL, families.FLUX1, families.FLUX1_SCHNELL, families.SD3, families.QWEN_IMAGE,
            families.Z_IMAGE, families.CHROMA) == SUPPORTED
    classes = [c for f in families.FAMILIES.values() for c in f.config_classes]
    assert len(classes) == len(set(classes))
    for family in families.FAMILIES.values():
        assert family.known and family.arch in ("unet", "dit") and family.cfg in ("true", "distilled")
        keys = [e.key for e in family.text_encoders]
        assert len(keys) == len(set(keys)) and family.word_encoders, family.id
        for mode in families.TRAIN_MODES:
            re.compile(family.targets.pattern(mode))


def test_family_facts():
    f = families.FAMILIES
    assert [f[i].latent_channels for i in SUPPORTED] == [4, 4, 16, 16, 16, 16, 16, 16]
    assert [f[i].arch for i in SUPPORTED] == ["unet", "unet", "dit", "dit", "dit", "dit", "dit", "dit"]
    assert [f[i].cfg for i in SUPPORTED] == ["true", "true", "distilled", "distilled", "true", "true", "distilled",
                                             "true"]
    assert [i for i in SUPPORTED if f[i].guidance_embed] == ["flux1"]  # Chroma reads a guidance input, held at 0
    assert [i for i in SUPPORTED if f[i].auto_train != "lora"] == ["sd15"]
    assert [e.key for e in f["sdxl"].text_encoders] == ["clip_l", "clip_g"]
    # Flux: CLIP-L only feeds the pooled vector, the T5 tokens carry the word
    assert [e.key for e in f["flux1"].word_encoders] == ["t5xxl"]
    assert f["flux1"].encoder("clip_l").pooled and not f["flux1"].encoder("clip_l").word
    assert [e.key for e in f["sd3"].word_encoders] == ["clip_l", "clip_g", "t5xxl"]
    assert [(e.key, e.tokens, e.width) for e in f["sd3"].text_encoders] == [
        ("clip_l", "l", 768), ("clip_g", "g", 1280), ("t5xxl", "t5xxl", 4096)]
    assert f["sd15"].controlnet_layout == f["sdxl"].controlnet_layout == "ldm"
    assert f["flux1"].controlnet_layout == f["flux1_schnell"].controlnet_layout == "flux_xlabs"
    assert f["sd3"].controlnet_layout == "sd3_diffusers"
    # Qwen-Image / Z-Image: one Qwen encoder each, whose tokenizer ComfyUI 0.3.75 builds without the embedding
    # directory; Chroma: T5 alone, under Flux's key
    assert [(e.key, e.tokens, e.width, e.embedding) for i in ("qwen_image", "z_image", "chroma")
            for e in f[i].text_encoders] == [("qwen25_7b", "qwen25_7b", 3584, False),
                                             ("qwen3_4b", "qwen3_4b", 2560, False), ("t5xxl", "t5xxl", 4096, True)]
    assert all(e.embedding for i in SUPPORTED[:5] for e in f[i].text_encoders)
    # ... their words are read on a private tokenizer copy (textual_inversion/private_words.py); nothing else is
    assert [e.key for i in f for e in f[i].text_encoders if e.private_words] == ["qwen25_7b", "qwen3_4b"]
    assert [f[i].context_dim for i in ("qwen_image", "z_image", "chroma")] == [3584, 2560, 4096]
    assert not any(f[i].pooled for i in ("qwen_image", "z_image", "chroma"))
    assert f["chroma"].targets == f["flux1"].targets  # Flux's own blocks


@pytest.mark.parametrize("patcher", [False, True], ids=["BaseModel", "ModelPatcher"])
@pytest.mark.parametrize(("config_class", "family"), [
    ("SD15", "sd15"), ("SD15_instructpix2pix", "sd15"), ("SDXL", "sdxl"), ("KOALA_700M", "sdxl"),
    ("SSD1B", "sdxl"), ("Segmind_Vega", "sdxl"), ("KOALA_1B", "sdxl"), ("Flux", "flux1"),
    ("FluxSchnell", "flux1_schnell"), ("SD3", "sd3"), ("QwenImage", "qwen_image"), ("ZImage", "z_image"),
    ("Chroma", "chroma"),
])
def test_family_of_by_config_class(config_class, family, patcher):
    model = stand_in(config_class, patcher)
    assert families.family_of(model) is families.FAMILIES[family]
    assert families.model_family(model) == family


@pytest.mark.parametrize(("config_class", "label"), [
    ("Lumina2", "Lumina 2"), ("FluxInpaint", "Flux.1 Fill"), ("Flux2", "Flux.2"), ("ChromaRadiance", "Chroma Radiance"),
    ("SDXLRefiner", "SDXL Refiner"), ("SomeCustomDiT", "SomeCustomDiT"),
])
def test_unknown_families_get_a_readable_name_and_are_refused(config_class, label):
    model = stand_in(config_class)
    family = families.family_of(model)
    assert (family.id, family.label, family.known) == (config_class.lower(), label, False)
    assert families.model_family(model) == config_class.lower()  # what model_family returned before the table
    with pytest.raises(ValueError) as err:
        families.require(model, "UniTune Fine-Tune", SUPPORTED)
    assert str(err.value).startswith(f"UniTune Fine-Tune does not support {label} yet (supported: {SUPPORTED_LABELS})")
    with pytest.raises(ValueError, match="no train targets"):
        families.train_targets(family, "lora")


def test_require_passes_a_supported_family_and_refuses_a_known_one_outside_the_list():
    assert families.require(stand_in("Flux", patcher=True), "UniTune Fine-Tune", SUPPORTED).id == "flux1"
    with pytest.raises(ValueError, match=r"^Textual Inversion Train does not support Flux\.1 dev yet \(supported: "
                                         r"SD1\.x, SDXL family\)"):
        families.require(stand_in("Flux"), "Textual Inversion Train", ("sd15", "sdxl"))
    with pytest.raises(KeyError):
        families.require(stand_in("Flux"), "X", ("flux",))  # a typo in a capability's list fails loudly


def test_a_config_class_named_like_a_family_id_is_no_family():
    with pytest.raises(ValueError, match="does not support Flux1 yet"):
        families.require(stand_in("Flux1"), "UniTune Fine-Tune", SUPPORTED)


def test_train_targets_refuse_an_unknown_mode():
    with pytest.raises(ValueError, match="train mode 'loha' is unknown"):
        families.train_targets("sd15", "loha")


# Names as ComfyUI's UNet has them, plus odd ones where a sloppy pattern would differ from the old rule.
UNET_NAMES = [
    "", "input_blocks.1.1", "input_blocks.1.1.proj_in", "input_blocks.1.1.transformer_blocks.0",
    "input_blocks.1.1.transformer_blocks.0.attn1", "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_k", "input_blocks.1.1.transformer_blocks.0.attn1.to_v",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out", "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.1", "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "middle_block.1.transformer_blocks.0.attn2.to_out.0", "output_blocks.2.1.transformer_blocks.1.ff.net.2",
    "output_blocks.2.1.transformer_blocks.1.norm2", "time_embed.0", "label_emb.0.0", "out.2",
    "attn1", "attn1.to_q", "xattn1.to_q", "attn12.to_q", "a.attn2.b.to_v", "a.attn2.proto_q", "a.to_q.attn1",
    "a.attn3.to_q", "a.attn1x.to_q",
]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_rules_are_the_old_finetune_rules(family):
    for mode, legacy in (("attention", legacy_is_attention), ("lora", legacy_lora), ("full", lambda n: True)):
        rule = families.train_targets(family, mode)
        assert [n for n in UNET_NAMES if rule(n)] == [n for n in UNET_NAMES if legacy(n)], mode


FLUX_NAMES = {  # name -> (in attention, in lora), from comfy/ldm/flux/{model,layers}.py
    "img_in": (0, 0), "time_in.in_layer": (0, 0), "vector_in.out_layer": (0, 0), "guidance_in.in_layer": (0, 0),
    "txt_in": (0, 0), "double_blocks.0.img_mod.lin": (0, 0), "double_blocks.0.img_attn.qkv": (1, 1),
    "double_blocks.0.img_attn.norm.query_norm": (0, 0), "double_blocks.0.img_attn.proj": (1, 1),
    "double_blocks.0.img_mlp.0": (0, 1), "double_blocks.0.img_mlp.2": (0, 1), "double_blocks.12.txt_mod.lin": (0, 0),
    "double_blocks.12.txt_attn.qkv": (1, 1), "double_blocks.12.txt_attn.proj": (1, 1),
    "double_blocks.12.txt_mlp.0": (0, 1), "double_blocks.12.txt_mlp.2": (0, 1), "double_blocks.0.img_mlp": (0, 0),
    "single_blocks.37.linear1": (1, 1), "single_blocks.37.linear2": (1, 1), "single_blocks.37.modulation.lin": (0, 0),
    "single_blocks.37.norm.key_norm": (0, 0), "final_layer.linear": (0, 0), "final_layer.adaLN_modulation.1": (0, 0),
    "x.double_blocks.0.img_attn.qkv": (0, 0),
}
SD3_NAMES = {  # from comfy/ldm/modules/diffusionmodules/mmdit.py
    "x_embedder.proj": (0, 0), "t_embedder.mlp.0": (0, 0), "y_embedder.mlp.2": (0, 0), "context_embedder": (0, 0),
    "joint_blocks.0.x_block.attn.qkv": (1, 1), "joint_blocks.0.x_block.attn.proj": (1, 1),
    "joint_blocks.0.x_block.attn.ln_q": (0, 0), "joint_blocks.0.x_block.attn2.qkv": (1, 1),
    "joint_blocks.0.x_block.attn2.proj": (1, 1), "joint_blocks.0.x_block.mlp.fc1": (0, 1),
    "joint_blocks.0.x_block.mlp.fc2": (0, 1), "joint_blocks.0.x_block.adaLN_modulation.1": (0, 0),
    "joint_blocks.23.context_block.attn.qkv": (1, 1), "joint_blocks.23.context_block.attn.proj": (1, 1),
    "joint_blocks.23.context_block.mlp.fc2": (0, 1), "joint_blocks.23.context_block.adaLN_modulation.1": (0, 0),
    "final_layer.linear": (0, 0), "final_layer.adaLN_modulation.1": (0, 0),
}


QWEN_IMAGE_NAMES = {  # from comfy/ldm/qwen_image/model.py
    "img_in": (0, 0), "txt_in": (0, 0), "txt_norm": (0, 0), "time_text_embed.timestep_embedder.linear_1": (0, 0),
    "transformer_blocks.0.img_mod.1": (0, 0), "transformer_blocks.0.txt_mod.1": (0, 0),
    "transformer_blocks.0.attn.to_q": (1, 1), "transformer_blocks.0.attn.to_k": (1, 1),
    "transformer_blocks.0.attn.to_v": (1, 1), "transformer_blocks.0.attn.to_out.0": (1, 1),
    "transformer_blocks.0.attn.to_out": (0, 0), "transformer_blocks.0.attn.add_q_proj": (1, 1),
    "transformer_blocks.59.attn.add_k_proj": (1, 1), "transformer_blocks.59.attn.add_v_proj": (1, 1),
    "transformer_blocks.59.attn.to_add_out": (1, 1), "transformer_blocks.0.attn.norm_q": (0, 0),
    "transformer_blocks.0.attn.norm_added_k": (0, 0), "transformer_blocks.0.img_mlp.net.0.proj": (0, 1),
    "transformer_blocks.0.img_mlp.net.2": (0, 1), "transformer_blocks.7.txt_mlp.net.0.proj": (0, 1),
    "transformer_blocks.7.txt_mlp.net.2": (0, 1), "transformer_blocks.7.txt_mlp.net.0": (0, 0),
    "transformer_blocks.0.img_norm1": (0, 0), "norm_out.linear": (0, 0), "proj_out": (0, 0),
}
Z_IMAGE_NAMES = {  # from comfy/ldm/lumina/model.py (NextDiT with z_image_modulation)
    "x_embedder": (0, 0), "t_embedder.mlp.0": (0, 0), "cap_embedder.1": (0, 0), "layers.0.attention.qkv": (1, 1),
    "layers.0.attention.out": (1, 1), "layers.0.attention.q_norm": (0, 0), "layers.29.feed_forward.w1": (0, 1),
    "layers.29.feed_forward.w2": (0, 1), "layers.29.feed_forward.w3": (0, 1), "layers.0.adaLN_modulation.0": (0, 0),
    "layers.0.attention_norm1": (0, 0), "noise_refiner.1.attention.qkv": (1, 1), "noise_refiner.0.feed_forward.w2": (0, 1),
    "noise_refiner.0.adaLN_modulation.0": (0, 0), "context_refiner.1.attention.out": (1, 1),
    "context_refiner.0.feed_forward.w3": (0, 1), "final_layer.linear": (0, 0),
    "final_layer.adaLN_modulation.1": (0, 0), "norm_final": (0, 0), "x.layers.0.attention.qkv": (0, 0),
}


@pytest.mark.parametrize(("family", "names"), [("flux1", FLUX_NAMES), ("flux1_schnell", FLUX_NAMES),
                                               ("sd3", SD3_NAMES), ("qwen_image", QWEN_IMAGE_NAMES),
                                               ("z_image", Z_IMAGE_NAMES), ("chroma", FLUX_NAMES)])
def test_dit_rules_on_names(family, names):
    attention, lora, full = (families.train_targets(family, m) for m in ("attention", "lora", "full"))
    assert {n: (int(attention(n)), int(lora(n))) for n in names} == names
    assert all(full(n) for n in names)


def test_by_context_and_describe_unet_as_before():
    """The answers the pre-table implementation gave (DiT families never match a UNet description)."""
    assert [families.by_context(d) for d in ({768}, {2048}, {1024}, {768, 2048}, {4096})] == [
        "sd15", "sdxl", "1024-d context", "768/2048-d context", "4096-d context"]
    cases = {(768, None): "SD1.x (768-d text context)", (2048, 2816): "SDXL family (2048-d text context)",
             (2048, None): "SDXL family (2048-d text context)", (1024, None): "SD2.x (1024-d text context)",
             (768, 2816): "a UNet with 768-d text context and 2816-d size/pooled conditioning",
             (4096, 2048): "a UNet with 4096-d text context and 2048-d size/pooled conditioning",
             (None, None): "a UNet with None-d text context"}
    assert {k: families.describe_unet(*k) for k in cases} == cases
