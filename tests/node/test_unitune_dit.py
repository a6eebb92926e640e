"""UniTune Fine-Tune / Save / Load on the flow-matching DiTs (Flux.1 dev, Flux.1 schnell, SD3), through the nodes.

Tiny random models (``harness.tiny_dits``, 64 px, a few steps): they prove plumbing, autograd and file formats,
not image quality. The timestep draws and the flow target are in test_unitune_dit_objective.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import node_runs
from harness.node_runs import at_rest_hash, fine_tune_node, gradients, result_of, sample

log = logging.getLogger(__name__)
DITS = ["flux1", "sd3"]


subject, folders = node_runs.unitune_fixtures()  # the 64 px subject; models/unitune, models/loras in tmp_path


# --- training --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["flux1", "sd3", "flux1_schnell"])
def test_auto_is_lora_on_the_family_targets_and_the_base_is_untouched(family, tiny_dit, subject):
    """train = auto on a DiT: a LoRA on each attention/MLP projection of every block (the family table), nothing
    else; the weights move, the base's weights do not, the preview renders the 16-channel latent."""
    _, modules = node_runs.checked_auto_lora(tiny_dit(family), family, subject)
    assert len(modules) == {"flux1": 20, "flux1_schnell": 20, "sd3": 15}[family]


@pytest.mark.parametrize("mode", ["full", "attention"])
@pytest.mark.parametrize("family", DITS)
def test_full_and_attention_train_the_family_targets(family, mode, tiny_dit, subject):
    from frozentune import families

    dit = tiny_dit(family)
    before = at_rest_hash(dit.model)
    tuned = fine_tune_node(dit, subject, train=mode, learning_rate=1e-4)[0]
    result = result_of(tuned)
    rule = families.train_targets(family, mode)
    expected = {n for n, _ in dit.model.model.diffusion_model.named_parameters() if rule(n.rpartition(".")[0])}
    from frozentune.unitune.finetune import delta_key

    assert set(result.tensors) == {delta_key(n) for n in expected}
    assert sum(int((t != 0).sum()) for t in result.tensors.values()) > 0.5 * sum(t.numel() for t in
                                                                                result.tensors.values())
    assert at_rest_hash(dit.model) == before


def test_trainable_selects_the_same_layers_as_before_on_sd(tiny_checkpoints, pack):
    """SD1.5/SDXL: the family table's rules pick exactly the modules and parameters the old code picked."""
    from frozentune.training import precision
    from frozentune.unitune import finetune
    from harness import half_tier

    def legacy(unet, mode):  # unitune/finetune.py _trainable at 28daab5
        attention = lambda n: any(p in f".{n}." for p in (".attn1.", ".attn2."))  # noqa: E731
        if mode == "lora":
            return {n for n, m in unet.named_modules() if attention(n) and n.endswith(
                ("to_q", "to_k", "to_v", "to_out.0")) and hasattr(m, "weight_function")}
        return {n for n, _ in unet.named_parameters() if mode == "full" or attention(n.rpartition(".")[0])}

    for family in ("sd15", "sdxl"):
        model = half_tier.unet(tiny_checkpoints[family], "fp32")
        for mode in ("full", "attention", "lora"):
            twin = precision.frozen_twin(model.model).diffusion_model
            settings = finetune.FineTuneSettings(mode=mode, lora_rank=2)
            params, loras = finetune._trainable(twin, settings, torch.Generator().manual_seed(0),
                                                finetune.family_of(model))
            chosen = set(loras) if mode == "lora" else {n for n, p in twin.named_parameters() if p.requires_grad}
            assert chosen == legacy(twin, mode), (family, mode)
            assert len(params) == (2 * len(loras) if mode == "lora" else len(chosen))
        assert finetune.auto_mode(finetune.family_of(model)) == {"sd15": "full", "sdxl": "lora"}[family]


def test_a_family_unitune_does_not_know_is_refused_naming_it_and_the_supported_ones(subject):
    """Lumina 2 (a tiny Z-Image-shaped model, which ComfyUI classes Lumina2 below width 3840): refused before any
    work, not "nothing to train"."""
    import comfy.model_detection
    import comfy.model_patcher

    from frozentune.nodes.unitune_nodes import UniTuneFineTune
    from harness import tiny_dits2, tiny_qwen

    base = comfy.model_detection.model_config_from_unet_config(dict(tiny_dits2.ZIMAGE_UNET)).get_model({})
    lumina2 = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"UniTune Fine-Tune does not support Lumina 2 yet \(supported: SD1\.x, "
                                         r"SDXL family, Flux\.1 dev, Flux\.1 schnell, SD3/SD3\.5, Qwen-Image, "
                                         r"Z-Image, Chroma\)"):
        UniTuneFineTune.execute(model=lumina2, clip=tiny_qwen.PromptClip(), vae=tiny_qwen.vae(),
                                image=subject, token="beikkpic", class_word="", steps=1, batch_size=1,
                                learning_rate=1e-3, optimizer="adamw", train="auto", lora_rank=4,
                                gradient_checkpointing=False, seed=0)


# --- files -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "mode"), [("flux1", "lora"), ("sd3", "lora"), ("flux1", "full"),
                                              ("sd3", "attention")])
def test_saved_file_loads_in_the_stock_lora_loader_with_every_key_and_the_same_samples(
        family, mode, tiny_dit, subject, folders, caplog):
    """Save writes generic ``diffusion_model.<comfy key>`` LoRA factors or ``.diff`` deltas; the stock LoraLoader
    (LoraLoaderModelOnly -> comfy.sd.load_lora_for_models) loads every key on Flux and SD3, and samples as the
    tuned MODEL does; UniTune Load too."""
    import nodes

    from frozentune.nodes.unitune_nodes import UniTuneSave

    dit = tiny_dit(family)
    before = at_rest_hash(dit.model)
    tuned = fine_tune_node(dit, subject, train=mode)[0]
    with caplog.at_level(logging.WARNING):
        tensors, metadata, stock, reloaded = node_runs.save_and_load_back(dit, tuned, f"{family}_{mode}", folders)
        tuned_out, stock_out, reloaded_out = sample(dit, tuned), sample(dit, stock), sample(dit, reloaded)
    assert metadata["unitune.family"] == family and all(k.startswith("diffusion_model.") for k in tensors)
    assert "lora key not loaded" not in caplog.text and "NOT MERGED" not in caplog.text, caplog.text
    assert len(stock.patches) == len({k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in tensors}
                                     if mode == "lora" else tensors)
    assert not torch.allclose(tuned_out, sample(dit, dit.model), atol=1e-5), "training changed nothing"
    assert torch.allclose(stock_out, tuned_out, atol=1e-5), (stock_out - tuned_out).abs().max()
    assert torch.allclose(reloaded_out, tuned_out, atol=1e-5)
    if mode == "full":  # save as LoRA: full-rank SVD factors (QK-norm scale deltas kept exact) load the same way
        UniTuneSave.execute(model=tuned, filename="loras/as_lora", save_as="lora", lora_rank=4096)
        with caplog.at_level(logging.WARNING):
            as_lora = nodes.LoraLoaderModelOnly().load_lora_model_only(dit.model, "as_lora.safetensors", 1.0)[0]
            assert torch.allclose(sample(dit, as_lora), tuned_out, atol=1e-4)
        assert "lora key not loaded" not in caplog.text, caplog.text
    assert at_rest_hash(dit.model) == before


def test_load_refuses_a_file_of_another_family_naming_both(tiny_dit, subject, folders):
    from frozentune.nodes.unitune_nodes import UniTuneLoad, UniTuneSave

    flux = tiny_dit("flux1")
    UniTuneSave.execute(model=fine_tune_node(flux, subject, steps=1)[0], filename="unitune/for_flux")
    for other, label in (("sd3", "SD3/SD3.5"), ("flux1_schnell", "Flux.1 schnell")):
        with pytest.raises(ValueError, match=rf"made for Flux\.1 dev, and this MODEL is {label}"):
            UniTuneLoad.execute(model=tiny_dit(other).model, unitune_name="for_flux.safetensors", strength=1.0)


# --- guidance, timestep sampling -------------------------------------------------------------------------

def first_loss(dit, subject, **settings) -> float:
    from frozentune.unitune import finetune

    latents, cond = dit.vae.encode(subject), dit.encode("beikkpic")
    s = finetune.FineTuneSettings(mode="lora", steps=1, batch_size=2, optimizer="adamw", lora_rank=2, **settings)
    return finetune.fine_tune(dit.model, latents, cond, s).losses[0]


@pytest.mark.parametrize("family", ["flux1", "sd3", "flux1_schnell"])
def test_flux_guidance_reaches_the_dev_model_only(family, tiny_dit, subject, monkeypatch):
    """Same seed, guidance 1 vs 4: another loss on Flux.1 dev (the value is a model input), the same on the others."""
    from frozentune.unitune import finetune

    dit = tiny_dit(family)
    losses = {g: first_loss(dit, subject, guidance=g) for g in (1.0, 4.0)}
    assert (losses[1.0] != losses[4.0]) == (family == "flux1"), losses

    seen = {}
    real = finetune.fine_tune
    monkeypatch.setattr(finetune, "fine_tune", lambda *a, **k: seen.setdefault("result", real(*a, **k)))
    fine_tune_node(dit, subject, steps=1, flux_guidance=2.5)
    assert seen["result"].settings.guidance == 2.5
    assert seen["result"].metadata.get("unitune.guidance") == ("2.5" if family == "flux1" else None)


def test_timestep_sampling_input_reaches_training_and_is_refused_on_sd(tiny_dit, tiny_checkpoints, subject):
    import nodes

    dit = tiny_dit("sd3")
    losses = {how: first_loss(dit, subject, timestep_sampling=how) for how in ("uniform", "logit-normal", "sigmoid")}
    assert len(set(losses.values())) == 3, losses
    tuned = fine_tune_node(dit, subject, steps=1, timestep_sampling="sigmoid")[0]
    assert result_of(tuned).metadata["unitune.timestep_sampling"] == "sigmoid"
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[:3]
    from frozentune.nodes.unitune_nodes import UniTuneFineTune

    with pytest.raises(ValueError, match="'logit-normal' is for flow-matching models"):
        UniTuneFineTune.execute(model=model, clip=clip, vae=vae, image=subject, token="beikkpic", class_word="",
                                steps=1, batch_size=1, learning_rate=1e-3, optimizer="adamw", train="auto",
                                lora_rank=4, gradient_checkpointing=False, seed=0, timestep_sampling="logit-normal")


# --- the in-place trap -----------------------------------------------------------------------------------

def test_flux_in_place_blocks_train_with_exact_gradients_also_checkpointed(tiny_dit, subject, monkeypatch):
    """ComfyUI's Flux blocks add into their residual stream in place after a LayerNorm saved it. Unprotected,
    backward stops ("modified by an inplace operation"), and checkpointed blocks (torch skips the version check
    behind its hooks) give wrong gradients silently. Protected, both equal the copy-everything oracle."""
    from frozentune.training import precision

    dit = tiny_dit("flux1")
    loss, reference, _ = gradients(dit, subject, checkpoint=False, oracle=True)
    assert len(reference) == len(list(dit.model.model.diffusion_model.parameters()))
    for checkpoint in (False, True):
        value, grads, blocks = gradients(dit, subject, checkpoint)
        assert blocks == (4 if checkpoint else 0)  # 2 double + 2 single blocks
        assert value == pytest.approx(loss, rel=1e-6)
        for name, g in reference.items():
            assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-7), (checkpoint, name)

    monkeypatch.setattr(precision, "protect_inplace_blocks", lambda module: 0)  # what frozen_twin calls
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        gradients(dit, subject, checkpoint=False)
    _, grads, _ = gradients(dit, subject, checkpoint=True)
    wrong = [n for n, g in reference.items() if not torch.allclose(grads[n], g, rtol=1e-4, atol=1e-7)]
    log.info("Flux-tiny, in-place blocks checkpointed without the norm copies: %d of %d gradients wrong",
             len(wrong), len(reference))
    assert wrong


# --- precision -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", DITS)
@pytest.mark.parametrize("dtype_name", ["bf16", "fp8"])
def test_half_and_fp8_bases_train_with_fp32_state(family, dtype_name, subject, tiny_dit, monkeypatch):
    """bf16 computing natively (attention mode: fp32 master weights beside frozen bf16 ones), or fp8 weight storage
    (UNETLoader weight_dtype fp8_e4m3fn, cast for compute as ComfyUI does; a LoRA): what trains and its optimizer
    state are fp32, the frozen weights are the base's own memory in its load dtype, the base is unchanged, and the
    tuned MODEL lowers the training objective on fixed draws."""
    import comfy.model_management as mm

    from frozentune.training import objective
    from frozentune.unitune import finetune
    from harness import tiny_dits

    kwargs = {"bf16": dict(dtype="bf16"), "fp8": dict(weight_dtype="fp8_e4m3fn")}[dtype_name]
    dit = tiny_dits.load(family, **kwargs)
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[dtype_name]
    mode = {"bf16": "attention", "fp8": "lora"}[dtype_name]
    assert dit.model.model.get_dtype() == dtype
    before = at_rest_hash(dit.model)
    base_ptrs = {n: p.data_ptr() for n, p in dit.model.model.diffusion_model.named_parameters()}
    seen = node_runs.training_spies(monkeypatch)
    tuned = fine_tune_node(dit, subject, steps=4, train=mode, precision="bf16" if dtype_name == "bf16" else "auto")[0]
    result = result_of(tuned)
    assert result.metadata["unitune.compute_dtype"] == ("bfloat16" if dtype_name == "bf16" else "float32")
    unet = seen["twin"].diffusion_model
    loras = node_runs.lora_layers(unet)
    trainable = [p for p in unet.parameters() if p.requires_grad] + [p for f in loras for p in f.parameters()]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    state = node_runs.optimizer_state(seen["opt"])
    assert state and {t.dtype for t in state} == {torch.float32}
    frozen = {n: p for n, p in unet.named_parameters() if not p.requires_grad}
    assert frozen.keys() == base_ptrs.keys() if mode == "lora" else 0 < len(frozen) < len(base_ptrs)
    assert all(p.data_ptr() == base_ptrs[n] and p.dtype == dtype for n, p in frozen.items())
    assert {t.dtype for t in result.tensors.values()} == {torch.bfloat16 if mode == "attention" else torch.float32}
    assert at_rest_hash(dit.model) == before

    latents, cond = dit.vae.encode(subject), dit.encode("beikkpic")

    @torch.inference_mode()  # as ComfyUI's executor runs nodes (fp8 patching rounds with out= ops)
    def objective_loss(patcher) -> float:
        mm.load_models_gpu([patcher])
        m, gen = patcher.model, torch.Generator().manual_seed(5)
        x0 = m.latent_format.process_in(latents).expand(8, -1, -1, -1)
        family_record = finetune.family_of(patcher)
        conditioning = finetune.with_guidance(family_record, cond, finetune.TRAIN_GUIDANCE)
        conds = finetune.batched(finetune.training_conds(m, conditioning, x0[:1], patcher.load_device), 8)
        sigma = objective.draw_sigmas(m.model_sampling, 8, gen)
        x_t = objective.noised(m.model_sampling, sigma, torch.randn(x0.shape, generator=gen), x0)
        return objective.denoised_loss(m.model_sampling, sigma, x_t, x0, m.apply_model(x_t, sigma, **conds)).item()

    losses = {"base": objective_loss(dit.model), "tuned": objective_loss(tuned)}
    log.info("UniTune %s-tiny %s LoRA, 4 steps: objective on fixed draws %s", family, dtype_name, losses)
    assert losses["tuned"] < losses["base"], losses
