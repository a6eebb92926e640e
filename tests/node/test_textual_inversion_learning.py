"""Textual inversion learns (held-out loss below init_text's and a random token's) and runs in half precision.

Shallow text encoders as in test_textual_inversion.py (ComfyUI's ``<clip>_model_config`` option).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from harness.images import subject_image
from harness.precision import native_compute

# SD1.5 reads CLIP-L's last layer; SDXL reads the penultimate (layer -2), which ComfyUI allows from 3 layers on.
SHALLOW_TEXT = {"clip_l_model_config": {"num_hidden_layers": 3}, "clip_g_model_config": {"num_hidden_layers": 3}}
SHALLOW_SD15 = {"clip_l_model_config": {"num_hidden_layers": 2}}
log = logging.getLogger(__name__)
STEPS, BATCH, DRAWS = 8, 2, 6  # the learning test's budget
# Learned must beat both baselines by 2%: twice the largest gap measured between the two untrained words
# (init_text vs random token: 0.3% to 1.1% on these draws), while the learned word's margins measured
# 5.8% to 12.6% (seeds 0-3, lr 3e-2 and 1e-1), so the threshold sits 3x below the thinnest seed.
MARGIN = 0.02


def load(path, dtype=None):
    import comfy.sd

    options = {"dtype": dtype} if dtype is not None else {}
    return comfy.sd.load_checkpoint_guess_config(str(path), embedding_directory=[], model_options=options,
                                                 te_model_options=SHALLOW_SD15)[:3]


def random_token(clip, keys, seed: int) -> dict[str, torch.Tensor]:
    """The embedding of one random vocabulary token per encoder (the 'nonsense word' baseline)."""
    token = int(torch.randint(1000, 40000, (1,), generator=torch.Generator().manual_seed(seed)))
    return {k: getattr(clip.cond_stage_model, k).transformer.get_input_embeddings().weight[[token]].float().clone()
            for k in keys}


@pytest.fixture(scope="module")
def sd15_shallow(tiny_checkpoints, pack):
    """One SD1.5 load (shallow CLIP) shared by the seeds, and the 32 px subject encoded once (a 4x4 latent)."""
    model, clip, vae = load(tiny_checkpoints["sd15"])
    return model, clip, vae.encode(subject_image(32))


# seeds 1 and 2 (long) repeat seed 0's run on other draws: the margin is set 3x below the thinnest seed measured
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.long), pytest.param(2, marks=pytest.mark.long)])
def test_learned_word_beats_init_text_and_a_random_token_on_held_out_draws(seed, sd15_shallow, monkeypatch):
    from frozentune.textual_inversion import word_trainer as ti

    model, clip, latents = sd15_shallow
    texts = []
    conditioning = ti.TrainingRun.conditioning

    def recording(self, text):
        texts.append(text)
        return conditioning(self, text)

    monkeypatch.setattr(ti.TrainingRun, "conditioning", recording)
    settings = ti.TextualInversionSettings(init_text="object", vectors=1, steps=STEPS, batch_size=BATCH,
                                           learning_rate=3e-2, seed=seed)
    result = ti.train(model, clip, latents, settings, name="learned")
    monkeypatch.undo()
    # The captions option: one object template per step, with the word where the template's {} is.
    assert len(texts) == STEPS and len(set(texts)) > 1
    assert all(t.replace("embedding:learned", "{}") in ti.OBJECT_TEMPLATES for t in texts)

    keys = tuple(result.vectors)
    arms = {"learned": result.vectors, "init_text": ti.initial_vectors(clip, keys, "object", 1),
            "random token": random_token(clip, keys, 7 + seed)}
    losses = {name: ti.heldout_loss(model, clip, latents, v, "object templates", seed=1234 + seed, draws=DRAWS)
              for name, v in arms.items()}
    log.info("seed %d: held-out loss on %d draws after %d steps of batch %d (SD1.5 tiny, 2-layer CLIP, 32 px): %s; "
             "margin vs init_text %.1f%%, vs random %.1f%%", seed, DRAWS, STEPS, BATCH, losses, 100 * (1 - losses["learned"] / losses["init_text"]),
             100 * (1 - losses["learned"] / losses["random token"]))
    assert losses["learned"] < (1 - MARGIN) * losses["init_text"], losses
    assert losses["learned"] < (1 - MARGIN) * losses["random token"], losses


@pytest.mark.parametrize("family, dtype_name, compute, text", [
    ("sd15", "bf16", "auto", "full-size"), ("sd15", "fp16", "bf16", "shallow"), ("sdxl", "bf16", "auto", "shallow")])
def test_half_precision_tier(family, dtype_name, compute, text, tiny_checkpoints, pack, tmp_path, monkeypatch):
    """UNet loaded in bf16/fp16 computing natively: vectors train in fp32, the base keeps its dtype and weights.

    The first case loads through harness.precision.load_checkpoint, with the checkpoint's full-size CLIP-L.
    """
    import comfy.model_management as mm
    import folder_paths
    import nodes
    import safetensors

    from frozentune.nodes.textual_inversion_nodes import TextualInversionTrain
    from harness.hashing import weight_hash
    from harness.precision import load_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(tmp_path)], {".safetensors"}))
    if text == "full-size":
        model, clip, vae = load_checkpoint(tiny_checkpoints[family], dtype)
    else:
        with native_compute():
            import comfy.sd

            model, clip, vae = comfy.sd.load_checkpoint_guess_config(
                str(tiny_checkpoints[family]), embedding_directory=[str(tmp_path)], model_options={"dtype": dtype},
                te_model_options=SHALLOW_SD15 if family == "sd15" else SHALLOW_TEXT)[:3]
    assert model.model.manual_cast_dtype is None and model.model.get_dtype() == dtype
    mm.load_models_gpu([model])
    before = weight_hash(model.model.diffusion_model)
    word, _, path, shown = TextualInversionTrain.execute(
        model=model, clip=clip, vae=vae, image=subject_image(32), name=f"half_{family}_{dtype_name}",
        init_text="object", vectors=1, captions="object templates", steps=1, batch_size=1, learning_rate=5e-2,
        seed=0, precision=compute, preview_every=1).args
    assert shown.shape == (1, 64, 64, 3) and torch.isfinite(shown).all() and shown.std() > 0  # the preview drew
    mm.load_models_gpu([model])
    assert weight_hash(model.model.diffusion_model) == before
    assert model.model.get_dtype() == dtype
    with safetensors.safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    vectors = {"l": tensors.get("emb_params", tensors.get("clip_l")), "g": tensors.get("clip_g")}
    assert meta["textual_inversion.compute_dtype"] == {"auto": "float32", "bf16": "bfloat16"}[compute]
    assert math.isfinite(float(meta["textual_inversion.final_loss"]))
    tokens = clip.tokenize("a photo of a " + word)
    for short, vector in vectors.items():
        if vector is None:
            continue
        assert vector.dtype == torch.float32 and torch.isfinite(vector).all()
        assert torch.equal(tokens[short][0][5][0], vector[0])
    cond = nodes.CLIPTextEncode().encode(clip, "a photo of a " + word)[0]
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    out = nodes.common_ksampler(model, 1, 1, 2.0, "euler", "normal", cond, cond, latent)[0]["samples"]
    assert torch.isfinite(out).all()
