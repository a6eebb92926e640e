"""ControlNet-Zero Create / Train / Save on the tiny models, checked against ComfyUI's own ControlNet nodes."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from harness import controlnet_zero_helpers as cz
from harness import disks
from harness.controlnet_zero_helpers import R, create
from harness.hashing import weight_hash as module_hash


def at_rest_hash(patcher) -> str:
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return module_hash(patcher.model.diffusion_model)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints, pack):
    import nodes

    with torch.inference_mode():  # loader outputs hold inference tensors, as in a real graph
        return {f: nodes.CheckpointLoaderSimple().load_checkpoint(p.name)[:3] for f, p in tiny_checkpoints.items()}


def train(model, clip, vae, control_net, **overrides):
    """Train's CONTROL_NET and loss curve (4 disks, batch 2, mixed_precision auto)."""
    out = cz.train_node(model, clip, vae, control_net, **{"mixed_precision": "auto", **overrides})
    return out.args[0], out.args[1]


def conds(clip, text="a red disk"):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0], nodes.CLIPTextEncode().encode(clip, "")[0]


def sample(model, positive, negative, control_net=None, hint=None):
    import nodes

    if control_net is not None:
        positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint,
                                                                              1.0, 0.0, 1.0)
    latent = {"samples": torch.zeros(1, 4, R // 8, R // 8)}
    return nodes.common_ksampler(model, 3, 3, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def test_fresh_controlnet_changes_nothing_and_one_step_makes_zero_convs_nonzero(loaded):
    model, clip, vae = loaded["sd15"]
    before = at_rest_hash(model)
    fresh = create(model)
    fresh_hash = module_hash(fresh.control_model)
    positive, negative = conds(clip)
    hint = disks.disks(1, R, seed=5)[1]
    plain = sample(model, positive, negative)
    controlled = sample(model, positive, negative, fresh, hint)
    assert torch.equal(plain, controlled), "a fresh ControlNet-Zero changed the sample"

    trained, _ = train(model, clip, vae, fresh, steps=1, learning_rate=1e-5, gradient_checkpointing=True)
    cn = trained.control_model
    zero_convs = [z[0] for z in cn.zero_convs] + [cn.middle_block_out[0]]
    assert all(bool(z.weight.abs().max() > 0) and bool(z.bias.abs().max() > 0) for z in zero_convs), \
        "after one step every zero conv must have moved (gradients reach them)"
    # As in the reference code: at step 0 the zero convs block every gradient behind them, so the last
    # (zero-initialized) hint conv still has no gradient in the first step and stays exactly zero.
    assert not cn.input_hint_block[14].weight.any()
    assert module_hash(fresh.control_model) == fresh_hash, "training modified the input CONTROL_NET"
    assert at_rest_hash(model) == before, "training modified the base MODEL"
    assert not torch.equal(sample(model, positive, negative, trained, hint), plain)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_file_loads_in_stock_controlnet_loader_and_matches(family, loaded, controlnet_folder, caplog):
    import nodes

    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    model, clip, vae = loaded[family]
    before = at_rest_hash(model)
    trained, curve = train(model, clip, vae, create(model), steps=2)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert at_rest_hash(model) == before, "training modified the base MODEL"

    name = ControlNetZeroSave.execute(control_net=trained, filename=f"cz/{family}", dtype="fp32").args[0]
    assert name == f"cz/{family}.safetensors" and (controlnet_folder / name).is_file()
    assert name in __import__("folder_paths").get_filename_list("controlnet")
    with caplog.at_level(logging.DEBUG):
        stock = nodes.ControlNetLoader().load_controlnet(name)[0]
    assert "missing controlnet keys" not in caplog.text and "unexpected controlnet keys" not in caplog.text

    # the loaded module computes what the trained in-memory module computes
    gen = torch.Generator().manual_seed(0)
    ctx_dim = 2048 if family == "sdxl" else 768
    inputs = dict(x=torch.randn(2, 4, 8, 8, generator=gen), hint=torch.rand(2, 3, R, R, generator=gen),
                  timesteps=torch.tensor([100.0, 800.0]), context=torch.randn(2, 77, ctx_dim, generator=gen),
                  y=torch.randn(2, 2816, generator=gen) if family == "sdxl" else None)
    with torch.no_grad():
        ours = trained.control_model(**inputs)
        theirs = stock.control_model.to(torch.float32)(**inputs)
    for a, b in zip(ours["output"] + ours["middle"], theirs["output"] + theirs["middle"], strict=True):
        assert (a - b).abs().max().item() <= 1e-5
    assert any(o.abs().max() > 0 for o in ours["output"]), "trained ControlNet outputs are all zero"

    # and so does sampling through ControlNetApplyAdvanced
    positive, negative = conds(clip)
    hint = disks.disks(1, R, seed=7)[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        in_memory = sample(model, positive, negative, trained, hint)
        from_file = sample(model, positive, negative, stock, hint)
    assert "could not be applied" not in caplog.text
    assert (in_memory - from_file).abs().max().item() <= 1e-5
    assert at_rest_hash(model) == before


@pytest.mark.half  # an fp16 file
def test_half_precision_file_loads_without_key_warnings(loaded, controlnet_folder, caplog):
    import nodes

    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    model, _, _ = loaded["sd15"]
    name = ControlNetZeroSave.execute(control_net=create(model), filename="fresh_fp16", dtype="fp16").args[0]
    with caplog.at_level(logging.DEBUG):
        stock = nodes.ControlNetLoader().load_controlnet(name)[0]
    assert "missing controlnet keys" not in caplog.text and "unexpected controlnet keys" not in caplog.text
    assert stock.control_model.zero_convs[0][0].weight.dtype in (torch.float16, torch.float32)


def test_continue_from_a_controlnet_of_another_family_is_refused(loaded):
    sd15_model, _, _ = loaded["sd15"]
    sdxl_model, sdxl_clip, sdxl_vae = loaded["sdxl"]
    with pytest.raises(ValueError, match="does not fit the MODEL.*SD1.x.*SDXL family"):
        train(sdxl_model, sdxl_clip, sdxl_vae, create(sd15_model), steps=1)


def test_folder_dataset_errors_reach_the_user_before_training(loaded, controlnet_folder):
    model, clip, vae = loaded["sd15"]
    root = disks.write_folder(controlnet_folder.parent / "input" / "set", count=3, size=R)
    (root / "conditioning" / "disk_001.png").unlink()
    with pytest.raises(ValueError, match=r"no hint of the same name.*disk_001"):
        train(model, clip, vae, create(model), dataset_folder="set", images=None, hints=None)
    with pytest.raises(ValueError, match="use one of them"):
        train(model, clip, vae, create(model), dataset_folder=str(root))


def test_cancel_keeps_last_checkpoint_and_resume_matches_uninterrupted_run(loaded, controlnet_folder):
    model, clip, vae = loaded["sd15"]

    def run(run_name, resume=False):
        return train(model, clip, vae, create(model), run_name=run_name, resume=resume, steps=4, batch_size=1,
                     gradient_accumulation=2, checkpoint_every=2, learning_rate=1e-3)[0]

    def cancel_kept_the_last_saved_state():
        run_dir = controlnet_folder.parent / "output" / "controlnet_zero" / "cut" / "run_001"
        assert sorted(p.name for p in run_dir.iterdir()) == ["step_000002"], "Cancel must keep the last saved state"

    _, resumed = cz.resume_matches_an_uninterrupted_run(run, cancel_kept_the_last_saved_state)
    assert resumed.frozentune_metadata["controlnet_zero.steps_done"] == "4"


def test_large_sets_train_from_the_disk_cache_exactly_as_from_memory(loaded, controlnet_folder, monkeypatch):
    """Above DISK_CACHE_ABOVE pairs the encodings go to safetensors shards in ComfyUI's temp folder, read lazily,
    and the cache is removed when training ends (it is not reused)."""
    from frozentune.controlnet_zero import cache
    from frozentune.nodes import controlnet_zero_nodes

    model, clip, vae = loaded["sd15"]
    fresh = create(model)
    in_memory, _ = train(model, clip, vae, fresh, run_name="memory")
    written = []
    plain_write = cache._write_shard
    monkeypatch.setattr(cache, "_write_shard", lambda path, rows: (written.append(path), plain_write(path, rows)))
    monkeypatch.setattr(controlnet_zero_nodes, "DISK_CACHE_ABOVE", 3)  # train() uses 4 pairs
    on_disk, _ = train(model, clip, vae, fresh, run_name="disk")
    temp = controlnet_folder.parent / "temp"
    assert sorted(p.name for p in written) == ["images.rank0.00000.safetensors", "texts.rank0.00000.safetensors"]
    assert all(temp in p.parents for p in written), written
    assert not any(p.exists() for p in written) and not any(temp.iterdir()), "the cache must be removed after the run"
    assert not (controlnet_folder.parent / "output" / "controlnet_zero" / "disk" / "cache").exists()
    a, b = in_memory.control_model.state_dict(), on_disk.control_model.state_dict()
    assert not torch.equal(a["zero_convs.0.0.weight"], fresh.control_model.state_dict()["zero_convs.0.0.weight"])
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


# --- half-precision tier: the tiny SD1.5 loaded in bf16/fp16 computing natively (as ComfyUI on a GPU), fp8 storage


@pytest.fixture(scope="module")
def half_loaded(tiny_checkpoints, pack):
    from harness.precision import load_checkpoint

    with torch.inference_mode():
        return {name: load_checkpoint(tiny_checkpoints["sd15"], name) for name in ("bf16", "fp16", "fp8")}


def file_dtypes(path) -> set[torch.dtype]:
    from frozentune.storage import safetensors_file as weights_file

    return {t.dtype for t in weights_file.load(path)[0].values()}


@pytest.mark.parametrize("dtype, mixed_precision", [("bf16", "bf16"), ("fp16", "auto")])
def test_half_precision_base_create_train_save_stock_load_apply_sample(dtype, mixed_precision, half_loaded,
                                                                        controlnet_folder, caplog):
    import nodes

    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    model, clip, vae = half_loaded[dtype]
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert model.model.manual_cast_dtype is None and model.model.get_dtype() == weight_dtype
    before = at_rest_hash(model)
    fresh = create(model)
    assert {p.dtype for p in fresh.control_model.parameters()} == {torch.float32}
    trained, _ = train(model, clip, vae, fresh, steps=2, mixed_precision=mixed_precision,
                       gradient_checkpointing=True)
    assert {p.dtype for p in trained.control_model.parameters()} == {torch.float32}, "trained weights must be fp32"
    assert trained.control_model.zero_convs[0][0].weight.abs().max() > 0
    assert at_rest_hash(model) == before, f"training modified the {dtype} base MODEL"
    assert model.model.get_dtype() == weight_dtype

    name = ControlNetZeroSave.execute(control_net=trained, filename=f"half/{dtype}", dtype=dtype).args[0]
    assert file_dtypes(controlnet_folder / name) == {weight_dtype}
    with caplog.at_level(logging.DEBUG):
        stock = nodes.ControlNetLoader().load_controlnet(name)[0]
    assert "missing controlnet keys" not in caplog.text and "unexpected controlnet keys" not in caplog.text
    positive, negative = conds(clip)
    hint = disks.disks(1, R, seed=7)[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plain = sample(model, positive, negative)
        controlled = sample(model, positive, negative, stock, hint)
    assert "could not be applied" not in caplog.text
    assert torch.isfinite(controlled).all() and not torch.equal(controlled, plain)
    assert at_rest_hash(model) == before


@pytest.mark.half
def test_trained_controlnet_applies_to_an_fp8_stored_base_and_trains_on_it(half_loaded, loaded, controlnet_folder,
                                                                           caplog):
    import nodes

    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    fp8_model, clip, vae = half_loaded["fp8"]
    assert fp8_model.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float8_e4m3fn
    before = at_rest_hash(fp8_model)
    model32, clip32, vae32 = loaded["sd15"]
    trained, _ = train(model32, clip32, vae32, create(model32), steps=2)
    name = ControlNetZeroSave.execute(control_net=trained, filename="fp8/from_fp32", dtype="fp16").args[0]
    stock = nodes.ControlNetLoader().load_controlnet(name)[0]
    positive, negative = conds(clip)
    hint = disks.disks(1, R, seed=7)[1]
    with caplog.at_level(logging.WARNING):
        plain = sample(fp8_model, positive, negative)
        controlled = sample(fp8_model, positive, negative, stock, hint)
    assert "could not be applied" not in caplog.text
    assert torch.isfinite(controlled).all() and not torch.equal(controlled, plain)
    assert at_rest_hash(fp8_model) == before, "sampling modified the fp8 base MODEL"

    # training around the fp8 base: its weights are cast per op, never copied or written
    on_fp8, _ = train(fp8_model, clip, vae, create(fp8_model), steps=1, batch_size=1)
    assert {p.dtype for p in on_fp8.control_model.parameters()} == {torch.float32}
    assert math.isfinite(float(on_fp8.frozentune_metadata["controlnet_zero.final_loss"]))
    assert at_rest_hash(fp8_model) == before, "training modified the fp8 base MODEL"
