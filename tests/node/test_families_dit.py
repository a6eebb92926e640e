"""The family layer on ComfyUI's real diffusion models, built on the meta device from their configs.

``family_of`` names SD1.5, the SDXL family, Flux.1 dev/schnell and SD3 and gives a readable name to
the rest; each family's UniTune train targets select exactly the intended layers of the real module
trees (tiny and full-size Flux and SD3.5 configs); for SD1.5/SDXL they select what unitune/finetune.py
selected before the family table, so switching the trainer to the table changes nothing there.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

META = torch.device("meta")

FLUX_TINY = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
             "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
             "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}
# Flux.1 dev as comfy.model_detection reads it from the real file (12B parameters; nothing is allocated on meta)
FLUX_DEV = dict(FLUX_TINY, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24, depth=19,
                depth_single_blocks=38, axes_dim=[16, 56, 56])


def sd3_config(depth: int, context: int, **extra) -> dict:
    return {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
            "adm_in_channels": 2048, "num_patches": 36864, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": context}}, **extra}


SD3_TINY = sd3_config(2, 128, qk_norm="rms", x_block_self_attn_layers=[0], num_patches=1024, pos_embed_max_size=32)
SD35_LARGE = sd3_config(38, 2432, qk_norm="rms")
SD35_MEDIUM = sd3_config(24, 1536, qk_norm="rms", x_block_self_attn_layers=list(range(13)))
SD3_MEDIUM = sd3_config(24, 1536)

UNET_COMMON = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                   use_temporal_attention=False, use_temporal_resblock=False, adm_in_channels=None)
SD15_CONFIG = dict(UNET_COMMON, model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2, 2],
                   channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                   context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False)
SDXL_CONFIG = dict(UNET_COMMON, model_channels=320, in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2],
                   channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                   transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                   context_dim=2048, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True,
                   adm_in_channels=2816, num_classes="sequential")


def build(config_class: str, unet_config: dict):
    """The real ``comfy.model_base`` model of a ``comfy.supported_models`` class, on the meta device."""
    import comfy.supported_models

    return getattr(comfy.supported_models, config_class)(dict(unet_config)).get_model({}, device=META)


def detected(unet_config: dict):
    """The model ComfyUI's config matching (as when a checkpoint loads) builds for a UNet config, on meta."""
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    assert config is not None, "no ComfyUI config matches"
    return config.get_model({}, device=META)


def patcher(base):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def legacy_model_family(model) -> str:
    """``families.model_family`` before the family table (28daab5), for comparison."""
    import comfy.model_base

    if isinstance(model, comfy.model_base.SDXL):
        return "sdxl"
    name = type(model.model_config).__name__.lower()
    return "sd15" if name in ("sd15", "sd15_instructpix2pix") else name


def legacy_is_attention(name: str) -> bool:
    return any(part in f".{name}." for part in (".attn1.", ".attn2."))


def legacy_selection(unet, mode: str) -> tuple[set[str], set[str]]:
    """(LoRA module names, trained parameter names) as unitune/finetune.py ``_trainable`` chose them at 28daab5."""
    loras, params = set(), set()
    for name, module in unet.named_modules():
        if mode == "lora":
            if (legacy_is_attention(name) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
                    and hasattr(module, "weight_function")):
                loras.add(name)
        elif mode == "full" or legacy_is_attention(name):
            params |= {f"{name}.{leaf}" if name else leaf for leaf, p in module._parameters.items() if p is not None}
    return loras, params


def selection(unet, family, mode: str) -> tuple[set[str], set[str]]:
    """(LoRA module names, trained parameter names) by the family table's rule."""
    from frozentune import families

    rule = families.train_targets(family, mode)
    loras, params = set(), set()
    for name, module in unet.named_modules():
        if not rule(name):
            continue
        if mode == "lora":
            loras.add(name)
        else:
            params |= {f"{name}.{leaf}" if name else leaf for leaf, p in module._parameters.items() if p is not None}
    return loras, params


@pytest.mark.parametrize(("config_class", "config", "family"), [
    ("SD15", SD15_CONFIG, "sd15"), ("SD15_instructpix2pix", dict(SD15_CONFIG, in_channels=8), "sd15"),
    ("SDXL", SDXL_CONFIG, "sdxl"), ("SSD1B", SDXL_CONFIG, "sdxl"), ("Segmind_Vega", SDXL_CONFIG, "sdxl"),
    ("KOALA_700M", SDXL_CONFIG, "sdxl"), ("KOALA_1B", SDXL_CONFIG, "sdxl"),
    ("SDXL_instructpix2pix", dict(SDXL_CONFIG, in_channels=8), "sdxl"),
    ("Flux", FLUX_TINY, "flux1"), ("Flux", FLUX_DEV, "flux1"),
    ("FluxSchnell", dict(FLUX_TINY, guidance_embed=False), "flux1_schnell"),
    ("SD3", SD3_TINY, "sd3"), ("SD3", SD35_LARGE, "sd3"), ("SD3", SD35_MEDIUM, "sd3"), ("SD3", SD3_MEDIUM, "sd3"),
])
def test_family_of_the_supported_families(pack, config_class, config, family):
    from frozentune import families

    base = build(config_class, config)
    assert families.family_of(base).id == families.family_of(patcher(base)).id == family
    assert families.require(patcher(base), "UniTune Fine-Tune", tuple(families.FAMILIES)).id == family
    if family in ("sd15", "sdxl"):
        assert families.model_family(base) == legacy_model_family(base)


def test_a_custom_sdxl_config_is_the_sdxl_family(pack):
    """A config class of another pack whose model is a model_base.SDXL counts as SDXL, as it did before the table."""
    import comfy.supported_models

    from frozentune import families

    class PackSDXL(comfy.supported_models.SDXL):
        pass

    base = PackSDXL(dict(SDXL_CONFIG)).get_model({}, device=META)
    assert families.family_of(patcher(base)).id == legacy_model_family(base) == "sdxl"


def test_config_matching_picks_the_classes_the_table_lists(pack, comfy_root):
    """The real configs and the tiny test checkpoints' configs as ComfyUI's matching classifies them."""
    from frozentune import families
    from harness import tiny_models

    for config, family in ((SD15_CONFIG, "sd15"), (SDXL_CONFIG, "sdxl")):
        base = detected(config)
        assert type(base.model_config).__name__ in families.FAMILIES[family].config_classes
        assert families.model_family(base) == family
    for recipe in tiny_models.RECIPES.values():
        base = detected(dict(UNET_COMMON, **recipe.unet))
        assert type(base.model_config).__name__ == recipe.expected_config
        assert families.model_family(base) == legacy_model_family(base) == recipe.family.removesuffix("_blocks")


@pytest.mark.parametrize(("config_class", "config", "label"), [
    ("Lumina2", {"image_model": "lumina2"}, "Lumina 2"),
    ("FluxInpaint", dict(FLUX_TINY, in_channels=96), "Flux.1 Fill"), ("SDXLRefiner", SDXL_CONFIG, "SDXL Refiner"),
    ("SD20", dict(SD15_CONFIG, context_dim=1024), "SD2.x"),
])
def test_other_families_get_a_readable_name_and_are_refused(pack, config_class, config, label):
    from frozentune import families

    base = build(config_class, config)
    family = families.family_of(patcher(base))
    assert (family.label, family.known) == (label, False)
    assert families.model_family(base) == legacy_model_family(base) == config_class.lower()
    with pytest.raises(ValueError, match=rf"^UniTune Fine-Tune does not support {label} yet \(supported: SD1\.x, "
                                         r"SDXL family, Flux\.1 dev, Flux\.1 schnell, SD3/SD3\.5, Qwen-Image, "
                                         r"Z-Image, Chroma\)"):
        families.require(patcher(base), "UniTune Fine-Tune", tuple(families.FAMILIES))


def test_default_guidance_is_read_from_the_model(pack):
    from frozentune import families

    assert families.default_guidance(patcher(build("Flux", FLUX_TINY))) == 3.5  # model_base.Flux.extra_conds
    for config_class, config in (("FluxSchnell", dict(FLUX_TINY, guidance_embed=False)), ("SD3", SD3_TINY),
                                 ("SD15", SD15_CONFIG)):
        assert families.default_guidance(build(config_class, config)) is None


# --- train targets on the real DiT trees ---------------------------------------------------------------------

FROZEN_PARTS = ("_mod.", "modulation", "embedder", "final_layer", "norm", "ln_q", "ln_k")  # never a LoRA target
FROZEN_TOP = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in")


def check_lora_layers(unet, family, expected: set[str], per_block: dict[str, int]) -> None:
    """The ``lora`` rule picks exactly ``expected``: comfy.ops Linear layers, none of the frozen kinds."""
    loras, _ = selection(unet, family, "lora")
    assert loras == expected, (sorted(loras - expected)[:5], sorted(expected - loras)[:5])
    modules = dict(unet.named_modules())
    for name in loras:
        assert isinstance(modules[name], torch.nn.Linear) and hasattr(modules[name], "weight_function"), name
        assert not any(part in name for part in FROZEN_PARTS) and not name.startswith(FROZEN_TOP), name
    counts = Counter(".".join(name.split(".")[:2]) for name in loras)  # layers per block, where that is fixed
    assert {k: v for k, v in counts.items() if per_block.get(k.split(".")[0], v) != v} == {}


def check_attention_within_lora(unet, family) -> None:
    """``attention`` trains a subset of the LoRA layers (their weights and biases); ``full`` every parameter."""
    loras, _ = selection(unet, family, "lora")
    _, attention = selection(unet, family, "attention")
    assert attention and {p.rsplit(".", 1)[0] for p in attention} < loras
    assert {p.rsplit(".", 1)[1] for p in attention} <= {"weight", "bias"}
    assert selection(unet, family, "full")[1] == {n for n, _ in unet.named_parameters()}


def flux_expected(unet, mode: str) -> set[str]:
    double = ("attn.qkv", "attn.proj") + (("mlp.0", "mlp.2") if mode == "lora" else ())
    names = {f"double_blocks.{i}.{s}_{p}" for i in range(len(unet.double_blocks)) for s in ("img", "txt")
             for p in double}
    return names | {f"single_blocks.{i}.linear{j}" for i in range(len(unet.single_blocks)) for j in (1, 2)}


@pytest.mark.parametrize(("family", "config", "layers"), [
    ("flux1", FLUX_TINY, (20, 12)), ("flux1", FLUX_DEV, (228, 152)),
    ("flux1_schnell", dict(FLUX_TINY, guidance_embed=False), (20, 12)),
], ids=["flux1-tiny", "flux1-dev", "flux1_schnell-tiny"])
def test_flux_targets(pack, family, config, layers):
    from frozentune import families

    fam = families.FAMILIES[family]
    unet = build(fam.config_classes[0], config).diffusion_model
    check_lora_layers(unet, fam, flux_expected(unet, "lora"), {"double_blocks": 8, "single_blocks": 2})
    loras, attention = selection(unet, fam, "lora")[0], selection(unet, fam, "attention")[1]
    assert (len(loras), len({p.rsplit(".", 1)[0] for p in attention})) == layers
    assert {p.rsplit(".", 1)[0] for p in attention} == flux_expected(unet, "attention")
    check_attention_within_lora(unet, fam)


def sd3_expected(unet, mode: str) -> set[str]:
    """From the block structure: the pre_only last context block has attn.qkv only; attn2 where configured."""
    names = set()
    for i, block in enumerate(unet.joint_blocks):
        for side in ("x_block", "context_block"):
            sub = getattr(block, side)
            for attn in ("attn", "attn2"):
                if hasattr(sub, attn):
                    names |= {f"joint_blocks.{i}.{side}.{attn}.{p}" for p in ("qkv", "proj")
                              if hasattr(getattr(sub, attn), p)}
            if mode == "lora" and hasattr(sub, "mlp"):
                names |= {f"joint_blocks.{i}.{side}.mlp.fc1", f"joint_blocks.{i}.{side}.mlp.fc2"}
    return names


@pytest.mark.parametrize(("config", "layers"), [
    (SD3_TINY, (15, 9)), (SD35_LARGE, (301, 151)), (SD35_MEDIUM, (215, 121)), (SD3_MEDIUM, (189, 95)),
], ids=["tiny", "sd3.5-large", "sd3.5-medium", "sd3-medium"])
def test_sd3_targets(pack, config, layers):
    from frozentune import families

    fam = families.FAMILIES["sd3"]
    unet = build("SD3", config).diffusion_model
    expected = sd3_expected(unet, "lora")
    per_block = Counter(".".join(n.split(".")[:2]) for n in expected)
    check_lora_layers(unet, fam, expected, {})  # layers per block vary (pre_only, attn2): compared below
    assert Counter(".".join(n.split(".")[:2]) for n in selection(unet, fam, "lora")[0]) == per_block
    attention = {p.rsplit(".", 1)[0] for p in selection(unet, fam, "attention")[1]}
    assert attention == sd3_expected(unet, "attention")
    assert (len(selection(unet, fam, "lora")[0]), len(attention)) == layers
    check_attention_within_lora(unet, fam)


@pytest.mark.parametrize(("family", "config_class", "config"), [
    ("flux1", "Flux", FLUX_TINY), ("sd3", "SD3", SD3_TINY),
])
@pytest.mark.parametrize("broken", ["modulation in lora", "a projection left out", "attention beyond lora"])
def test_the_checks_catch_a_broken_rule(pack, family, config_class, config, broken):
    """The checks above fail for a rule with one mistake (they would not pass a wrong table)."""
    from frozentune import families

    fam = families.FAMILIES[family]
    t = fam.targets
    if broken == "modulation in lora":
        targets = dataclasses.replace(t, lora=t.lora + r"|.*(_mod\.lin|modulation\.lin|adaLN_modulation\.1)")
    elif broken == "a projection left out":
        targets = dataclasses.replace(t, lora=t.lora.replace("proj", "nothing"))
    else:
        targets = dataclasses.replace(t, attention=t.attention + r"|.*\.norm\..*|.*\.ln_q")
    wrong = dataclasses.replace(fam, targets=targets)
    unet = build(config_class, config).diffusion_model
    expected = flux_expected(unet, "lora") if family == "flux1" else sd3_expected(unet, "lora")
    with pytest.raises(AssertionError):
        check_lora_layers(unet, wrong, expected, {"double_blocks": 8, "single_blocks": 2})
        check_attention_within_lora(unet, wrong)


# --- SD1.5 / SDXL: the table's rules select what unitune/finetune.py selected ---------------------------------

@pytest.mark.parametrize(("config", "family", "loras"), [(SD15_CONFIG, "sd15", 128), (SDXL_CONFIG, "sdxl", 560)])
@pytest.mark.parametrize("mode", ["lora", "attention", "full"])
def test_unet_targets_are_what_finetune_selected(pack, config, family, loras, mode):
    base = detected(config)
    unet = base.diffusion_model
    from frozentune import families

    fam = families.family_of(base)
    assert fam.id == family
    assert selection(unet, fam, mode) == legacy_selection(unet, mode)
    if mode == "lora":
        assert len(selection(unet, fam, mode)[0]) == loras  # 4 projections x (attn1 + attn2) per transformer block
