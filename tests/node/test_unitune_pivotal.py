"""Pivotal UniTune on the tiny models: a learned word travels with the tuned MODEL, Save writes the pair, Load
restores both, and stock CLIPTextEncode with the restored ``embedding:name`` gives the trainer's conditioning.

The text encoders are loaded with 2 (SD1.5) or 3 (SDXL) transformer layers through ComfyUI's own text-encoder
options (the full-size random CLIP is slow on the CPU), as the textual inversion tests do.
"""

from __future__ import annotations

import pytest
import torch

from harness.hashing import frozen_hashes as hashes
from harness.images import subject_image

SHALLOW = {"sd15": {"clip_l_model_config": {"num_hidden_layers": 2}},
           "sdxl": {"clip_l_model_config": {"num_hidden_layers": 3}, "clip_g_model_config": {"num_hidden_layers": 3}}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, pack):
    """models/embeddings and models/unitune in a temporary folder, for the whole module."""
    import folder_paths

    from frozentune.nodes.unitune_nodes import FOLDER

    root = tmp_path_factory.mktemp("models")
    saved = {k: folder_paths.folder_names_and_paths[k] for k in ("embeddings", FOLDER)}
    for key in saved:
        (root / key).mkdir()
        folder_paths.folder_names_and_paths[key] = ([str(root / key)], {".safetensors"})
    yield root
    folder_paths.folder_names_and_paths.update(saved)


def load(path, folders, family, dtype=None):
    import comfy.sd

    options = {"dtype": dtype} if dtype is not None else {}
    return comfy.sd.load_checkpoint_guess_config(str(path), embedding_directory=[str(folders / "embeddings")],
                                                 model_options=options, te_model_options=SHALLOW[family])[:3]


@pytest.fixture(scope="module")
def sd15(tiny_checkpoints, folders):
    return load(tiny_checkpoints["sd15"], folders, "sd15")


def run(model, clip, vae, **overrides):
    from frozentune.nodes.unitune_nodes import UniTuneFineTune

    args = dict(token="beikkpic", class_word="", steps=2, batch_size=1, learning_rate=1e-3, optimizer="adamw",
                train="lora", lora_rank=4, gradient_checkpointing=False, seed=0)
    args.update(overrides)
    return UniTuneFineTune.execute(model=model, clip=clip, vae=vae, image=subject_image(32), **args).args[:4]


def assert_same_conditioning(a, b):
    assert torch.equal(a[0][0], b[0][0])
    pa, pb = a[0][1].get("pooled_output"), b[0][1].get("pooled_output")
    assert (pa is None and pb is None) or torch.equal(pa, pb)


def output(patcher, x, cond):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return patcher.model.apply_model(x, torch.tensor([2.0]), c_crossattn=cond).detach().clone()


def test_pivotal_word_travels_saves_as_a_pair_and_loads_back(sd15, folders, captured):
    import nodes
    import safetensors

    from frozentune.nodes.unitune_nodes import ATTACHMENT, UniTuneLoad, UniTuneSave
    from frozentune.textual_inversion import word_trainer as ti
    from frozentune.unitune import pivotal

    model, clip, vae = sd15
    before = hashes(model, clip)
    tuned, curve, view, token = run(model, clip, vae, pivotal_steps=2)
    assert hashes(model, clip) == before  # UNet, text encoder and its token table unchanged
    assert token == "embedding:beikkpic" and curve.shape[-1] == 3
    result = tuned.attachments[ATTACHMENT]
    word = result.word
    count = pivotal.token_count(clip, "beikkpic")
    assert word.name == "beikkpic" and set(word.vectors) == {"clip_l"} and len(word.losses) == 2
    assert word.vectors["clip_l"].shape == (count, 768) and word.vectors["clip_l"].dtype == torch.float32
    start = ti.initial_vectors(clip, ("clip_l",), "beikkpic", count)["clip_l"]
    assert not torch.equal(word.vectors["clip_l"], start), "the word did not train"
    assert result.metadata["unitune.embedding"] == "beikkpic" and result.metadata["unitune.pivotal_steps"] == "2"
    # The UNet was tuned on the learned word, as the clip output (and later the stock loader) reads it.
    assert_same_conditioning(captured[-1], nodes.CLIPTextEncode().encode(view, "embedding:beikkpic")[0])
    plain = nodes.CLIPTextEncode().encode(clip, "beikkpic")[0]
    assert not torch.equal(captured[-1][0][0], plain[0][0]), "the caption did not use the learned word"

    path, saved_token = UniTuneSave.execute(model=tuned, filename="unitune/pivot").args
    assert saved_token == "embedding:pivot"
    with safetensors.safe_open(path, "pt") as f:
        meta, patches = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    word_file = folders / "embeddings" / "pivot.safetensors"
    with safetensors.safe_open(str(word_file), "pt") as f:
        vectors, word_meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert set(vectors) == {ti.SD15_KEY} and torch.equal(vectors[ti.SD15_KEY], word.vectors["clip_l"])
    assert meta["unitune.embedding_file"] == "pivot" and meta["unitune.embedding_sha256"] == pivotal.digest(vectors)
    assert word_meta["format"] == ti.FILE_FORMAT and word_meta["textual_inversion.unitune_file"] == "pivot.safetensors"
    assert all(torch.equal(patches[k], v) for k, v in result.tensors.items()) and set(patches) == set(result.tensors)

    reloaded, loaded_token = UniTuneLoad.execute(model=model, unitune_name="pivot.safetensors", strength=1.0).args
    assert loaded_token == "embedding:pivot"
    # Stock CLIPTextEncode with the restored word gives the trainer's conditioning bit for bit, in a sentence too.
    assert_same_conditioning(captured[-1], nodes.CLIPTextEncode().encode(clip, loaded_token)[0])
    assert_same_conditioning(nodes.CLIPTextEncode().encode(view, "embedding:beikkpic as a watercolor")[0],
                             nodes.CLIPTextEncode().encode(clip, f"{loaded_token} as a watercolor")[0])
    cond = captured[-1][0][0]
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    base_out, tuned_out, reloaded_out = output(model, x, cond), output(tuned, x, cond), output(reloaded, x, cond)
    assert not torch.equal(base_out, tuned_out), "training changed nothing"
    assert torch.equal(tuned_out, reloaded_out)
    assert hashes(model, clip) == before

    # The pair belongs together: a missing or replaced word file is refused, naming it and the fix.
    saved = word_file.read_bytes()
    word_file.unlink()
    with pytest.raises(ValueError, match=r"embedding:pivot, but pivot.safetensors is in no embeddings folder: put"):
        UniTuneLoad.execute(model=model, unitune_name="pivot.safetensors", strength=1.0)
    from frozentune.storage import safetensors_file as weights_file

    weights_file.save(word_file, {ti.SD15_KEY: torch.zeros(count, 768)}, {}, format=ti.FILE_FORMAT)
    with pytest.raises(ValueError, match="is not the word pivot.safetensors was saved with"):
        UniTuneLoad.execute(model=model, unitune_name="pivot.safetensors", strength=1.0)
    word_file.write_bytes(saved)


def test_embedding_input_uses_the_stock_file(sd15, folders, captured):
    import nodes
    import safetensors

    from frozentune.nodes.unitune_nodes import ATTACHMENT, UniTuneSave
    from frozentune.storage import safetensors_file as weights_file
    from frozentune.textual_inversion import word_trainer as ti

    model, clip, vae = sd15
    given = torch.randn(2, 768, generator=torch.Generator().manual_seed(3))
    weights_file.save(folders / "embeddings" / "given.safetensors", {ti.SD15_KEY: given}, {}, format=ti.FILE_FORMAT)
    tuned, _, view, token = run(model, clip, vae, steps=1, embedding="embedding:given", class_word="dog")
    assert token == "embedding:given" and view is not clip
    assert_same_conditioning(captured[-1], nodes.CLIPTextEncode().encode(clip, "embedding:given dog")[0])
    word = tuned.attachments[ATTACHMENT].word
    assert torch.equal(word.vectors["clip_l"], given)
    path, saved_token = UniTuneSave.execute(model=tuned, filename="given_tuned").args
    assert saved_token == "embedding:given_tuned"
    with safetensors.safe_open(str(folders / "embeddings" / "given_tuned.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(ti.SD15_KEY), given)


def test_files_without_a_word_load_as_before(sd15, folders):
    import safetensors

    from frozentune.nodes.unitune_nodes import UniTuneLoad, UniTuneSave

    model, clip, vae = sd15
    words = sorted((folders / "embeddings").iterdir())
    tuned, _, view, token = run(model, clip, vae, steps=1, class_word="dog")
    assert token == "beikkpic" and view is clip
    path, saved_token = UniTuneSave.execute(model=tuned, filename="plain").args
    assert saved_token == "beikkpic"
    assert sorted((folders / "embeddings").iterdir()) == words, "a result without a word wrote an embedding"
    with safetensors.safe_open(path, "pt") as f:
        assert "unitune.embedding_file" not in f.metadata()
    _, loaded_token = UniTuneLoad.execute(model=model, unitune_name="plain.safetensors", strength=1.0).args
    assert loaded_token == "beikkpic"


def test_bad_word_inputs_get_clear_errors(sd15, folders, tiny_checkpoints):
    from frozentune.storage import safetensors_file as weights_file
    from frozentune.textual_inversion import word_trainer as ti

    model, clip, vae = sd15
    with pytest.raises(ValueError, match=r"embedding 'embedding:' names no word: give 'embedding:<name>'"):
        run(model, clip, vae, embedding="embedding:")
    with pytest.raises(ValueError, match=r"embedding 'embedding:nope': no file nope.safetensors .* Textual Inversion"):
        run(model, clip, vae, embedding="embedding:nope")
    with pytest.raises(ValueError, match="are both set: give a learned word"):
        run(model, clip, vae, embedding="embedding:nope", pivotal_steps=2)
    with pytest.raises(ValueError, match=r"token 'two words' cannot be the learned word \(pivotal_steps > 0\)"):
        run(model, clip, vae, token="two words", pivotal_steps=1)
    with pytest.raises(ValueError, match="pivotal_steps=-1 must be 0"):
        run(model, clip, vae, pivotal_steps=-1)

    # An SD1.5 word with an SDXL-family model: the stock loader would feed CLIP-L only and drop it from CLIP-G.
    weights_file.save(folders / "embeddings" / "sd15_word.safetensors", {ti.SD15_KEY: torch.zeros(1, 768)}, {},
                      format=ti.FILE_FORMAT)
    xl_model, xl_clip, xl_vae = load(tiny_checkpoints["sdxl"], folders, "sdxl")
    with pytest.raises(ValueError, match=r"embedding 'embedding:sd15_word' has 768-wide vectors for clip_g, which "
                                         r"needs 1280 .* this MODEL is sdxl"):
        run(xl_model, xl_clip, xl_vae, embedding="embedding:sd15_word")


# fp16 (long) repeats bf16's native half path; fp16 compute is tested by the UniTune and TI half tiers
@pytest.mark.parametrize("dtype_name", ["bf16", pytest.param("fp16", marks=pytest.mark.long)])
def test_pivotal_in_half_precision(dtype_name, tiny_checkpoints, folders):
    """The UNet stored in bf16/fp16 computing natively: the word and the patches train in fp32, the base is frozen."""
    from frozentune.nodes.unitune_nodes import ATTACHMENT
    from harness.precision import native_compute

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    with native_compute():
        model, clip, vae = load(tiny_checkpoints["sd15"], folders, "sd15", dtype=dtype)
    assert model.model.manual_cast_dtype is None and model.model.get_dtype() == dtype
    before = hashes(model, clip)
    tuned, _, _, token = run(model, clip, vae, steps=1, pivotal_steps=1, precision="auto")
    assert hashes(model, clip) == before and model.model.get_dtype() == dtype
    result = tuned.attachments[ATTACHMENT]
    assert token == "embedding:beikkpic"
    vectors = result.word.vectors["clip_l"]
    assert vectors.dtype == torch.float32 and torch.isfinite(vectors).all()
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in result.tensors.values())
