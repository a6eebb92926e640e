"""ControlNet-Zero on SD3/SD3.5: the "sd3_diffusers" layout (issue 23), on the tiny SD3 (stock-detected, no shim).

The oracles are stock: ``ControlNetApplyAdvanced`` (+ the VAE, latent hints) and ``KSampler`` sample with
the ControlNet the layout creates; ``ControlNetLoader`` reads the file it writes (diffusers' key names,
``comfy/controlnet.py`` ``load_controlnet_mmdit``); ``comfy.controlnet.ControlNet.get_control`` is recorded
to check that the layout's hint and control forward (what training uses) are what sampling computes; and
diffusers' own ``SD3ControlNetModel.from_transformer`` (a test dependency) makes the same file and outputs.
The tiny SD3 has 2 joint blocks (MMDiT-X second attention in block 0, QK-norm), so the default depth (12,
diffusers' ``from_transformer``) is capped at 1 block: the base's last block is pre-only.
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import controlnet_zero_helpers as cz
from harness import tiny_dits
from harness.controlnet_zero_helpers import R, hint_image
from harness.hashing import weight_hash

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def sd3(tiny_dit, pack):
    return tiny_dit("sd3")


@pytest.fixture(scope="module")
def prompts(sd3):
    return cz.prompts(sd3)


def layout():
    return cz.layout("sd3_diffusers")


def sample(model, prompts, vae, control_net=None, hint=None, steps: int = 2) -> torch.Tensor:
    return cz.sample(model, prompts, vae, control_net, hint, steps, cfg=4.0)


def perturbed(cn: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``cn`` whose zero-initialized parts are random (a stand-in for a trained ControlNet)."""
    return cz.perturbed(cn, ("controlnet_blocks.", "pos_embed_input."), 0.05)


def test_create_copies_the_base_and_zeroes_the_new_parts(sd3):
    sd3_diffusers = layout()
    base = sd3.model.model
    before = weight_hash(base.diffusion_model)
    cn = sd3_diffusers.create(base)
    assert len(cn.joint_blocks) == 1 and len(cn.controlnet_blocks) == 1  # default 12, capped at 2 - 1
    base_sd = base.diffusion_model.state_dict()
    sd = cn.state_dict()
    copied = [k for k in sd if not k.startswith(sd3_diffusers.ZERO_PREFIXES)]
    assert {"x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "y_embedder.mlp.0.weight",
            "context_embedder.weight", "joint_blocks.0.x_block.attn2.qkv.weight",
            "joint_blocks.0.context_block.attn.ln_q.weight"} <= set(copied)
    for k in copied:
        assert torch.equal(sd[k], base_sd[k].float()), k
    zero = [k for k in sd if k.startswith(sd3_diffusers.ZERO_PREFIXES)]
    assert sorted(zero) == ["controlnet_blocks.0.bias", "controlnet_blocks.0.weight", "pos_embed_input.proj.bias",
                            "pos_embed_input.proj.weight"]
    assert all(not sd[k].any() for k in zero)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
    assert len(sd3_diffusers.create(base, depth=1).joint_blocks) == 1
    for bad in (2, 3, -1):
        with pytest.raises(ValueError, match=f"depth {bad} is out of range.*2 joint blocks.*1 to 1"):
            sd3_diffusers.create(base, depth=bad)
    assert weight_hash(base.diffusion_model) == before, "create modified the base MODEL"


def test_untrained_controlnet_changes_nothing_and_a_trained_one_steers(sd3, prompts):
    sd3_diffusers = layout()
    before = weight_hash(sd3.model.model.diffusion_model)
    # (each CONTROL_NET is kept while its module lives, as a graph's node cache does: ComfyUI's model list
    # must not hold a ControlNet whose patcher is gone while its module is still referenced)
    zero = sd3_diffusers.wrap(sd3_diffusers.create(sd3.model.model))
    plain = sample(sd3.model, prompts, sd3.vae)
    with_zero = sample(sd3.model, prompts, sd3.vae, zero, hint_image())
    assert torch.equal(plain, with_zero), (plain - with_zero).abs().max()
    trained = sd3_diffusers.wrap(perturbed(zero.control_model))
    steered = sample(sd3.model, prompts, sd3.vae, trained, hint_image())
    other_hint = sample(sd3.model, prompts, sd3.vae, trained, hint_image(8))
    assert (steered - plain).abs().max() > 1e-3
    assert (steered - other_hint).abs().max() > 1e-5, "the hint does not reach the output"
    assert weight_hash(sd3.model.model.diffusion_model) == before


def test_saved_file_loads_in_the_stock_loader_with_every_key_used(sd3, prompts, controlnet_folder, monkeypatch):
    import comfy.cldm.mmdit
    import comfy.controlnet
    import comfy.utils
    import nodes
    import safetensors.torch

    sd3_diffusers = layout()
    cn = perturbed(sd3_diffusers.create(sd3.model.model))
    tensors = sd3_diffusers.file_tensors(cn)
    assert "transformer_blocks.0.attn.add_q_proj.weight" in tensors and "pos_embed.pos_embed" in tensors
    assert not any(k.startswith(("joint_blocks.", "x_embedder.", "final_layer.")) for k in tensors)
    safetensors.torch.save_file(tensors, str(controlnet_folder / "sd3_cn.safetensors"))

    seen = {}
    stock_load = comfy.controlnet.controlnet_load_state_dict

    def record(control_model, sd):
        missing, unexpected = control_model.load_state_dict(sd, strict=False)
        seen.update(missing=list(missing), unexpected=set(unexpected), module_keys=set(control_model.state_dict()))
        return stock_load(control_model, sd)

    monkeypatch.setattr(comfy.controlnet, "controlnet_load_state_dict", record)
    with tiny_dits.without_detection_shim():  # ComfyUI's own shape detection reads the file
        stock = nodes.ControlNetLoader().load_controlnet("sd3_cn.safetensors")[0]
    assert type(stock) is comfy.controlnet.ControlNet and isinstance(stock.control_model, comfy.cldm.mmdit.ControlNet)
    assert seen["missing"] == []
    # The stock loader loads the converted keys and also hands the file's raw diffusers keys to load_state_dict
    # (they are its "unexpected" keys, for every diffusers-layout SD3 ControlNet): each of those must be one it
    # converted into a module weight, and every file key must reach the module.
    key_map = comfy.utils.mmdit_to_diffusers({"depth": cn.depth, "num_blocks": len(cn.joint_blocks)})
    target = {k: (v if isinstance(v, str) else v[0]) for k, v in key_map.items()}
    for key in tensors:
        assert key in seen["module_keys"] or target.get(key) in seen["module_keys"], key
    assert all(k in tensors and target.get(k) in seen["module_keys"] for k in seen["unexpected"])
    theirs = {k: v.float() for k, v in stock.control_model.state_dict().items()}
    ours = cn.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

    # the layout's own loader (resume / CLI) reads the file back to the same module
    back = sd3_diffusers.load(safetensors.torch.load_file(str(controlnet_folder / "sd3_cn.safetensors")),
                              sd3.model.model)
    assert all(torch.equal(back.state_dict()[k], ours[k]) for k in ours)

    # and sampling with the file through the stock nodes is sampling with the in-memory ControlNet
    wrapped = sd3_diffusers.wrap(cn)
    in_memory = sample(sd3.model, prompts, sd3.vae, wrapped, hint_image())
    from_file = sample(sd3.model, prompts, sd3.vae, stock, hint_image())
    assert torch.equal(in_memory, from_file)


def test_training_hint_and_control_are_what_sampling_computes(sd3, prompts, monkeypatch):
    """``hint_input`` and ``control`` (the training path) against what ``get_control`` feeds the module."""
    import comfy.cldm.mmdit

    sd3_diffusers = layout()
    cn = perturbed(sd3_diffusers.create(sd3.model.model))
    calls = []
    stock_forward = comfy.cldm.mmdit.ControlNet.forward

    def forward(self, x, timesteps, y=None, context=None, hint=None):
        out = stock_forward(self, x, timesteps, y=y, context=context, hint=hint)
        calls.append(dict(x=x.clone(), timesteps=timesteps.clone(), y=y.clone(), context=context.clone(),
                          hint=hint.clone(), output=[o.clone() for o in out["output"]]))
        return out

    monkeypatch.setattr(comfy.cldm.mmdit.ControlNet, "forward", forward)
    image = hint_image()
    wrapped = sd3_diffusers.wrap(cn)
    sample(sd3.model, prompts, sd3.vae, wrapped, image, steps=1)
    monkeypatch.setattr(comfy.cldm.mmdit.ControlNet, "forward", stock_forward)
    assert calls
    call = calls[0]
    hint = sd3_diffusers.hint_input(image, sd3.vae)
    assert hint.shape == (1, 16, R // 8, R // 8)
    assert torch.allclose(hint, call["hint"][:1], atol=1e-6, rtol=0)
    with torch.no_grad():
        out = sd3_diffusers.control(cn, call["x"], hint.expand(call["x"].shape[0], -1, -1, -1), call["timesteps"],
                                    {"c_crossattn": call["context"], "y": call["y"]}, torch.float32)
    assert set(out) == {"input", "middle", "output"} and len(out["output"]) == len(call["output"])
    for a, b in zip(out["output"], call["output"], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_foreign_controlnets_and_models_are_refused_with_both_names(sd3, tiny_dit, tiny_checkpoints):
    import comfy.controlnet
    import nodes

    sd3_diffusers = layout()
    cn = sd3_diffusers.create(sd3.model.model)
    sd3_diffusers.check_fits(cn, sd3.model.model)
    flux = tiny_dit("flux1")
    with pytest.raises(ValueError, match="made for an SD3/SD3.5 MMDiT of width 128.*the MODEL is Flux.1 dev"):
        sd3_diffusers.check_fits(cn, flux.model.model)
    with pytest.raises(ValueError, match="needs an SD3/SD3.5"):
        sd3_diffusers.create(flux.model.model)
    sd15 = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[0]
    from frozentune.controlnet_zero import network

    with pytest.raises(ValueError, match="not an SD3 ControlNet in diffusers' layout"):
        sd3_diffusers.unwrap(network.wrap(network.create(sd15.model)))
    assert isinstance(sd3_diffusers.unwrap(sd3_diffusers.wrap(cn)), torch.nn.Module)
    # a ControlNet of another width (a shape of a different SD3) does not fit
    narrow = sd3_diffusers.create(sd3.model.model)
    narrow.x_embedder.proj.weight = torch.nn.Parameter(torch.zeros(64, 16, 2, 2))
    with pytest.raises(ValueError, match="does not fit the MODEL.*width 64.*width 128"):
        sd3_diffusers.check_fits(narrow, sd3.model.model)
    # files: an ldm ControlNet, or Stability's SD3.5 layout, are not continued as SD3 diffusers-layout ones
    ldm = network.file_tensors(network.create(sd15.model))
    with pytest.raises(ValueError, match="^not an SD3 ControlNet in diffusers' layout"):
        sd3_diffusers.load(ldm, sd3.model.model)
    stability = {"transformer_blocks.0.adaLN_modulation.1.bias": torch.zeros(1), "controlnet_blocks.0.weight":
                 torch.zeros(1), "pos_embed_input.proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="Stability's SD3.5 layout"):
        sd3_diffusers.load(stability, sd3.model.model)
    assert isinstance(comfy.controlnet.ControlNet, type)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_half_precision_base_zero_identity_and_steering(tiny_dit, pack, precision):
    """bf16 stored and computing natively, or fp8 storage (UNETLoader's fp8_e4m3fn) computing in fp32."""

    sd3_diffusers = layout()
    sd3 = tiny_dit("sd3")
    kit = tiny_dits.load("sd3", dtype="bf16") if precision == "bf16" else tiny_dits.load("sd3", weight_dtype="fp8")
    base = kit.model.model
    stored = {torch.bfloat16} if precision == "bf16" else {torch.float8_e4m3fn}
    assert stored <= {p.dtype for p in base.diffusion_model.parameters()}
    before = weight_hash(base.diffusion_model)
    cn = sd3_diffusers.create(base)
    base_sd = base.diffusion_model.state_dict()
    assert torch.equal(cn.state_dict()["joint_blocks.0.x_block.attn.qkv.weight"],
                       base_sd["joint_blocks.0.x_block.attn.qkv.weight"].float())
    prompts = (sd3.encode("a red disk"), sd3.encode(""))
    zero, trained = sd3_diffusers.wrap(cn), sd3_diffusers.wrap(perturbed(cn))
    plain = sample(kit.model, prompts, sd3.vae)
    with_zero = sample(kit.model, prompts, sd3.vae, zero, hint_image())
    assert torch.isfinite(plain).all() and torch.equal(plain, with_zero)
    steered = sample(kit.model, prompts, sd3.vae, trained, hint_image())
    assert (steered - plain).abs().max() > 1e-3
    assert weight_hash(base.diffusion_model) == before


# --- training through ControlNet-Zero's Train path (layouts dispatch) ---------------------------------

def train_node(sd3, control_net, **overrides):
    args = {"gradient_checkpointing": True, "mixed_precision": "auto", "run_name": "test_sd3", **overrides}
    return cz.train_node(sd3.model, sd3.clip, sd3.vae, control_net, **args).args[0]


def test_create_train_save_through_the_nodes_and_the_stock_loader(sd3, prompts, controlnet_folder, tmp_path,
                                                                   monkeypatch, caplog):
    import folder_paths
    import nodes

    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroCreate, ControlNetZeroSave

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    sd3_diffusers = layout()
    before = weight_hash(sd3.model.model.diffusion_model)
    with torch.inference_mode():
        fresh = ControlNetZeroCreate.execute(model=sd3.model, seed=0).args[0]
    assert sd3_diffusers.owns(fresh.control_model) and len(fresh.control_model.joint_blocks) == 1
    fresh_sd = {k: v.clone() for k, v in fresh.control_model.state_dict().items()}
    trained = train_node(sd3, fresh, steps=2)
    cn = trained.control_model
    assert all(torch.equal(v, fresh.control_model.state_dict()[k]) for k, v in fresh_sd.items()), \
        "training modified the input CONTROL_NET"
    assert weight_hash(sd3.model.model.diffusion_model) == before, "training modified the base MODEL"
    assert cn.controlnet_blocks[0].weight.abs().max() > 0, "the zero-initialized output layer did not move"
    # As at step 0 of the reference: the zero output layer blocks every gradient behind it, so the (zero)
    # hint embedding gets its first gradient only in step 2.
    assert cn.pos_embed_input.proj.weight.abs().max() > 0

    name = ControlNetZeroSave.execute(control_net=trained, filename="cz/sd3", dtype="fp32").args[0]
    with caplog.at_level(logging.WARNING):
        stock = nodes.ControlNetLoader().load_controlnet(name)[0]
    assert "missing controlnet keys" not in caplog.text
    theirs = stock.control_model.state_dict()
    assert all(torch.equal(theirs[k].float(), v.float()) for k, v in cn.state_dict().items())
    plain = sample(sd3.model, prompts, sd3.vae)
    from_file = sample(sd3.model, prompts, sd3.vae, stock, hint_image())
    in_memory = sample(sd3.model, prompts, sd3.vae, trained, hint_image())
    assert torch.equal(in_memory, from_file) and not torch.equal(plain, from_file)


def _texts(sd3):
    return cz.caption_texts(sd3.model.model, sd3.vae, sd3.clip)


def _dataset(count: int, seed: int, texts):
    """Targets and hints as pooled latents that show the disk (``cz.disk_latents``, 16 mixed channels)."""
    return cz.disk_set(count, seed, texts, lambda images: cz.disk_latents(images, 16, mixed=True))


# Measured here (held-out loss, true / shuffled hints, 16 rows): lr 1e-3: 0.999 after 80 steps, 0.919 after
# 200, 0.801 after 300, 0.726 after 400; lr 3e-3: 0.818 after 150, 0.701 after 250 (train loss 1.84 -> 0.36).
STEPS = 250
LEARNING_RATE = 3e-3


@pytest.mark.slow  # 250 training steps (~35-60 s on a shared 2-core CPU)
def test_true_hints_beat_shuffled_hints_on_held_out_disks(sd3):
    """The learning check of test_controlnet_zero_learning.py on the tiny SD3 (flow objective, latent hints).

    The tiny random VAE maps every disk to almost the same latent, so both the targets and the hints go
    in as pooled latents that show the disk; everything else is the real path: the SD3 ControlNet this
    layout creates, the cached conds of the real tiny CLIPs, ``training_run.train`` and ``evaluate``.
    """
    sd3_diffusers = layout()
    texts = _texts(sd3)
    cz.true_hints_beat_shuffled_hints(sd3.model, sd3_diffusers.create, _dataset(32, 1, texts), _dataset(16, 2, texts),
                                      STEPS, LEARNING_RATE, "SD3-tiny")


def test_gradient_checkpointing_covers_both_networks_with_equal_gradients(sd3):
    """Checkpointing both MMDiTs (the base adds the control in place after a checkpointed block) changes no
    gradient, and every ControlNet weight gets one."""
    import comfy.model_management as mm

    sd3_diffusers = layout()
    model = sd3.model
    data = _dataset(2, 1, _texts(sd3))
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    with torch.inference_mode(False):
        cn = sd3_diffusers.trainable_copy(perturbed(sd3_diffusers.create(model.model)), device)
    off_loss, off_bytes, off_grads = cz.loss_bytes_and_grads(model, cn, data, False)
    on_loss, on_bytes, on_grads = cz.loss_bytes_and_grads(model, cn, data, True)
    log.warning("ControlNet-Zero checkpointing (SD3-tiny, batch 2, %d px): retained for backward %.2f MiB off, "
                "%.2f MiB on, ratio %.3f", R, off_bytes / 2**20, on_bytes / 2**20, on_bytes / off_bytes)
    assert on_bytes < off_bytes
    assert abs(on_loss - off_loss) <= 1e-6 * abs(off_loss), (on_loss, off_loss)
    assert on_grads.keys() == off_grads.keys()
    # the last block's text stream after its attention (output projection, MLP) feeds nothing, as in diffusers
    last = len(cn.joint_blocks) - 1
    unused = {n for n, _ in cn.named_parameters() if n.startswith(f"joint_blocks.{last}.context_block.")
              and not n.startswith((f"joint_blocks.{last}.context_block.attn.qkv",
                                    f"joint_blocks.{last}.context_block.attn.ln_",
                                    f"joint_blocks.{last}.context_block.adaLN_modulation"))}
    assert {n for n, _ in cn.named_parameters()} - on_grads.keys() == unused
    for name, g in off_grads.items():
        assert torch.allclose(on_grads[name], g, rtol=1e-4, atol=1e-7 * g.abs().max().item() + 1e-12), name


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_half_precision_base_trains(tiny_dit, pack, precision):
    """A bf16 base (computing natively, bf16 autocast) or an fp8-stored base (fp32 compute) trains the fp32
    ControlNet: finite losses, the zero-initialized layers move, the base is untouched."""
    sd3 = tiny_dit("sd3")
    kit = tiny_dits.load("sd3", dtype="bf16") if precision == "bf16" else tiny_dits.load("sd3", weight_dtype="fp8")
    result = cz.train_fresh_around_a_half_base(kit.model, layout(), _dataset(4, 1, _texts(sd3)), precision, 3)
    assert result.control_model.controlnet_blocks[0].weight.abs().max() > 0
    assert result.control_model.pos_embed_input.proj.weight.abs().max() > 0


@pytest.mark.slow  # three short training runs through the node (~10 s)
def test_cancel_and_resume_match_an_uninterrupted_run(sd3, controlnet_folder, tmp_path, monkeypatch):
    """Checkpoints hold the diffusers-layout file (loadable in ComfyUI); resume maps it back (module_tensors)."""
    import folder_paths
    import safetensors.torch

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))

    def train(run_name, resume=False):
        return train_node(sd3, cz.create(sd3.model), run_name=run_name, resume=resume, steps=4, batch_size=1,
                          gradient_accumulation=2, checkpoint_every=2, learning_rate=1e-3)

    def checkpoint_in_the_files_layout():
        step = tmp_path / "output" / "controlnet_zero" / "cut" / "run_001" / "step_000002"
        assert step.is_dir()
        saved = safetensors.torch.load_file(str(step / "controlnet.safetensors"))
        assert "transformer_blocks.0.attn.add_q_proj.weight" in saved, "checkpoints are in the file's layout"

    cz.resume_matches_an_uninterrupted_run(train, checkpoint_in_the_files_layout)


@pytest.mark.half
def test_create_from_a_scaled_fp8_base_copies_dequantized_weights(tiny_dit, pack):
    """A scaled-fp8 base (as ``sd3.5_large_fp8_scaled``: ``weight / scale_weight`` in fp8 + the ``scaled_fp8``
    marker, ComfyUI's ``scaled_fp8_ops``) gives a ControlNet holding the weights the base computes with."""
    import comfy.sd

    sd3_diffusers = layout()
    sd = tiny_dits.diffusion_model_state_dict("sd3")
    scaled = {}
    for k, w in sd.items():
        if k.endswith(".weight") and w.ndim == 2:
            scale = w.abs().max() / 448.0
            scaled[k] = (w / scale).to(torch.float8_e4m3fn)
            scaled[k[: -len("weight")] + "scale_weight"] = scale.float().reshape(())
        else:
            scaled[k] = w
    scaled["scaled_fp8"] = torch.empty((), dtype=torch.float8_e4m3fn)
    model = comfy.sd.load_diffusion_model_state_dict(scaled)
    dm = model.model.diffusion_model
    qkv = dm.joint_blocks[0].x_block.attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and float(qkv.scale_weight) != 1.0
    cn = sd3_diffusers.create(model.model)
    want = qkv.weight.float() * qkv.scale_weight.float()
    assert torch.equal(cn.joint_blocks[0].x_block.attn.qkv.weight, want)
    assert not torch.equal(cn.joint_blocks[0].x_block.attn.qkv.weight, qkv.weight.float())
    assert torch.equal(cn.x_embedder.proj.weight, sd["x_embedder.proj.weight"])  # a conv: not scaled


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_file_loads_without_missing_keys(sd3, controlnet_folder, monkeypatch, dtype):
    import comfy.controlnet
    import nodes

    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    sd3_diffusers = layout()
    cn = perturbed(sd3_diffusers.create(sd3.model.model))
    wrapped = sd3_diffusers.wrap(cn)
    name = ControlNetZeroSave.execute(control_net=wrapped, filename=f"sd3_{dtype}", dtype=dtype).args[0]
    seen = {}
    stock_load = comfy.controlnet.controlnet_load_state_dict

    def record(control_model, sd):
        seen["missing"] = list(control_model.load_state_dict(sd, strict=False)[0])
        return stock_load(control_model, sd)

    monkeypatch.setattr(comfy.controlnet, "controlnet_load_state_dict", record)
    stock = nodes.ControlNetLoader().load_controlnet(name)[0]
    assert seen["missing"] == []
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    theirs = stock.control_model.state_dict()
    for k, v in cn.state_dict().items():
        assert torch.equal(theirs[k].float(), v.to(half).float()), k


def _diffusers_transformer(base):
    """The tiny SD3 base as diffusers' ``SD3Transformer2DModel`` (its weights through ``to_diffusers``)."""
    from diffusers import SD3Transformer2DModel

    sd3_diffusers = layout()
    cfg = base.model_config.unet_config
    hidden = 64 * cfg["depth"]
    transformer = SD3Transformer2DModel(
        sample_size=cfg["pos_embed_max_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
        num_layers=len(base.diffusion_model.joint_blocks), attention_head_dim=64, num_attention_heads=cfg["depth"],
        joint_attention_dim=cfg["context_embedder_config"]["params"]["in_features"], caption_projection_dim=hidden,
        pooled_projection_dim=cfg["adm_in_channels"], out_channels=cfg["out_channels"],
        pos_embed_max_size=cfg["pos_embed_max_size"], dual_attention_layers=tuple(cfg["x_block_self_attn_layers"]),
        qk_norm="rms_norm")
    sd = {k: v.float() for k, v in base.diffusion_model.state_dict().items()}
    tensors, used = sd3_diffusers.to_diffusers(sd, cfg["depth"], len(base.diffusion_model.joint_blocks))
    assert used == set(sd)
    transformer.load_state_dict(tensors, strict=True)
    return transformer.eval()


def test_file_is_what_diffusers_sd3_controlnet_from_transformer_makes_and_computes_alike(sd3):
    """Against diffusers itself: ``SD3ControlNetModel.from_transformer`` on the same base (1 layer, no extra
    conditioning channels) has exactly our file's keys and values, and, trained-looking, the same outputs."""
    from diffusers import SD3ControlNetModel

    sd3_diffusers = layout()
    base = sd3.model.model
    transformer = _diffusers_transformer(base)
    reference = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0)
    cn = cz.file_is_diffusers(sd3_diffusers, base, reference, perturbed)
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    context, y = torch.randn(2, 77, 4096, generator=gen), torch.randn(2, 128, generator=gen)
    timesteps = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        mine = cn(x=x, timesteps=timesteps, y=y, context=context, hint=hint)["output"]
        # ComfyUI runs this layout with a zero pooled vector, as diffusers' pipeline does for these ControlNets
        (samples,) = reference(hidden_states=x, controlnet_cond=hint, encoder_hidden_states=context,
                               pooled_projections=torch.zeros_like(y), timestep=timesteps, return_dict=False)
    assert len(samples) == 1 and mine[0].shape == samples[0].shape
    worst = (mine[0] - samples[0]).abs().max().item()
    log.warning("SD3 ControlNet vs diffusers SD3ControlNetModel: max |diff| %.3g of max |out| %.3g", worst,
                samples[0].abs().max().item())
    assert worst <= 1e-4 * samples[0].abs().max().item(), worst


@pytest.mark.slow  # two short CLI runs on the tiny SD3 checkpoint (~15 s)
def test_cli_trains_sd3_and_continues_from_its_own_file(tiny_dit, pack, tmp_path, controlnet_folder):
    """``python -m controlnet_zero.train`` in-process on the tiny SD3 checkpoint (VAE + CLIP-L/G inside, as
    ComfyUI's SD3.5 templates load it): a diffusers-layout file the stock loader reads, and ``controlnet =`` that
    file continues from it (``load``)."""
    had_shim = tiny_dits.uninstall_text_encoder_shim()
    tiny_dits.install_text_encoder_shim()  # the checkpoint's tiny CLIP widths (only files carrying them)
    try:
        _cli_runs(tmp_path, controlnet_folder)
    finally:
        if not had_shim:
            tiny_dits.uninstall_text_encoder_shim()


def _cli_runs(tmp_path, controlnet_folder):
    import nodes
    import safetensors.torch

    from frozentune.controlnet_zero import train
    from frozentune.controlnet_zero import training_run as trainer
    from harness import disks

    data = disks.write_folder(tmp_path / "data", count=2, size=R)
    first = controlnet_folder / "cli_sd3.safetensors"
    opts = {"checkpoint": str(tiny_dits.checkpoint_path("sd3")), "dataset": str(data), "output": str(first),
            "eval_rows": 0, "resume": False, "depth": 1}
    settings = trainer.TrainSettings(steps=2, batch_size=1, resolution=R, mixed_precision="fp32",
                                     gradient_checkpointing=False, learning_rate=1e-3)
    assert train.run(opts, settings) == first.resolve()
    written = safetensors.torch.load_file(str(first))
    assert "transformer_blocks.0.attn.add_q_proj.weight" in written and written["controlnet_blocks.0.weight"].any()
    stock = nodes.ControlNetLoader().load_controlnet(first.name)[0]
    assert len(stock.control_model.joint_blocks) == 1

    second = controlnet_folder / "cli_sd3_more.safetensors"
    assert train.run(dict(opts, output=str(second), controlnet=str(first)), settings) == second.resolve()
    more = safetensors.torch.load_file(str(second))
    assert more.keys() == written.keys()
    assert not torch.equal(more["controlnet_blocks.0.weight"], written["controlnet_blocks.0.weight"])
