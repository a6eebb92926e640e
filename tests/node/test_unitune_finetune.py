"""UniTune Fine-Tune / Save / Load on the tiny models, through the real node classes."""

from __future__ import annotations

import logging

import pytest
import torch

from harness.hashing import weight_hash as unet_hash
from harness.images import subject_image


def weight_hash(patcher) -> str:
    return unet_hash(patcher.model.diffusion_model)


def at_rest_hash(patcher) -> str:
    """The weights the MODEL itself holds: load it (which undoes other clones' patches), then hash."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return weight_hash(patcher)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints, pack):
    import nodes

    return {f: nodes.CheckpointLoaderSimple().load_checkpoint(p.name)[:3] for f, p in tiny_checkpoints.items()}


@pytest.fixture(scope="module")
def subject():
    return subject_image()


def run_finetune(model, clip, vae, image, **overrides):
    from frozentune.nodes.unitune_nodes import UniTuneFineTune

    args = dict(token="beikkpic", class_word="", steps=4, batch_size=2, learning_rate=1e-4, optimizer="adamw",
                train="auto", lora_rank=4, gradient_checkpointing=False, seed=0)
    args.update(overrides)
    out = UniTuneFineTune.execute(model=model, clip=clip, vae=vae, image=image, **args)
    return out.args[0], out.args[1]


def denoised(patcher, x, sigma, cond):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return patcher.model.apply_model(x, sigma, c_crossattn=cond).detach()


@pytest.mark.slow  # 64 full-mode steps (~18 s idle)
def test_base_untouched_loss_falls_and_token_reconstructs(loaded, subject):
    import nodes

    model, clip, vae = loaded["sd15"]
    before = at_rest_hash(model)
    tuned, curve = run_finetune(model, clip, vae, subject, steps=64, batch_size=4, train="full",
                                optimizer="adafactor", learning_rate=1e-4)
    assert at_rest_hash(model) == before
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    losses = tuned.attachments["frozentune.unitune"].losses
    first, last = sum(losses[:16]) / 16, sum(losses[-16:]) / 16
    logging.getLogger(__name__).info("UniTune full SD1.5-tiny, 64 steps: loss %.4f -> %.4f (x%.2f)",
                                     first, last, first / last)
    assert last < 0.5 * first, (first, last)

    # SDEdit-style: noise the image's latent to 60% of the schedule, sample with the token only.
    latent = {"samples": vae.encode(subject)}
    token = nodes.CLIPTextEncode().encode(clip, "beikkpic")[0]
    empty = nodes.CLIPTextEncode().encode(clip, "")[0]
    errors, samples = {}, {}
    for name, m in (("base", model), ("tuned", tuned), ("base again", model)):
        out = nodes.common_ksampler(m, 7, 12, 3.0, "euler", "normal", token, empty, latent, denoise=0.6)[0]
        samples[name] = out["samples"]
        errors[name] = torch.mean((out["samples"] - latent["samples"]) ** 2).item()
    logging.getLogger(__name__).info("latent MSE to the original: %s", errors)
    assert errors["tuned"] < 0.7 * errors["base"], errors
    # Like a LoRA, the tuned MODEL patches the shared UNet only while it is loaded: the base still
    # samples bit-identically in the same graph, and its weights are the originals once it is loaded.
    assert torch.equal(samples["base"], samples["base again"])
    assert at_rest_hash(model) == before


def test_cancel_leaves_base_untouched(loaded, subject):
    import comfy.model_management as mm

    from harness.cancel import cancel_at

    model, clip, vae = loaded["sd15"]
    before = at_rest_hash(model)
    seen = []
    with cancel_at(3, seen), pytest.raises(mm.InterruptProcessingException):
        run_finetune(model, clip, vae, subject, steps=50, train="full")
    assert seen[-1] == 3
    assert at_rest_hash(model) == before


# Every mode on SD1.5; on the SDXL family lora (the stock LoRA loader's SDXL key map) in make test, full and attention
# (the same family-blind code as on SD1.5, the same diffusion_model.* keys) long.
@pytest.mark.parametrize(("mode", "family"), [("full", "sd15"), ("attention", "sd15"), ("lora", "sd15"),
                                              pytest.param("full", "sdxl", marks=pytest.mark.long),
                                              pytest.param("attention", "sdxl", marks=pytest.mark.long),
                                              ("lora", "sdxl")])
def test_every_mode_trains_saves_and_round_trips(family, mode, loaded, subject, tmp_path, monkeypatch):
    import folder_paths
    import nodes

    from frozentune.nodes.unitune_nodes import FOLDER, UniTuneLoad, UniTuneSave

    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path / "unitune")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    model, clip, vae = loaded[family]
    before = at_rest_hash(model)
    tuned, _ = run_finetune(model, clip, vae, subject, train=mode, learning_rate=1e-3)
    assert at_rest_hash(model) == before

    path = UniTuneSave.execute(model=tuned, filename=f"unitune/{family}_{mode}").args[0]
    reloaded = UniTuneLoad.execute(model=model, unitune_name=f"{family}_{mode}.safetensors", strength=1.0).args[0]

    cond = nodes.CLIPTextEncode().encode(clip, "beikkpic")[0]
    extras = cond[0][1]
    context = cond[0][0]
    kwargs = {}
    if family == "sdxl":
        kwargs["y"] = model.model.encode_adm(pooled_output=extras["pooled_output"], width=64, height=64)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([2.0])

    def out(p):
        import comfy.model_management as mm

        mm.load_models_gpu([p])
        return p.model.apply_model(x, sigma, c_crossattn=context, **kwargs).detach().clone()

    base_out, tuned_out, reloaded_out = out(model), out(tuned), out(reloaded)
    assert not torch.allclose(base_out, tuned_out, atol=1e-6), "training changed nothing"
    assert torch.allclose(tuned_out, reloaded_out, atol=1e-5), (tuned_out - reloaded_out).abs().max()
    if mode == "lora":  # the stock LoraLoader reads the same file
        lora_dir = tmp_path / "loras"
        lora_dir.mkdir(exist_ok=True)
        (lora_dir / "x.safetensors").write_bytes(open(path, "rb").read())
        monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(lora_dir)], {".safetensors"}))
        stock = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "x.safetensors", 1.0)[0]
        assert torch.allclose(out(stock), tuned_out, atol=1e-5)
    assert at_rest_hash(model) == before


def test_file_for_another_base_is_refused(loaded, subject, tmp_path, monkeypatch):
    import folder_paths

    from frozentune.nodes.unitune_nodes import FOLDER, UniTuneLoad, UniTuneSave

    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path / "unitune")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    model, clip, vae = loaded["sd15"]
    tuned, _ = run_finetune(model, clip, vae, subject, train="lora", steps=1)
    UniTuneSave.execute(model=tuned, filename="unitune/for_sd15")
    with pytest.raises(ValueError, match="trained on another base model"):
        UniTuneLoad.execute(model=loaded["sdxl"][0], unitune_name="for_sd15.safetensors", strength=1.0)


def test_bad_inputs_get_clear_errors(loaded, subject, caplog):
    from frozentune.training.image_folder import prepare_images

    model, clip, vae = loaded["sd15"]
    with pytest.raises(ValueError, match="token is empty"):
        run_finetune(model, clip, vae, subject, token="  ")
    with pytest.raises(ValueError, match="different sizes"):
        prepare_images([torch.rand(64, 64, 3), torch.rand(48, 64, 3)])
    with caplog.at_level(logging.INFO):
        cropped = prepare_images([torch.rand(70, 61, 3)])
    assert cropped.shape == (1, 64, 56, 3)
    assert "center-cropped to 56x64" in caplog.text
    with pytest.raises(ValueError, match="not made by UniTune"):
        from frozentune.nodes.unitune_nodes import UniTuneSave

        UniTuneSave.execute(model=model, filename="unitune/x")


def test_non_finite_loss_stops_with_the_step_and_a_fix(loaded, subject):
    model, clip, vae = loaded["sd15"]
    before = at_rest_hash(model)
    with pytest.raises(FloatingPointError, match=r"at step \d+ of 5: lower the learning rate"):
        run_finetune(model, clip, vae, subject, steps=5, train="full", learning_rate=1e30)
    assert at_rest_hash(model) == before


def test_full_delta_compresses_to_a_lora(loaded, subject, tmp_path, monkeypatch):
    """Save as LoRA: at full rank it is exact; at a low rank the error is reported and the stock loader reads it."""
    import folder_paths
    import nodes

    from frozentune.nodes.unitune_nodes import FOLDER, UniTuneSave
    from frozentune.storage import safetensors_file as weights_file

    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path / "unitune")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path / "loras")], {".safetensors"}))
    model, clip, vae = loaded["sd15"]
    tuned, _ = run_finetune(model, clip, vae, subject, train="attention", learning_rate=1e-3)
    context = nodes.CLIPTextEncode().encode(clip, "beikkpic")[0][0][0]
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([2.0])

    def out(p):
        import comfy.model_management as mm

        mm.load_models_gpu([p])
        return p.model.apply_model(x, sigma, c_crossattn=context).detach().clone()

    tuned_out, base_out = out(tuned), out(model)
    errors = {}
    for rank in (4096, 2):
        path = UniTuneSave.execute(model=tuned, filename=f"loras/rank{rank}", save_as="lora", lora_rank=rank).args[0]
        tensors, metadata = weights_file.load(path)
        assert any(k.endswith(".lora_up.weight") for k in tensors) and not any(k.endswith(".diff") for k in tensors)
        errors[rank] = float(metadata["unitune.lora_relative_error"])
        stock = nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"rank{rank}.safetensors", 1.0)[0]
        errors[f"out{rank}"] = ((out(stock) - tuned_out).norm() / (tuned_out - base_out).norm()).item()
    logging.getLogger(__name__).info("UniTune attention delta -> LoRA: %s", errors)
    assert errors[4096] < 1e-5 and errors["out4096"] < 1e-3, errors
    assert 1e-4 < errors[2] < 1.0 and errors["out2"] < 1.0, errors


@pytest.mark.parametrize("base_patched", [False, True], ids=["plain base", "base with a patch"])
def test_full_deltas_reproduce_the_trained_weights(base_patched, loaded, subject, monkeypatch):
    """The saved deltas are taken from the weights training started at, with or without patches on the base.

    A plain base is diffed against its own live weights (no second copy is kept: checked by storage), a
    patched one against a copy, since its live weights may be unpatched meanwhile.
    """
    import comfy.model_management as mm

    from frozentune.unitune import finetune

    model, clip, vae = loaded["sd15"]
    base = model
    if base_patched:
        key = next(f"diffusion_model.{n}" for n, _ in model.model.diffusion_model.named_parameters()
                   if n.endswith("attn2.to_q.weight"))
        shape = model.model.state_dict()[key].shape
        base = model.clone()
        base.add_patches({key: ("diff", (torch.full(shape, 0.25),))}, 1.0)
    before = at_rest_hash(model)
    trained, starts = {}, {}
    original_deltas = finetune._deltas

    def capture(unet, initial, patcher):
        trained.update({n: p.detach().clone() for n, p in unet.named_parameters()})
        live = {p.data_ptr() for p in patcher.model.diffusion_model.parameters()}
        starts.update({n: t.data_ptr() in live for n, t in initial.items()})
        return original_deltas(unet, initial, patcher)

    monkeypatch.setattr(finetune, "_deltas", capture)
    tuned, _ = run_finetune(base, clip, vae, subject, steps=1, batch_size=1, train="full", learning_rate=1e-3)
    assert starts and set(starts.values()) == {not base_patched}, starts  # True: the base's own storage
    mm.load_models_gpu([tuned], force_patch_weights=True)
    for name, p in tuned.model.diffusion_model.named_parameters():
        assert torch.allclose(p.detach(), trained[name], atol=1e-6), (name, (p - trained[name]).abs().max())
    assert at_rest_hash(model) == before
