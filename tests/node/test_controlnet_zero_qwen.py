"""ControlNet-Zero on Qwen-Image: the "qwen_instantx" layout (issue 24), on the tiny Qwen-Image (``harness.tiny_qwen``).

The oracles are stock: ``ControlNetApplyAdvanced`` (+ the tiny Wan-2.1 VAE, latent hints) and ``KSampler``
sample with the ControlNet the layout creates (5-D latents ``[B, 16, 1, h, w]``); ``ControlNetLoader`` reads
the file it writes (``comfy/controlnet.py`` ``load_controlnet_qwen_instantx``, the module's own names);
``QwenImageControlNetModel.forward`` is recorded during sampling to check that the layout's hint and control
forward (what training uses) are what sampling computes. The tiny Qwen-Image (1 block, width 32) is built
from its config class, not loaded (ComfyUI's Qwen-Image detection fixes the widths), so the stock loader reads
the ControlNet file through ``tiny_widths``: a test-only detection wrapper that adds the tiny widths to what
the stock detection says for a file of that width; everything else on the load path is stock. Z-Image and
Chroma have no stock ControlNet loader in ComfyUI 0.3.75: ControlNet-Zero refuses them, saying so. The CLI
(``controlnet_zero.train``) trains from the split files Qwen-Image ships as (``harness.tiny_stand_ins2``: the
tiny transformer, a Qwen2.5-VL text encoder 32 wide, the Wan-2.1 VAE); the learning check (held-out disks, true
vs shuffled hints) runs on a width-256 model.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from harness import controlnet_zero_helpers as cz
from harness import tiny_qwen
from harness.controlnet_zero_helpers import R, hint_image
from harness.hashing import weight_hash

log = logging.getLogger(__name__)
_KIT: dict = {}


@pytest.fixture()
def qwen(pack):
    """The tiny fp32 Qwen-Image MODEL and its VAE (built once per session; never mutated by the tests)."""
    if "model" not in _KIT:
        _KIT["model"], _KIT["vae"] = tiny_qwen.model(), tiny_qwen.vae()
    return _KIT["model"], _KIT["vae"]


def prompts():
    return tiny_qwen.conditioning("a red disk"), tiny_qwen.conditioning("")


def layout():
    return cz.layout("qwen_instantx")


def tiny_widths():
    """ComfyUI's Qwen-Image detection plus the tiny model's widths for a file as wide as the tiny one (test only)."""
    return tiny_qwen.controlnet_detection()


def sample(model, vae, control_net=None, hint=None, steps: int = 2) -> torch.Tensor:
    """Stock sampling of 5-D latents ``[1, 16, 1, h, w]`` at cfg 4."""
    return cz.sample(model, prompts(), vae, control_net, hint, steps, cfg=4.0, latent_shape=(1, 16, 1, R // 8, R // 8))


def perturbed(cn: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``cn`` whose zero-initialized parts are random (a stand-in for a trained ControlNet)."""
    return cz.perturbed(cn, layout().ZERO_PREFIXES, 0.05)


def test_create_copies_the_base_and_zeroes_the_new_parts(qwen):
    qwen_instantx = layout()
    model, _ = qwen
    base = model.model
    before = weight_hash(base.diffusion_model)
    cn = qwen_instantx.create(base)
    assert qwen_instantx.depth_of(cn) == 1 and len(cn.controlnet_blocks) == 1  # default 5, capped at the 1 block
    base_sd = base.diffusion_model.state_dict()
    sd = cn.state_dict()
    copied = [k for k in sd if not k.startswith(qwen_instantx.ZERO_PREFIXES)]
    assert {"img_in.weight", "txt_in.weight", "txt_norm.weight", "time_text_embed.timestep_embedder.linear_1.weight",
            "transformer_blocks.0.img_mlp.net.0.proj.weight", "transformer_blocks.0.attn.to_q.weight"} <= set(copied)
    for k in copied:
        assert torch.equal(sd[k], base_sd[k].float()), k
    zero = sorted(k for k in sd if k.startswith(qwen_instantx.ZERO_PREFIXES))
    assert zero == ["controlnet_blocks.0.bias", "controlnet_blocks.0.weight", "controlnet_x_embedder.bias",
                    "controlnet_x_embedder.weight"]
    assert all(not sd[k].any() for k in zero)
    assert cn.controlnet_x_embedder.weight.shape == (32, 64)  # 16 latent channels x 2 x 2, not 68 (inpaint)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
    for bad in (2, -1):
        with pytest.raises(ValueError, match=f"depth {bad} is out of range.*1 transformer blocks.*1 to 1"):
            qwen_instantx.create(base, depth=bad)
    assert weight_hash(base.diffusion_model) == before, "create modified the base MODEL"


def test_untrained_controlnet_changes_nothing_and_a_trained_one_steers(qwen):
    qwen_instantx = layout()
    model, vae = qwen
    before = weight_hash(model.model.diffusion_model)
    zero = qwen_instantx.wrap(qwen_instantx.create(model.model))
    plain = sample(model, vae)
    assert plain.shape == (1, 16, 1, R // 8, R // 8)
    with_zero = sample(model, vae, zero, hint_image())
    assert torch.equal(plain, with_zero), (plain - with_zero).abs().max()
    trained = qwen_instantx.wrap(perturbed(zero.control_model))
    steered = sample(model, vae, trained, hint_image())
    other_hint = sample(model, vae, trained, hint_image(8))
    assert (steered - plain).abs().max() > 1e-3
    assert (steered - other_hint).abs().max() > 1e-5, "the hint does not reach the output"
    assert weight_hash(model.model.diffusion_model) == before


def test_saved_file_loads_in_the_stock_loader_with_every_key_used(qwen, controlnet_folder, monkeypatch):
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.qwen_image.controlnet as qcn
    import nodes
    import safetensors.torch

    qwen_instantx = layout()
    model, vae = qwen
    cn = perturbed(qwen_instantx.create(model.model))
    tensors = qwen_instantx.file_tensors(cn)
    assert tensors.keys() == cn.state_dict().keys()
    safetensors.torch.save_file(tensors, str(controlnet_folder / "qwen_cn.safetensors"))

    seen = {}
    stock_load = comfy.controlnet.controlnet_load_state_dict

    def record(control_model, sd):
        missing, unexpected = control_model.load_state_dict(sd, strict=False)
        seen.update(missing=list(missing), unexpected=list(unexpected))
        return stock_load(control_model, sd)

    monkeypatch.setattr(comfy.controlnet, "controlnet_load_state_dict", record)
    with tiny_widths():
        stock = nodes.ControlNetLoader().load_controlnet("qwen_cn.safetensors")[0]
    assert type(stock) is comfy.controlnet.ControlNet and type(stock.control_model) is qcn.QwenImageControlNetModel
    assert seen == {"missing": [], "unexpected": []}
    assert isinstance(stock.latent_format, comfy.latent_formats.Wan21) and stock.compression_ratio == 1
    assert not stock.concat_mask
    theirs = {k: v.float() for k, v in stock.control_model.state_dict().items()}
    ours = cn.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    # the layout's own loader (resume / CLI) reads the file back to the same module
    back = qwen_instantx.load(safetensors.torch.load_file(str(controlnet_folder / "qwen_cn.safetensors")), model.model)
    assert all(torch.equal(back.state_dict()[k], ours[k]) for k in ours)
    # and sampling with the file through the stock nodes is sampling with the in-memory ControlNet
    wrapped = qwen_instantx.wrap(cn)  # kept while its module lives, as a graph's node cache keeps outputs
    in_memory = sample(model, vae, wrapped, hint_image())
    from_file = sample(model, vae, stock, hint_image())
    assert torch.equal(in_memory, from_file)


def test_training_hint_and_control_are_what_sampling_computes(qwen, monkeypatch):
    """``hint_input`` and ``control`` (the training path) against what ``get_control`` feeds the module."""
    import comfy.ldm.qwen_image.controlnet as qcn

    qwen_instantx = layout()
    model, vae = qwen
    cn = perturbed(qwen_instantx.create(model.model))
    calls = []
    stock_forward = qcn.QwenImageControlNetModel.forward

    def forward(self, x, timesteps, context, hint=None, **kwargs):
        out = stock_forward(self, x, timesteps, context, hint=hint, **kwargs)
        calls.append(dict(x=x.clone(), timesteps=timesteps.clone(), context=context.clone(), hint=hint.clone(),
                          kwargs=set(kwargs), input=[o.clone() for o in out["input"]]))
        return out

    monkeypatch.setattr(qcn.QwenImageControlNetModel, "forward", forward)
    image = hint_image()
    wrapped = qwen_instantx.wrap(cn)
    sample(model, vae, wrapped, image, steps=1)
    monkeypatch.setattr(qcn.QwenImageControlNetModel, "forward", stock_forward)
    assert calls
    call = calls[0]
    assert call["kwargs"] == set(), "the stock ControlNet got extra conds"
    # two hints in one batch: each is encoded alone (the video VAE would read a batch as frames)
    hints = qwen_instantx.hint_input(torch.cat([image, hint_image(8)]), vae)
    assert hints.shape == (2, 16, 1, R // 8, R // 8)
    assert torch.allclose(hints[:1], call["hint"][:1], atol=1e-6, rtol=0)
    with torch.no_grad():
        out = qwen_instantx.control(cn, call["x"], hints[:1].expand(call["x"].shape[0], -1, -1, -1, -1),
                                    call["timesteps"], {"c_crossattn": call["context"]}, torch.float32)
    assert out["output"] == [] and len(out["input"]) == len(call["input"]) == 60  # main_model_double
    for a, b in zip(out["input"], call["input"], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_foreign_controlnets_and_models_are_refused(qwen, tiny_dit):
    qwen_instantx = layout()
    model, _ = qwen
    cn = qwen_instantx.create(model.model)
    qwen_instantx.check_fits(cn, model.model)
    flux = tiny_dit("flux1")
    with pytest.raises(ValueError, match="made for a Qwen-Image transformer of width 32.*the MODEL is Flux.1 dev"):
        qwen_instantx.check_fits(cn, flux.model.model)
    with pytest.raises(ValueError, match="needs a Qwen-Image model"):
        qwen_instantx.create(flux.model.model)
    inpaint = qwen_instantx.create(model.model)
    inpaint.controlnet_x_embedder = torch.nn.Linear(68, 32)
    with pytest.raises(ValueError, match="68-channel hints.*inpaint"):
        qwen_instantx.unwrap(type("CN", (), {"control_model": inpaint})())
    with pytest.raises(ValueError, match="does not fit the MODEL.*controlnet_x_embedder.weight"):
        qwen_instantx.check_fits(inpaint, model.model)
    with pytest.raises(ValueError, match="not a Qwen-Image ControlNet in InstantX's layout"):
        qwen_instantx.load({"controlnet_blocks.0.weight": torch.zeros(1)}, model.model)


def test_z_image_and_chroma_are_refused_with_the_reason(pack):
    """No stock ControlNet loader reads a Z-Image or Chroma ControlNet in ComfyUI 0.3.75: Create says so."""
    from frozentune.controlnet_zero import layouts
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroCreate
    from harness import tiny_dits2

    assert "Qwen-Image" in layouts.supported_labels()
    for family, label in (("z_image", "Z-Image"), ("chroma", "Chroma")):
        kit = tiny_dits2.kit(family, "fp32")
        with pytest.raises(ValueError, match=f"does not support {label} models: ComfyUI 0.3.75 has no ControlNet "
                                             f"loader for {label}"):
            ControlNetZeroCreate.execute(model=kit.model, seed=0)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_half_precision_base_zero_identity_and_steering(pack, precision):
    """bf16 stored and computing natively, or fp8 storage computing in fp32."""
    qwen_instantx = layout()
    model, vae = tiny_qwen.model(precision), tiny_qwen.vae()
    base = model.model
    before = weight_hash(base.diffusion_model)
    cn = qwen_instantx.create(base)
    assert torch.equal(cn.state_dict()["transformer_blocks.0.attn.to_q.weight"],
                       base.diffusion_model.state_dict()["transformer_blocks.0.attn.to_q.weight"].float())
    zero, trained = qwen_instantx.wrap(cn), qwen_instantx.wrap(perturbed(cn))
    plain = sample(model, vae)
    with_zero = sample(model, vae, zero, hint_image())
    assert torch.isfinite(plain).all() and torch.equal(plain, with_zero)
    steered = sample(model, vae, trained, hint_image())
    assert (steered - plain).abs().max() > 1e-3
    assert weight_hash(base.diffusion_model) == before


# --- training through ControlNet-Zero's Train path (layouts dispatch) ---------------------------------

def test_create_train_save_through_the_nodes_and_the_stock_loader(qwen, controlnet_folder, tmp_path, monkeypatch,
                                                                   caplog):
    import folder_paths
    import nodes

    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    qwen_instantx = layout()
    model, vae = qwen
    before = weight_hash(model.model.diffusion_model)
    fresh = cz.create(model)
    assert qwen_instantx.owns(fresh.control_model)
    fresh_sd = {k: v.clone() for k, v in fresh.control_model.state_dict().items()}
    trained = cz.train_node(model, tiny_qwen.PromptClip(), vae, fresh, gradient_checkpointing=True,
                            mixed_precision="auto", run_name="test_qwen").args[0]
    cn = trained.control_model
    assert all(torch.equal(v, fresh.control_model.state_dict()[k]) for k, v in fresh_sd.items()), \
        "training modified the input CONTROL_NET"
    assert weight_hash(model.model.diffusion_model) == before, "training modified the base MODEL"
    assert cn.controlnet_blocks[0].weight.abs().max() > 0, "the zero-initialized output layer did not move"
    assert cn.controlnet_x_embedder.weight.abs().max() > 0  # its first gradient comes in step 2

    name = ControlNetZeroSave.execute(control_net=trained, filename="cz/qwen", dtype="fp32").args[0]
    with caplog.at_level(logging.WARNING), tiny_widths():
        stock = nodes.ControlNetLoader().load_controlnet(name)[0]
    assert "missing controlnet keys" not in caplog.text
    theirs = stock.control_model.state_dict()
    assert all(torch.equal(theirs[k].float(), v.float()) for k, v in cn.state_dict().items())
    plain = sample(model, vae)
    from_file = sample(model, vae, stock, hint_image())
    in_memory = sample(model, vae, trained, hint_image())
    assert torch.equal(in_memory, from_file) and not torch.equal(plain, from_file)


def test_textual_inversion_takes_qwen_image_and_z_image_and_refuses_a_clip_without_their_encoder(qwen):
    """ComfyUI 0.3.75 builds the Qwen2.5-VL and Qwen3 tokenizers without the embedding directory; textual inversion
    reads their words on a private tokenizer (tests/node/test_textual_inversion_qwen_zimage.py), so both families
    are supported, and a CLIP without their encoder (this stand-in) is refused naming what it needs."""
    from frozentune.textual_inversion import word_trainer as ti
    from harness import tiny_dits2

    model, _ = qwen
    z_image = tiny_dits2.kit("z_image", "fp32")
    assert {"qwen_image", "z_image"} <= set(ti.supported_families())
    for m in (model, z_image.model, tiny_dits2.kit("chroma", "fp32").model):
        ti.refuse_without_embedding_words(m)  # every encoder's words are read (stock or on the private tokenizer)
    with pytest.raises(ValueError, match=r"on Qwen-Image trains vectors for Qwen2.5-VL, but this CLIP runs none"):
        ti.encoder_keys(model, tiny_qwen.PromptClip())
    with pytest.raises(ValueError, match=r"on Z-Image trains vectors for Qwen3, but this CLIP runs none"):
        ti.encoder_keys(z_image.model, tiny_qwen.PromptClip())


def test_training_preview_draws_qwen_image_latents(qwen, tmp_path, monkeypatch):
    """The Train node's preview (Euler through the training forward) on 5-D Wan-2.1 latents."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    model, vae = qwen
    out = cz.train_node(model, tiny_qwen.PromptClip(), vae, cz.create(model), pairs=2, steps=1, prompt_dropout=0.0,
                        run_name="test_qwen_preview", preview_every=1)
    grid = out.args[2]
    assert grid.ndim == 4 and grid.shape[-1] == 3 and torch.isfinite(grid).all() and grid.shape[1] > 1


def _texts(model, vae):
    return cz.caption_texts(model.model, vae, tiny_qwen.PromptClip())


def _dataset(count: int, seed: int, texts):
    """Targets and hints as 5-D latents ``[N, 16, 1, R/8, R/8]`` that show the disk (``cz.disk_latents``, 16 mixed
    channels: the tiny Wan VAE maps every disk to almost the same latent)."""
    return cz.disk_set(count, seed, texts, lambda images: cz.disk_latents(images, 16, mixed=True).unsqueeze(2))


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_half_precision_base_trains(qwen, precision):
    """A bf16 base (computing natively, bf16 autocast) or an fp8-stored base (fp32 compute) trains the fp32
    ControlNet: finite losses, the zero-initialized layers move, the base is untouched."""
    model = tiny_qwen.model(precision)
    result = cz.train_fresh_around_a_half_base(model, layout(), _dataset(4, 1, _texts(*qwen)), precision, 3)
    assert result.control_model.controlnet_blocks[0].weight.abs().max() > 0
    assert result.control_model.controlnet_x_embedder.weight.abs().max() > 0


def _wider_model(heads: int = 16, layers: int = 1):
    """A tiny Qwen-Image wider than ``harness.tiny_qwen``'s (default 16 heads of 16: width 256), random weights.

    The learning check needs the width: the output projection maps the width to 64 numbers per token (16
    latent channels x 2 x 2) after ``norm_out``'s LayerNorm, so a narrower model reaches only part of them.
    True / shuffled held-out loss after 150 steps at lr 3e-3 (1 block, measured here): width 32 1.000 (lr 1e-2
    too), 64 0.968, 128 0.71-0.74, 256 0.41-0.52 (seeds 0-2); width 64 with 2 blocks took 500 steps to 0.806.
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from harness import tiny_models

    config = comfy.supported_models.QwenImage(dict(tiny_qwen.UNET_CONFIG, num_attention_heads=heads,
                                                   num_layers=layers))
    config.set_inference_dtype(torch.float32, None)
    meta = config.get_model({}, device=torch.device("meta")).diffusion_model
    base = config.get_model({})
    base.load_model_weights(tiny_models.random_state_dict(meta, 5), "")
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@pytest.fixture()
def one_thread():
    """One torch thread, as conftest gives the tiny-DiT tests: ops this small spend most of two threads' time
    synchronizing on a shared 2-core machine (the learning check's 150 steps, one after the other on a busy
    machine: 98 s on two threads, 15 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STEPS = 150
LEARNING_RATE = 3e-3


@pytest.mark.slow  # 150 training steps on a width-256 one-block model (5-20 s on a shared 2-core CPU)
def test_true_hints_beat_shuffled_hints_on_held_out_disks(qwen, one_thread):
    """The learning check of test_controlnet_zero_learning.py on a tiny Qwen-Image (flow, 5-D latent hints).

    The tiny random Wan VAE maps every disk to almost the same latent, so targets and hints go in as pooled
    latents that show the disk; everything else is the real path: the ControlNet this layout creates (1 block,
    the default 5 capped at the base's), ``training_run.train`` and ``evaluate``. Measured ratios (true /
    shuffled): 0.409 here; 0.41-0.52 for training seeds 0-5, 0.41-0.45 for 3 other data and weight seeds.
    """
    qwen_instantx = layout()
    model = _wider_model()
    texts = _texts(model, qwen[1])

    def one_block_256_wide(cn):
        assert qwen_instantx.depth_of(cn) == 1 and cn.inner_dim == 256

    cz.true_hints_beat_shuffled_hints(model, qwen_instantx.create, _dataset(32, 1, texts), _dataset(16, 2, texts),
                                      STEPS, LEARNING_RATE, "Qwen-Image-tiny width 256, 1 block",
                                      check=one_block_256_wide)


# --- the CLI on split files (controlnet_zero.train) ----------------------------------------------------

@pytest.fixture()
def split_files(pack):
    """The tiny Qwen-Image as the split files Qwen-Image ships as (``harness.tiny_stand_ins2``: diffusion model, a
    Qwen2.5-VL text encoder whose language model is 32 wide, the Wan-2.1 VAE), read through the stock
    ``comfy.sd`` loaders under the tiny-DiT detection and text-encoder shims (answering only for the tiny files)."""
    from harness import tiny_dits, tiny_stand_ins2

    had_detection, had_te = tiny_dits.uninstall_detection_shim(), tiny_dits.uninstall_text_encoder_shim()
    tiny_dits.install_detection_shim()
    tiny_dits.install_text_encoder_shim()
    yield {"diffusion_model": str(tiny_stand_ins2.path("qwen_image")),
           "text_encoders": [str(tiny_stand_ins2.path("qwen25_7b"))], "vae": str(tiny_stand_ins2.path("wan21_vae"))}
    if not had_te:
        tiny_dits.uninstall_text_encoder_shim()
    if not had_detection:
        tiny_dits.uninstall_detection_shim()


def test_cli_trains_split_files_into_a_file_the_stock_loader_reads(qwen, split_files, tmp_path, caplog):
    """``controlnet_zero.train`` on diffusion_model + text_encoders + vae: the real (tiny) Qwen2.5-VL encodes the
    captions, the Wan-2.1 VAE the 5-D target and hint latents; the InstantX-layout file it writes loads whole in
    the stock loader and steers stock sampling."""
    import time

    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.qwen_image.controlnet as qcn
    import safetensors
    import safetensors.torch

    from frozentune.controlnet_zero import train, training_run
    from harness import disks

    model, vae = qwen
    data = disks.write_folder(tmp_path / "data", count=2, size=R)
    out = tmp_path / "cn" / "qwen.safetensors"
    config = tmp_path / "train.toml"
    config.write_text("\n".join([
        f'diffusion_model = "{split_files["diffusion_model"]}"', f"text_encoders = {json.dumps(split_files['text_encoders'])}",
        f'vae = "{split_files["vae"]}"', f'dataset = "{data}"', f'output = "{out}"', "steps = 2", "batch_size = 2",
        f"resolution = {R}", "learning_rate = 1e-3", "seed = 3", 'mixed_precision = "fp32"',
        "gradient_checkpointing = false", "eval_rows = 2"]))
    start = time.perf_counter()
    assert train.main(["--config", str(config)]) == 0
    seconds = time.perf_counter() - start
    assert out.is_file()

    caplog.clear()
    with tiny_widths(), caplog.at_level(logging.DEBUG):
        stock = comfy.controlnet.load_controlnet(str(out))
    assert "missing controlnet keys" not in caplog.text and "unexpected controlnet keys" not in caplog.text
    assert type(stock.control_model) is qcn.QwenImageControlNetModel
    assert isinstance(stock.latent_format, comfy.latent_formats.Wan21)
    written = safetensors.torch.load_file(str(out))
    assert written.keys() == stock.control_model.state_dict().keys()
    assert written["controlnet_blocks.0.weight"].any(), "the zero-initialized blocks did not train"
    theirs = stock.control_model.state_dict()
    assert all(torch.equal(theirs[k].float(), v) for k, v in written.items())
    with safetensors.safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["controlnet_zero.base_checkpoint"] == "frozentune_tiny_qwen_image_v2.safetensors"
    assert meta["controlnet_zero.depth"] == "1" and training_run.GUIDANCE_KEY not in meta
    record = json.loads((out.parent / "qwen_run" / "losses.json").read_text())
    assert len(record["losses"]) == 2 and all(math.isfinite(v) for v in record["losses"])
    # the file's base (the same tiny weights, here built in memory) samples differently with it than without
    plain = sample(model, vae)
    assert not torch.equal(plain, sample(model, vae, stock, hint_image()))
    log.warning("ControlNet-Zero CLI on the tiny Qwen-Image split files: 2 steps in %.1f s", seconds)
