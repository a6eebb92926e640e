"""UniTune Fine-Tune / Save / Load, the Prompt Guidance Guider and UniTune Edit on Qwen-Image, Z-Image and Chroma
(issue 24), through the nodes, on the family layer (their records in families/table.py; no branch of their own).

Tiny random models (``harness.tiny_dits2``: Qwen-Image and Z-Image from their real config classes, Chroma
through the stock UNETLoader and the metadata detection shim; 64 px, a few steps): they prove plumbing,
autograd and file formats, not image quality. Oracles: the family table's rules on the real module trees, the
stock LoraLoader (every key loaded, the same samples), a copy-everything autograd oracle (gradients), stock
CFGGuider/DualCFGGuider (guidance) and the original pixels (masks) in test_guidance_dit.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import node_runs
from harness.hashing import weight_hash
from harness.images import subject_image
from harness.node_runs import at_rest_hash, fine_tune_node, gradients, result_of, sample, target_modules

log = logging.getLogger(__name__)
FAMILIES = ("qwen_image", "z_image", "chroma")
# LoRA layers of each tiny model: Qwen-Image 1 block x (8 attention + 4 MLP); Z-Image 4 blocks (2 main, 1 image
# refiner, 1 caption refiner) x (qkv, out, w1, w2, w3); Chroma as the tiny Flux (2 double x 8 + 2 single x 2).
LORA_LAYERS = {"qwen_image": 12, "z_image": 20, "chroma": 20}
CHECKPOINTED = {"qwen_image": 1, "z_image": 4, "chroma": 4}  # blocks gradient checkpointing wraps


@pytest.fixture(scope="module")
def kits(pack):
    from harness import tiny_dits2

    yield tiny_dits2.kit
    tiny_dits2.forget()


subject, folders = node_runs.unitune_fixtures()  # the 64 px subject; models/unitune, models/loras in tmp_path


# --- the family records on the real module trees -----------------------------------------------------------

def test_the_records_match_what_comfyui_builds(kits):
    """Config class, sampling (read from the model, never restated: shift 1.15 / 3 / Flux's 1.15), latent format,
    the context width the model reads, and the text encoders' tokenizer keys."""
    import comfy.latent_formats

    from frozentune import families

    shifts = {"qwen_image": 1.15, "z_image": 3.0, "chroma": 1.15}
    formats = {"qwen_image": comfy.latent_formats.Wan21, "z_image": comfy.latent_formats.Flux,
               "chroma": comfy.latent_formats.Flux}
    for family in FAMILIES:
        k = kits(family)
        record = families.family_of(k.model)
        assert record.id == family and record.known and record.arch == "dit" and record.auto_train == "lora"
        assert type(k.model.model.model_config).__name__ in record.config_classes
        base = k.model.model
        assert type(base.latent_format) is formats[family]
        assert base.latent_format.latent_channels == record.latent_channels == 16
        assert base.model_sampling.shift == pytest.approx(shifts[family])
        assert families.default_guidance(k.model) is None  # no guidance-distilled input (Chroma's is held at 0)
        if family != "qwen_image":  # Qwen-Image's tiny CLIP is a stand-in; the others' are ComfyUI's own
            assert set(k.clip.tokenize("x")) == {e.tokens for e in record.text_encoders}
    assert [e.embedding for f in FAMILIES for e in families.FAMILIES[f].text_encoders] == [False, False, True]


def test_z_image_narrower_than_3840_is_lumina2_to_comfyui_and_refused(pack):
    """The tiny Z-Image's own config, matched as a loaded file is: ComfyUI classes it Lumina2, which UniTune
    refuses by name (the reason tiny Z-Image models are built from the ZImage class directly)."""
    import comfy.model_detection

    from frozentune.unitune import finetune
    from harness import tiny_dits2

    config = comfy.model_detection.model_config_from_unet_config(dict(tiny_dits2.ZIMAGE_UNET))
    assert type(config).__name__ == "Lumina2"
    base = config.get_model({}, device=torch.device("meta"))
    with pytest.raises(ValueError, match=r"UniTune Fine-Tune does not support Lumina 2 yet \(supported: .*Qwen-Image, "
                                         r"Z-Image, Chroma\)"):
        finetune.family_of(base)


BLOCKS = {"qwen_image": ("transformer_blocks",), "z_image": ("layers", "noise_refiner", "context_refiner"),
          "chroma": ("double_blocks", "single_blocks")}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_are_the_block_linears_but_the_modulation(kits, family):
    """lora: every Linear inside a transformer block (attention and MLP projections, both streams) except the
    modulation; nothing outside the blocks (embedders, Chroma's distilled_guidance_layer, final layer). attention:
    a strict subset (the attention projections; Chroma's fused single-block layers, as Flux's)."""
    from frozentune import families

    unet = kits(family).model.model.diffusion_model
    loras = target_modules(kits(family), "lora")
    in_blocks = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[0] in BLOCKS[family]}
    assert loras == {n for n in in_blocks if "mod" not in n} and len(loras) == LORA_LAYERS[family]
    assert all(hasattr(dict(unet.named_modules())[n], "weight_function") for n in loras)
    attention = {n for n, _ in unet.named_modules() if families.train_targets(family, "attention")(n)}
    assert attention < loras
    assert {n for n in attention if not ("attn" in n or "attention" in n or "linear" in n)} == set()
    assert {n for n in loras - attention if not ("mlp" in n or "feed_forward" in n)} == set()


# The real models as their files are laid out (ComfyUI's own keys and shapes), for the stock detection path:
# (config class, unet_config to build, LoRA layers at that depth).
REAL = {
    "qwen_image": ("QwenImage", {"image_model": "qwen_image"}, 60 * 12),
    "z_image": ("ZImage", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840,
                           "cap_feat_dim": 2560, "n_layers": 30, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30,
                           "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                           "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
                           "pad_tokens_multiple": 32}, (30 + 2 + 2) * 5),
    "chroma": ("Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096,
                          "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
                          "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
                          "qkv_bias": True, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5},
               19 * 8 + 38 * 2),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("one_block", [False, True], ids=["full-size", "one-block"])
def test_stock_detection_of_real_width_models_gives_the_family(kits, family, one_block):
    """Keys and shapes of the real model (on the meta device: nothing allocated), read by ComfyUI's own detection
    (no shim): the config class, the family, and the LoRA layers the rule picks at that depth (the tiny models
    skip this path). One block is the size of the issue's real-width test models (Qwen-Image about 380M
    parameters, Z-Image 909M, Chroma 631M)."""
    import comfy.model_detection
    import comfy.supported_models

    from frozentune import families
    from harness import tiny_dits

    config_class, unet, loras = REAL[family]
    if one_block:
        depth = {"qwen_image": {"num_layers": 1}, "z_image": {"n_layers": 1},
                 "chroma": {"depth": 1, "depth_single_blocks": 1}}[family]
        unet = {**unet, **depth}
        loras = {"qwen_image": 12, "z_image": 5 * 5, "chroma": 10}[family]

    built = getattr(comfy.supported_models, config_class)(dict(unet)).get_model({}, device=torch.device("meta"))
    sd = built.diffusion_model.state_dict()
    with tiny_dits.without_detection_shim():
        detected = comfy.model_detection.detect_unet_config(sd, "")
    config = comfy.model_detection.model_config_from_unet_config(detected, sd)
    assert type(config).__name__ == config_class
    base = config.get_model({}, device=torch.device("meta"))
    assert families.family_of(base).id == family
    assert {k: tuple(v.shape) for k, v in base.diffusion_model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in sd.items()}
    rule = families.train_targets(family, "lora")
    assert len([n for n, _ in base.diffusion_model.named_modules() if rule(n)]) == loras
    params = sum(v.numel() for v in sd.values())
    log.info("%s %s: %.1fM parameters, %d LoRA layers", family, "one block" if one_block else "full size",
             params / 1e6, loras)
    if one_block:
        assert params == pytest.approx({"qwen_image": 380e6, "z_image": 909e6, "chroma": 631e6}[family], rel=0.02)


# --- training and the stock round trip -----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_auto_is_lora_on_the_family_targets_and_the_base_is_untouched(kits, family, subject):
    result, _ = node_runs.checked_auto_lora(kits(family), family, subject)
    assert "unitune.guidance" not in result.metadata  # no guidance input trained at (Chroma's stays 0)


@pytest.mark.parametrize(("family", "mode"), [("qwen_image", "lora"), ("z_image", "lora"), ("chroma", "lora"),
                                              ("z_image", "full"), ("qwen_image", "attention")])
def test_saved_file_loads_in_the_stock_lora_loader_with_every_key_and_the_same_samples(
        kits, family, mode, subject, folders, caplog):
    """LoRA factors, or ``.diff`` deltas (full: Z-Image's pad tokens and RMSNorm scales as ``<parameter>.diff``)."""
    k = kits(family)
    before = at_rest_hash(k.model)
    tuned = fine_tune_node(k, subject, train=mode, learning_rate=1e-3 if mode == "lora" else 1e-4)[0]
    with caplog.at_level(logging.WARNING):
        tensors, metadata, stock, reloaded = node_runs.save_and_load_back(k, tuned, family, folders)
        tuned_out, stock_out, reloaded_out = sample(k, tuned), sample(k, stock), sample(k, reloaded)
    assert metadata["unitune.family"] == family and all(key.startswith("diffusion_model.") for key in tensors)
    assert "lora key not loaded" not in caplog.text and "NOT MERGED" not in caplog.text, caplog.text
    expected = LORA_LAYERS[family] if mode == "lora" else len(tensors)
    assert len(stock.patches) == expected and len(reloaded.patches) == expected
    assert not torch.allclose(tuned_out, sample(k, k.model), atol=1e-5), "training changed nothing"
    assert torch.allclose(stock_out, tuned_out, atol=1e-5), (stock_out - tuned_out).abs().max()
    assert torch.allclose(reloaded_out, tuned_out, atol=1e-5)
    assert at_rest_hash(k.model) == before


def test_load_refuses_a_file_of_another_of_these_families_naming_both(kits, subject, folders):
    from frozentune.nodes.unitune_nodes import UniTuneLoad, UniTuneSave

    UniTuneSave.execute(model=fine_tune_node(kits("chroma"), subject, steps=1)[0], filename="unitune/for_chroma")
    for other, label in (("z_image", "Z-Image"), ("qwen_image", "Qwen-Image")):
        with pytest.raises(ValueError, match=rf"made for Chroma, and this MODEL is {label}"):
            UniTuneLoad.execute(model=kits(other).model, unitune_name="for_chroma.safetensors", strength=1.0)


def test_z_image_trains_with_its_plain_int_input(kits, subject):
    """Z-Image's extra inputs include ``num_tokens``, a plain int (``CONDConstant``): it reaches the model as it is,
    next to the detached tensor inputs, and a full-mode step trains."""
    from frozentune.training.conditioning import training_conds

    k = kits("z_image")
    base = k.model.model
    latent = base.latent_format.process_in(k.vae.encode(subject))
    conds = training_conds(base, k.encode("beikkpic"), latent, torch.device("cpu"))
    assert type(conds["num_tokens"]) is int and conds["num_tokens"] > 0
    assert all(not v.requires_grad for v in conds.values() if isinstance(v, torch.Tensor))
    tuned = fine_tune_node(k, subject, steps=1, train="full", learning_rate=1e-4)[0]
    assert all(torch.isfinite(torch.tensor(result_of(tuned).losses)))


# --- gradients: the in-place trap ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_the_oracle_with_and_without_checkpointing(kits, family, subject):
    """Chroma runs Flux's in-place blocks (``img += ...``; its ``apply_mod`` is called without
    ``modulation_dims``, so the ``*=`` branch never runs): the Flux protection covers it. Qwen-Image and Z-Image
    add out of place. Every family: the gradients equal the copy-everything oracle, also checkpointed."""
    from frozentune.training import checkpointing, precision

    k = kits(family)
    twin = precision.frozen_twin(k.model.model)
    assert (checkpointing.protect_inplace_blocks(twin.diffusion_model) > 0) == (family == "chroma")
    loss, reference, _ = gradients(k, subject, checkpoint=False, oracle=True)
    targets = {f"{n}.weight" for n in target_modules(k, "lora")}
    # Qwen-Image's last block returns a text stream nothing reads: its to_add_out and txt_mlp get no gradient
    # (so a LoRA there stays zero; harmless, as in every Qwen-Image LoRA that covers all blocks).
    last = f"transformer_blocks.{len(getattr(k.model.model.diffusion_model, 'transformer_blocks', [])) - 1}."
    dead = {n for n in targets if family == "qwen_image" and n.startswith(last) and ("to_add_out" in n or "txt_" in n)}
    assert targets - reference.keys() == dead and len(dead) == (3 if family == "qwen_image" else 0)
    for checkpoint in (False, True):
        value, grads, blocks = gradients(k, subject, checkpoint)
        assert blocks == (CHECKPOINTED[family] if checkpoint else 0)
        assert value == pytest.approx(loss, rel=1e-6)
        assert grads.keys() == reference.keys()
        for name, g in reference.items():
            assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-7), (checkpoint, name)


def test_chroma_without_the_protection_fails_as_flux_does(kits, subject, monkeypatch):
    """The protection is what makes Chroma's gradients right: without it backward stops, or (checkpointed)
    gives wrong gradients silently."""
    from frozentune.training import precision

    k = kits("chroma")
    _, reference, _ = gradients(k, subject, checkpoint=False, oracle=True)
    monkeypatch.setattr(precision, "protect_inplace_blocks", lambda module: 0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        gradients(k, subject, checkpoint=False)
    _, grads, _ = gradients(k, subject, checkpoint=True)
    assert [n for n, g in reference.items() if not torch.allclose(grads[n], g, rtol=1e-4, atol=1e-7)]


# --- Prompt Guidance Guider and UniTune Edit: test_guidance_dit.py (every DiT family, fp32 and bf16) -----------

def test_guider_gives_the_baseline_the_positives_reference_latents_on_qwen_image_edit(kits):
    """Qwen-Image Edit reads the image to edit from each conditioning's ``reference_latents`` (ReferenceLatent,
    TextEncodeQwenImageEdit). A baseline without them gets the positive's, so the pg term compares prompts about
    the same image; oracle: stock DualCFGGuider with the baseline given the reference by the stock node."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import DualCFGGuider
    from comfy_extras.nodes_edit_model import ReferenceLatent

    from harness.guiders import ours

    k = kits("qwen_image")
    gen = torch.Generator().manual_seed(7)
    image = {"samples": torch.randn(1, 16, 1, 8, 8, generator=gen)}
    p = {"positive": ReferenceLatent.execute(k.encode("beikkpic a minion"), image).args[0],
         "baseline": k.encode("beikkpic"), "negative": ReferenceLatent.execute(k.encode(""), image).args[0]}
    seen = []
    model = k.model.clone()

    def wrapper(apply_model, args):
        seen.append((tuple(args["cond_or_uncond"]), "ref_latents" in args["c"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)

    def run(guider, m):
        latent = k.empty_latent()["samples"]
        sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 2).cpu()
        return guider.sample(comfy.sample.prepare_noise(latent, 3), latent, comfy.samplers.sampler_object("euler"),
                             sigmas, disable_pbar=True, seed=3)

    got = run(ours(model, p, 4.0, 2.0), model)
    assert all(ref for _, ref in seen) and sorted(c for chunks, _ in seen for c in chunks) == [0, 0, 1, 1, 2, 2]
    assert len(seen) == 2  # one batched call per step: the three conditionings now concatenate
    assert "reference_latents" not in p["baseline"][0][1]  # the input is not changed
    explicit = ReferenceLatent.execute(p["baseline"], image).args[0]
    dual = DualCFGGuider.execute(k.model, p["positive"], explicit, p["negative"], cfg_conds=6.0,
                                 cfg_cond2_negative=4.0, style="regular").args[0]
    expected = run(dual, k.model)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    without = DualCFGGuider.execute(k.model, p["positive"], p["baseline"], p["negative"], cfg_conds=6.0,
                                    cfg_cond2_negative=4.0, style="regular").args[0]
    assert (got - run(without, k.model)).abs().max() > 1e-3  # the reference matters to the model


# --- precision ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype_name", ["bf16", "fp8"])
def test_half_and_fp8_bases_train_a_lora_with_fp32_state(kits, family, dtype_name, subject, monkeypatch):
    """bf16 computing natively, or fp8 weight storage (cast for compute): the LoRA and its optimizer state are
    fp32, the frozen weights are the base's own memory in its load dtype, the base is unchanged, the tuned MODEL
    samples finite and differs from the base, and its file loads in the stock LoraLoader with every key."""
    import comfy.lora

    k = kits(family, dtype_name, fresh=True)
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[dtype_name]
    assert k.model.model.get_dtype() == dtype
    assert k.model.model.manual_cast_dtype == (torch.float32 if dtype_name == "fp8" else None)
    before = at_rest_hash(k.model)
    base_ptrs = {n: p.data_ptr() for n, p in k.model.model.diffusion_model.named_parameters()}
    seen = node_runs.training_spies(monkeypatch)
    tuned = fine_tune_node(k, subject, steps=3, precision="bf16" if dtype_name == "bf16" else "auto")[0]
    result = result_of(tuned)
    assert result.settings.mode == "lora"
    assert result.metadata["unitune.compute_dtype"] == ("bfloat16" if dtype_name == "bf16" else "float32")
    unet = seen["twin"].diffusion_model
    loras = node_runs.lora_layers(unet)
    trainable = [p for f in loras for p in f.parameters()]
    assert len(loras) == LORA_LAYERS[family] and {p.dtype for p in trainable} == {torch.float32}
    state = node_runs.optimizer_state(seen["opt"])
    assert state and {t.dtype for t in state} == {torch.float32}
    frozen = dict(unet.named_parameters())
    assert all(p.data_ptr() == base_ptrs[n] and p.dtype == dtype and not p.requires_grad for n, p in frozen.items())
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert at_rest_hash(k.model) == before
    with torch.inference_mode():  # as ComfyUI's executor runs nodes (fp8 patching rounds with out= ops)
        out, base_out = sample(k, tuned), sample(k, k.model)
    assert torch.isfinite(out).all() and not torch.equal(out, base_out)
    key_map = comfy.lora.model_lora_keys_unet(k.model.model, {})
    assert len(comfy.lora.load_lora(result.tensors, key_map, log_missing=True)) == LORA_LAYERS[family]


# --- textual inversion: Chroma by data (Qwen-Image, Z-Image: test_textual_inversion_qwen_zimage.py) -----------

def test_textual_inversion_trains_a_t5_word_on_chroma(kits, embeddings_dir):
    """Chroma's record (T5 alone, key t5xxl) is all textual inversion needs: the file holds ``t5xxl`` vectors the
    stock CLIPTextEncode reads through ``embedding:``, and the input CLIP is unchanged."""
    import nodes
    import safetensors.torch

    from frozentune.nodes.textual_inversion_nodes import TextualInversionTrain
    from harness import tiny_dits

    k = kits("chroma")
    clip = tiny_dits.load_clip("chroma", [str(embeddings_dir)])
    before = weight_hash(clip.cond_stage_model)
    args = dict(init_text="object", vectors=2, captions="object templates", steps=2, batch_size=1,
                learning_rate=5e-2, seed=0, precision="fp32")
    word = TextualInversionTrain.execute(model=k.model, clip=clip, vae=k.vae, image=subject_image(64),
                                         name="chromaword", **args).args[0]
    assert word == "embedding:chromaword" and weight_hash(clip.cond_stage_model) == before
    vectors = safetensors.torch.load_file(str(embeddings_dir / "chromaword.safetensors"))
    assert set(vectors) == {"t5xxl"} and vectors["t5xxl"].shape == (2, 64)
    learned = nodes.CLIPTextEncode().encode(clip, "a photo of embedding:chromaword")[0][0][0]
    plain = nodes.CLIPTextEncode().encode(clip, "a photo of chromaword")[0][0][0]
    assert learned.shape[1] == 7 and not torch.equal(learned[:, :4], plain[:, :4])  # 2 vectors + "a photo of" + end


def test_pivotal_tuning_on_chroma(kits, embeddings_dir, subject):
    """UniTune's pivotal tuning (a T5 word first, then the LoRA with the word in the caption) on Chroma (Qwen-Image
    and Z-Image: test_textual_inversion_qwen_zimage.py)."""
    from harness import tiny_dits

    k = kits("chroma")
    clip = tiny_dits.load_clip("chroma", [str(embeddings_dir)])
    tuned, _, _, word, _ = _pivotal(k, clip, subject)
    result = result_of(tuned)
    assert word == "embedding:beikkpic" and set(result.word.vectors) == {"t5xxl"}
    assert result.settings.caption == "embedding:beikkpic" and all(torch.isfinite(torch.tensor(result.losses)))


def _pivotal(k, clip, subject):
    from frozentune.nodes.unitune_nodes import UniTuneFineTune

    return UniTuneFineTune.execute(model=k.model, clip=clip, vae=k.vae, image=subject, token="beikkpic", class_word="",
                                   steps=2, batch_size=1, learning_rate=1e-3, optimizer="adamw", train="auto",
                                   lora_rank=4, gradient_checkpointing=False, seed=0, pivotal_steps=2).args
