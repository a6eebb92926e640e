"""Norm control of the pivotal word on the tiny models: over 200 pivotal steps the learned vectors stay the size
of the words the text encoder knows; off runs exactly the textual inversion of before; the UniTune Fine-Tune
inputs reach the word's run and its file. The maths against hand-computed cases: unit/test_word_norm_control.py.

The text encoders are loaded shallow through ComfyUI's own text-encoder options, as the other textual inversion
tests do; the token tables stay full size (49408 x 768 and x 1280), which is what the vocabulary statistic reads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import pytest
import torch

from harness.hashing import frozen_hashes as hashes
from harness.images import subject_image

SHALLOW = {"sd15": {"clip_l_model_config": {"num_hidden_layers": 2}},
           "sdxl": {"clip_l_model_config": {"num_hidden_layers": 3}, "clip_g_model_config": {"num_hidden_layers": 3}}}
log = logging.getLogger(__name__)


def load(path, family):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(str(path), embedding_directory=[],
                                                 te_model_options=SHALLOW[family])[:3]


@pytest.fixture(scope="module")
def sd15(tiny_checkpoints, pack):
    """One SD1.5 load and the smallest image the UNet takes: 8 px, a 1x1 latent."""
    model, clip, vae = load(tiny_checkpoints["sd15"], "sd15")
    return model, clip, vae, vae.encode(subject_image(8))


def table(clip, key: str = "clip_l") -> torch.Tensor:
    return getattr(clip.cond_stage_model, key).transformer.get_input_embeddings().weight


def test_pivotal_word_stays_the_size_of_the_vocabulary_over_200_steps(sd15):
    """The issue's check: with the pivotal defaults (lr 2e-3, norm control on), batch 1, a 1x1 latent (11 s on an
    idle 2-core CPU)."""
    from frozentune.textual_inversion import word_trainer as ti
    from frozentune.unitune import pivotal

    model, clip, _, latents = sd15
    before = hashes(model, clip)
    vocabulary = table(clip)
    median = vocabulary.detach().float().norm(dim=1).median().item()
    std = ti.vocabulary_std(vocabulary)
    start = time.perf_counter()
    word = pivotal.learn_word(model, clip, latents, "beikkpic", 200, 1, 0, "fp32")
    seconds = time.perf_counter() - start
    vectors = word.vectors["clip_l"]
    norms = vectors.norm(dim=1)
    log.info("pivotal word, 200 steps with norm control: row norms %s = %.3gx the vocabulary's median row norm "
             "%.4g; std %.4g vs the vocabulary's %.4g; %.1f s", [round(v, 4) for v in norms.tolist()],
             norms.max().item() / median, median, vectors.std().item(), std, seconds)
    assert word.metadata["textual_inversion.norm_control"] == "True"
    assert hashes(model, clip) == before  # the token table is read, never written
    assert norms.max().item() <= 2 * median
    # What the retraction aims at: the vectors' std near the vocabulary's. Measured 1.06x with it; without it the
    # same run ends at 1.72x (row norms 1.64x to 1.78x the median), so this fails if the retraction is skipped.
    assert abs(vectors.std().item() / std - 1) < 0.15


def test_norm_control_off_runs_no_new_code_and_on_only_adds_the_retraction(sd15, monkeypatch):
    """Off: the statistic and the retraction are never called (so results are those of before: the TI and pivotal
    tests' runs, and a digest checked before/after the change). On with a no-op retraction: the same run (to the CPU's rounding),
    so the only difference norm control makes is the retraction after each step, once per encoder."""
    from frozentune.textual_inversion import word_trainer as ti

    model, clip, _, latents = sd15
    settings = ti.TextualInversionSettings(init_text="object", vectors=2, captions="token alone", steps=2,
                                           batch_size=1, learning_rate=2e-3, seed=0, precision="fp32")
    real_retract, real_stds = ti.retract, ti.vocabulary_stds

    def refuse(*args, **kwargs):
        raise AssertionError("norm control ran with norm_control off")

    monkeypatch.setattr(ti, "retract", refuse)
    monkeypatch.setattr(ti, "vocabulary_stds", refuse)
    off = ti.train(model, clip, latents, settings, name="normword").vectors["clip_l"]

    calls = []
    monkeypatch.setattr(ti, "vocabulary_stds", real_stds)
    monkeypatch.setattr(ti, "retract", lambda vectors, std: calls.append(std))
    noop = ti.train(model, clip, latents, replace(settings, norm_control=True), name="normword").vectors["clip_l"]
    # Equal up to the CPU's run-to-run rounding (seen up to 1.7e-7 between identical runs in one process); the
    # retraction itself moves every value by a factor (std ratio)**0.1, orders of magnitude more.
    torch.testing.assert_close(noop, off, rtol=0, atol=1e-6)
    assert calls == [pytest.approx(ti.vocabulary_std(table(clip)))] * 2

    monkeypatch.setattr(ti, "retract", real_retract)
    on = ti.train(model, clip, latents, replace(settings, norm_control=True), name="normword").vectors["clip_l"]
    assert not torch.equal(on, off)


def test_sdxl_gets_one_statistic_per_text_encoder(tiny_checkpoints, pack):
    from frozentune.textual_inversion import word_trainer as ti

    model, clip, vae = load(tiny_checkpoints["sdxl"], "sdxl")
    settings = ti.TextualInversionSettings(steps=1, precision="fp32", norm_control=True)
    ti._load(model, clip)
    with torch.inference_mode(False):
        run = ti.TrainingRun(model, clip, torch.zeros(1, 4, 8, 8), settings, "normword")
    assert run.vocabulary_std == {key: ti.vocabulary_std(table(clip, key)) for key in ("clip_l", "clip_g")}
    assert run.vocabulary_std["clip_l"] != run.vocabulary_std["clip_g"]


def test_unitune_inputs_reach_the_word_and_its_file(sd15):
    from frozentune.nodes.unitune_nodes import ATTACHMENT, UniTuneFineTune
    from frozentune.unitune import pivotal

    model, clip, vae, _ = sd15
    args = dict(token="beikkpic", class_word="", steps=1, batch_size=1, learning_rate=1e-3, optimizer="adamw",
                train="lora", lora_rank=4, gradient_checkpointing=False, seed=0, pivotal_steps=1)

    def word(**overrides):
        out = UniTuneFineTune.execute(model=model, clip=clip, vae=vae, image=subject_image(8), **args, **overrides)
        return out.args[0].attachments[ATTACHMENT].word

    default = word()
    assert default.metadata["textual_inversion.learning_rate"] == str(pivotal.LEARNING_RATE) == "0.002"
    assert default.metadata["textual_inversion.norm_control"] == "True"
    chosen = word(pivotal_learning_rate=5e-4, pivotal_norm_control=False)
    assert chosen.metadata["textual_inversion.learning_rate"] == "0.0005"
    assert chosen.metadata["textual_inversion.norm_control"] == "False"
    assert not torch.equal(chosen.vectors["clip_l"], default.vectors["clip_l"])
    with pytest.raises(ValueError, match=r"pivotal_learning_rate=0.0 must be a positive number such as 0.002"):
        word(pivotal_learning_rate=0.0)
