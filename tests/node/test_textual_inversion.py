"""Textual Inversion Train on the tiny models: the stock prompt path reads the file, frozen is frozen, bad input.

The tiny checkpoints carry full-size random CLIP text encoders; a CPU step through a 12-layer CLIP-L (and
32-layer CLIP-G) takes many seconds here, so these tests load them with 2 (SD1.5) or 3 (SDXL) transformer layers through
ComfyUI's own ``<clip>_model_config`` text-encoder option (same code, same token table, fewer layers).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from harness.hashing import frozen_hashes as hashes
from harness.images import subject_image

# SD1.5 reads CLIP-L's last layer; SDXL reads the penultimate (layer -2), which ComfyUI allows from 3 layers on.
SHALLOW_TEXT = {"clip_l_model_config": {"num_hidden_layers": 3}, "clip_g_model_config": {"num_hidden_layers": 3}}
SHALLOW_SD15 = {"clip_l_model_config": {"num_hidden_layers": 2}}
log = logging.getLogger(__name__)


def load_shallow(path, embeddings_dir, family, dtype=None):
    import comfy.sd

    options = {"dtype": dtype} if dtype is not None else {}
    return comfy.sd.load_checkpoint_guess_config(str(path), embedding_directory=[str(embeddings_dir)],
                                                 model_options=options,
                                                 te_model_options=SHALLOW_SD15 if family == "sd15" else SHALLOW_TEXT)[:3]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints, pack, embeddings_dir):
    return {f: load_shallow(tiny_checkpoints[f], embeddings_dir, f) for f in ("sd15", "sdxl")}


def run_node(model, clip, vae, image=..., **overrides):
    from frozentune.nodes.textual_inversion_nodes import TextualInversionTrain

    args = dict(name="tiword", init_text="object", vectors=2, captions="object templates", steps=1, batch_size=1,
                learning_rate=5e-2, seed=0)
    args.update(overrides)
    out = TextualInversionTrain.execute(model=model, clip=clip, vae=vae,
                                        image=subject_image(32) if image is ... else image, **args)
    return out.args


def trainer_conditioning(model, clip, vectors, name, text):
    """The conditioning the trainer computes for ``text`` with ``vectors`` (its own TrainingRun)."""
    from frozentune.textual_inversion import word_trainer as ti

    settings = ti.TextualInversionSettings(steps=1, precision="fp32")
    ti._load(model, clip)
    with torch.inference_mode(False), torch.no_grad():
        run = ti.TrainingRun(model, clip, vae_latent(), settings, name)
        run.vectors = dict(vectors)
        run.view = ti.tokenizing_clip(clip, name, run.vectors)
        return run.conditioning(text)


def vae_latent():
    return torch.zeros(1, 4, 8, 8)


@pytest.fixture(scope="module")
def trained(loaded, embeddings_dir):
    """One node run per family, shared: the stock-prompt checks and the taken-name check read the same file.

    Returns ``(hashes before, hashes after, node outputs)``.
    """
    runs = {}

    def get(family: str):
        if family not in runs:
            model, clip, vae = loaded[family]
            before = hashes(model, clip)
            out = run_node(model, clip, vae, name=f"ti_{family}")
            runs[family] = before, hashes(model, clip), out
        return runs[family]

    return get


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_stock_prompt_reads_the_trained_vectors(family, loaded, trained):
    import nodes
    import safetensors

    from frozentune.families import fingerprint as families
    from frozentune.textual_inversion import word_trainer as ti

    model, clip, vae = loaded[family]
    before, after, (word, curve, path, _) = trained(family)
    assert word == f"embedding:ti_{family}" and curve.shape[-1] == 3
    assert after == before  # UNet, text encoders and their vocabulary tables unchanged

    keys = {"sd15": {"emb_params"}, "sdxl": {"clip_l", "clip_g"}}[family]
    with safetensors.safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert set(tensors) == keys
    assert meta["format"] == ti.FILE_FORMAT and meta["textual_inversion.family"] == family
    assert families.fingerprints_match(meta["textual_inversion.base_fingerprint"],
                                       families.fingerprint(model.model.diffusion_model))
    vectors = {"clip_l": tensors.get("emb_params", tensors.get("clip_l"))}
    if family == "sdxl":
        vectors["clip_g"] = tensors["clip_g"]
    widths = {"clip_l": 768, "clip_g": 1280}
    start = ti.initial_vectors(clip, tuple(vectors), "object", 2)
    for key, v in vectors.items():
        assert v.shape == (2, widths[key]) and v.dtype == torch.float32
        assert not torch.equal(v, start[key]), "the vectors did not train"

    # The stock tokenizer puts exactly these vectors where the word is.
    text = "a photo of a " + word
    tokens = clip.tokenize(text)
    prefix = len(clip.tokenizer.clip_l.tokenizer("a photo of a")["input_ids"]) - 1  # start token + words
    for short, key in (("l", "clip_l"), ("g", "clip_g")):
        if key not in vectors:
            continue
        row = tokens[short][0]
        placed = [i for i, (t, _) in enumerate(row) if torch.is_tensor(t)]
        assert placed == [prefix, prefix + 1], placed
        assert torch.equal(torch.stack([row[i][0] for i in placed]), vectors[key])

    # Stock CLIPTextEncode gives the conditioning (and pooled output) the trainer computes with them.
    assert text.replace(word, "{}") in ti.OBJECT_TEMPLATES
    stock = nodes.CLIPTextEncode().encode(clip, text)[0]
    cond, pooled = trainer_conditioning(model, clip, vectors, f"ti_{family}", text)
    assert torch.equal(stock[0][0], cond)  # bit for bit: the trainer runs the stock tokenizer and encoder code
    if family == "sdxl":
        assert pooled.shape == (1, 1280)
        assert torch.equal(stock[0][1]["pooled_output"], pooled)
    plain = nodes.CLIPTextEncode().encode(clip, "a photo of a object object")[0][0][0]
    assert (plain - cond).abs().max() > 1e-3  # the word is not the init_text any more


def test_base_samples_identically_and_cancel_leaves_no_file(loaded, embeddings_dir):
    import comfy.model_management as mm
    import nodes

    from harness.cancel import cancel_at

    model, clip, vae = loaded["sd15"]
    pos = nodes.CLIPTextEncode().encode(clip, "a photo")[0]
    latent = {"samples": torch.zeros(1, 4, 4, 4)}

    def sample():
        return nodes.common_ksampler(model, 3, 2, 2.0, "euler", "normal", pos, pos, latent)[0]["samples"]

    first = sample()
    before = hashes(model, clip)
    files = sorted(p.name for p in embeddings_dir.rglob("*"))
    seen = []
    with cancel_at(1, seen), pytest.raises(mm.InterruptProcessingException):
        run_node(model, clip, vae, name="cancelled", steps=50)
    assert seen[-1] == 1  # stopped within the step
    assert sorted(p.name for p in embeddings_dir.rglob("*")) == files  # no partial or temporary file
    assert hashes(model, clip) == before
    assert torch.equal(sample(), first)


def test_taken_name_gets_a_counter_and_the_old_file_stays(loaded, trained):
    model, clip, vae = loaded["sd15"]
    import safetensors.torch

    from frozentune.nodes.textual_inversion_nodes import TextualInversionTrain

    word, _, path, _ = trained("sd15")[2]  # name ti_sd15, seed 0
    old = open(path, "rb").read()
    word2, _, path2, _ = run_node(model, clip, vae, name="ti_sd15", seed=1)
    word3, _, path3, _ = run_node(model, clip, vae, name="ti_sd15")
    assert (word, word2, word3) == ("embedding:ti_sd15", "embedding:ti_sd15_00001", "embedding:ti_sd15_00002")
    assert open(path, "rb").read() == old and len({path, path2, path3}) == 3
    first, other, again = (safetensors.torch.load_file(p)["emb_params"] for p in (path, path2, path3))
    assert torch.equal(first, again) and not torch.equal(first, other)  # the seed decides the result

    # ComfyUI re-runs the node on re-queue once a file it wrote is gone (its cache would return the old word).
    widgets = dict(name="ti_sd15", init_text="object", vectors=2, captions="object templates", steps=1,
                   batch_size=1, learning_rate=5e-2, seed=1, precision="auto")
    kept = TextualInversionTrain.fingerprint_inputs(model=None, clip=None, vae=None, image=None, **widgets)
    os.remove(path2)
    assert TextualInversionTrain.fingerprint_inputs(model=None, clip=None, vae=None, image=None, **widgets) != kept


@pytest.mark.parametrize("captions, first, count", [("object templates", "a photo of a embedding:w", 27),
                                                     ("style templates", "a painting in the style of embedding:w", 17),
                                                     ("token alone", "embedding:w", 1)])
def test_captions_option_sets_the_training_captions(captions, first, count, loaded):
    from frozentune.textual_inversion import word_trainer as ti

    model, clip, _ = loaded["sd15"]
    ti._load(model, clip)
    with torch.inference_mode(False):
        run = ti.TrainingRun(model, clip, vae_latent(), ti.TextualInversionSettings(captions=captions), "w")
    assert (run.caption(0), len(run.templates)) == (first, count)


def test_bad_inputs_are_refused_before_training(loaded, embeddings_dir):
    model, clip, vae = loaded["sd15"]
    cases = {
        "": "name '' is refused: it is empty",
        "my dog": "cannot spell",
        "(dog)": "cannot spell",
        "../dog": "is refused",
        "checkpoints/dog": "another loader's folder",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            run_node(model, clip, vae, name=name)
    for init_text, message in (("   ", "init_text is empty"), ("<|endoftext|>", "tokenizes to nothing"),
                               ("a big red dog", "is 4 tokens but vectors=2")):
        with pytest.raises(ValueError, match=message):
            run_node(model, clip, vae, init_text=init_text)
    for vectors in (0, 17):
        with pytest.raises(ValueError, match=f"vectors={vectors} is out of range: give 1 to 16"):
            run_node(model, clip, vae, vectors=vectors)
    with pytest.raises(ValueError, match="learning_rate is nan"):
        run_node(model, clip, vae, learning_rate=float("nan"))
    with pytest.raises(ValueError, match="different sizes"):
        run_node(model, clip, vae, image=[subject_image(64)[0], subject_image(48)[0]])
    assert not list(embeddings_dir.glob("dog*"))


def test_sd15_embedding_in_an_sdxl_prompt_reaches_clip_l_only(loaded, embeddings_dir, caplog):
    """What the stock loader does with a one-tensor (SD1.5) file in an SDXL prompt, for the README."""
    import nodes

    from frozentune.storage import safetensors_file as files

    model, clip, vae = loaded["sdxl"]
    vector = torch.randn(1, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    files.save(embeddings_dir / "sd15_word.safetensors", {"emb_params": vector}, {}, format="test")
    with caplog.at_level(logging.WARNING):
        mixed = nodes.CLIPTextEncode().encode(clip, "a photo of a embedding:sd15_word")[0][0]
    plain = nodes.CLIPTextEncode().encode(clip, "a photo of a")[0][0]
    assert "shape mismatch" in caplog.text  # ComfyUI's own warning, from the CLIP-G encoder
    assert not torch.equal(mixed[0][..., :768], plain[0][..., :768])  # CLIP-L used the vector
    assert torch.equal(mixed[0][..., 768:], plain[0][..., 768:])  # CLIP-G dropped the word
    assert torch.equal(mixed[1]["pooled_output"], plain[1]["pooled_output"])


def _write_views(folder, sizes):
    """Seeded noise images: a PNG with alpha, a JPEG stored rotated with an EXIF orientation, a note and a subfolder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    (h, w), (h2, w2) = sizes
    Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").save(folder / "a.png")
    rotated = Image.fromarray(rng.integers(0, 256, (w2, h2, 3), dtype=np.uint8), "RGB")  # stored h/w swapped
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": LoadImage's exif_transpose turns it back to h2 x w2
    rotated.save(folder / "b.jpg", exif=exif)
    (folder / "captions.txt").write_text("ignored")
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "ignored.png")


def test_folder_input_trains_on_the_views_stock_load_image_reads(loaded, embeddings_dir, tmp_path,
                                                                         monkeypatch):
    import folder_paths
    import nodes
    import safetensors.torch

    from frozentune.nodes import textual_inversion_nodes
    from frozentune.nodes.textual_inversion_nodes import TextualInversionTrain
    from frozentune.training.image_folder import prepare_images

    model, clip, vae = loaded["sd15"]
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    _write_views(tmp_path / "input" / "concept", [(32, 40), (32, 40)])
    stock = torch.cat([nodes.LoadImage().load_image(f"concept/{f}")[0] for f in ("a.png", "b.jpg")])
    assert stock.shape == (2, 32, 40, 3)
    views = []
    monkeypatch.setattr(textual_inversion_nodes, "prepare_images", lambda v: views.append(v) or prepare_images(v))
    word, _, path, _ = run_node(model, clip, vae, image=None, folder="concept", name="from_folder")
    assert torch.equal(torch.stack(views[0]), stock)  # the folder trains on exactly what LoadImage gives
    assert safetensors.torch.load_file(path)["emb_params"].shape == (2, 768)

    # A changed folder runs the node again (ComfyUI caches by the fingerprint).
    widgets = dict(name="from_folder", folder="concept")
    kept = TextualInversionTrain.fingerprint_inputs(image=None, **widgets)
    assert TextualInversionTrain.fingerprint_inputs(image=None, **widgets) == kept
    (tmp_path / "input" / "concept" / "a.png").rename(tmp_path / "input" / "concept" / "c.png")
    assert TextualInversionTrain.fingerprint_inputs(image=None, **widgets) != kept


def test_folder_input_refusals(loaded, embeddings_dir, tmp_path, monkeypatch):
    import folder_paths

    model, clip, vae = loaded["sd15"]
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    _write_views(tmp_path / "input" / "mixed", [(32, 40), (24, 32)])
    (tmp_path / "input" / "empty").mkdir()
    _write_views(tmp_path / "outside", [(32, 40), (32, 40)])
    cases = {
        "mixed": r"different sizes \(32x24: b.jpg; 40x32: a.png\): resize or crop them to one size",
        "empty": "holds no images",
        "missing": "is not a folder",
        "../outside": "is refused: datasets are read only from ComfyUI's input folder",
        str(tmp_path / "outside"): "is refused",
    }
    for folder, message in cases.items():
        with pytest.raises(ValueError, match=message):
            run_node(model, clip, vae, image=None, folder=folder, name="refused")
    with pytest.raises(ValueError, match="both folder 'mixed' and the image input are given"):
        run_node(model, clip, vae, folder="mixed", name="refused")
    with pytest.raises(ValueError, match="no images: connect the image input"):
        run_node(model, clip, vae, image=None, name="refused")
    assert not list(embeddings_dir.glob("refused*"))


def test_previews_do_not_change_the_trained_vectors(loaded, embeddings_dir, monkeypatch):
    import comfy.model_base
    import safetensors.torch

    from frozentune.textual_inversion import word_trainer as ti

    model, clip, vae = loaded["sd15"]
    off = run_node(model, clip, vae, name="preview_off", steps=2)
    calls = {"text": 0, "unet": 0}

    def counted(owner, attr, key):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapper)

    counted(ti.TrainingRun, "conditioning", "text")
    counted(comfy.model_base.BaseModel, "apply_model", "unet")
    on = run_node(model, clip, vae, name="preview_on", steps=2, preview_every=1)
    monkeypatch.undo()
    assert calls == {"text": 2 + 2 * 1, "unet": 2 + 2 * 4}  # 2 steps, 2 previews of 1 text + 4 UNet passes (tooltip)
    first, second = (safetensors.torch.load_file(out[2])["emb_params"] for out in (off, on))
    assert torch.equal(first, second)  # bit for bit
    assert off[3].shape == (1, 64, 64, 3) and not off[3].any()  # off: the black placeholder
    grid = on[3]  # 32 px training images -> 64 px previews (the smallest), one per step, side by side
    assert grid.shape == (1, 64, 2 * 64, 3)
    frames = grid[0].reshape(64, 2, 64, 3)
    assert frames.std() > 0.01 and not torch.equal(frames[:, 0], frames[:, 1])  # drawn, and the vectors moved
