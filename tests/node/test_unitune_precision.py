"""UniTune in half precision and fp8, and its memory: the defects of issue 11 reproduced, then fixed.

Tiny SD1.5 (16M UNet) and SDXL-family (KOALA-700M shape, 76M UNet) loaded in bf16/fp16 with ComfyUI
computing natively in that dtype (``harness.precision``), or stored as fp8 for inference. The text
encoders and VAEs are loaded once in fp32 and shared: only the UNet's dtype matters here.
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import half_tier
from harness.hashing import weight_hash
from harness.images import subject_image
from harness.precision import DTYPE_NAMES

log = logging.getLogger(__name__)
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {v: k for k, v in DTYPE_NAMES.items()}


def load_unet(path, dtype: torch.dtype):
    """A MODEL of the checkpoint at ``path``, UNet only, stored in ``dtype`` (half: computing natively)."""
    return half_tier.load_unet(path, NAMES[dtype])


@pytest.fixture(scope="module")
def encoders(tiny_checkpoints, pack):
    """(CLIP, VAE) per family, fp32, loaded once."""
    import nodes

    return {f: nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints[f].name)[1:3]
            for f in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def subject():
    return subject_image()


@pytest.fixture
def unitune_folder(tmp_path, monkeypatch):
    import folder_paths

    from frozentune.nodes.unitune_nodes import FOLDER

    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path / "unitune")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    return tmp_path / "unitune"


def at_rest_hash(patcher) -> str:
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return weight_hash(patcher.model.diffusion_model)


def run_finetune(model, clip, vae, image, **overrides):
    from frozentune.nodes.unitune_nodes import UniTuneFineTune

    args = dict(token="beikkpic", class_word="", steps=2, batch_size=1, learning_rate=1e-3, optimizer="adamw",
                train="lora", lora_rank=4, gradient_checkpointing=False, seed=0, precision="auto")
    args.update(overrides)
    return UniTuneFineTune.execute(model=model, clip=clip, vae=vae, image=image, **args).args[0]


def result_of(tuned):
    return tuned.attachments["frozentune.unitune"]


def save_and_load(tuned, model, name: str):
    from frozentune.nodes.unitune_nodes import UniTuneLoad, UniTuneSave

    path = UniTuneSave.execute(model=tuned, filename=f"unitune/{name}").args[0]
    return path, UniTuneLoad.execute(model=model, unitune_name=f"{name}.safetensors", strength=1.0).args[0]


def another_seed_sd15():
    """A tiny SD1.5 with the same structure but other random weights: another checkpoint."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from harness import tiny_models

    unet = UNetModel(image_size=32, use_checkpoint=False, use_spatial_transformer=True, legacy=False,
                     dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init,
                     **tiny_models.SD15.unet)
    return comfy.sd.load_diffusion_model_state_dict(tiny_models.random_state_dict(unet, tiny_models.SEED + 99))


@pytest.mark.half
def test_file_trained_on_bf16_loads_on_every_dtype_of_that_checkpoint_only(
        tiny_checkpoints, encoders, subject, unitune_folder):
    """Issue 11 (1): a file trained on a bf16 load loads on fp16/bf16/fp32 loads; other checkpoints are refused."""
    from frozentune.families import fingerprint as family
    from frozentune.nodes.unitune_nodes import UniTuneLoad

    clip, vae = encoders["sd15"]
    bf16 = load_unet(tiny_checkpoints["sd15"], torch.bfloat16)
    loads = {"bf16": bf16, "fp16": load_unet(tiny_checkpoints["sd15"], torch.float16),
             "fp32": load_unet(tiny_checkpoints["sd15"], torch.float32)}
    # The defect: the old fingerprint hashes dtypes, so no two loads of one checkpoint agree.
    legacy = {k: family.legacy_fingerprint(m.model.diffusion_model) for k, m in loads.items()}
    assert len(set(legacy.values())) == 3, legacy

    tuned = run_finetune(bf16, clip, vae, subject, steps=1, precision="bf16")
    assert result_of(tuned).metadata["unitune.base_fingerprint"].startswith(family.FINGERPRINT_PREFIX)
    from frozentune.nodes.unitune_nodes import UniTuneSave

    UniTuneSave.execute(model=tuned, filename="unitune/bf16_trained")
    for name, model in loads.items():
        out = UniTuneLoad.execute(model=model, unitune_name="bf16_trained.safetensors", strength=1.0).args[0]
        assert out.patches, name
    for other in (another_seed_sd15(), load_unet(tiny_checkpoints["sdxl"], torch.bfloat16)):
        with pytest.raises(ValueError, match="trained on another base model"):
            UniTuneLoad.execute(model=other, unitune_name="bf16_trained.safetensors", strength=1.0)


def test_legacy_fingerprint_files_still_compare(tiny_checkpoints, encoders, subject, unitune_folder):
    """A file with a pre-v2 fingerprint is compared with the legacy fingerprint: same load accepted, other refused."""
    from frozentune.families import fingerprint as family
    from frozentune.nodes.unitune_nodes import UniTuneLoad
    from frozentune.storage import safetensors_file as weights_file

    clip, vae = encoders["sd15"]
    model = load_unet(tiny_checkpoints["sd15"], torch.float32)
    tuned = run_finetune(model, clip, vae, subject, steps=1)
    result = result_of(tuned)
    metadata = dict(result.metadata, **{"unitune.base_fingerprint": family.legacy_fingerprint(
        model.model.diffusion_model)})
    unitune_folder.mkdir(parents=True, exist_ok=True)
    weights_file.save(unitune_folder / "old.safetensors", result.tensors, metadata, format="frozentune.unitune/1")
    assert UniTuneLoad.execute(model=model, unitune_name="old.safetensors", strength=1.0).args[0].patches
    with pytest.raises(ValueError, match="trained on another base model"):
        UniTuneLoad.execute(model=another_seed_sd15(), unitune_name="old.safetensors", strength=1.0)


def test_gradient_checkpointing_keeps_less_for_backward_and_trains_the_same(
        tiny_checkpoints, encoders, subject):
    """Issue 11 (2): bytes autograd keeps for backward (profiler-counted) drop with checkpointing; results equal."""
    import comfy.model_management as mm

    from frozentune.training.checkpointing import retained_bytes
    from frozentune.unitune import finetune

    clip, vae = encoders["sd15"]
    model = load_unet(tiny_checkpoints["sd15"], torch.float32)
    latents = vae.encode(subject)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("beikkpic"))
    mm.load_models_gpu([model], force_patch_weights=True)
    kept, patched = {}, {}
    for on in (False, True):
        settings = finetune.FineTuneSettings(mode="full", steps=1, batch_size=4, optimizer="adamw",
                                             gradient_checkpointing=on)
        with torch.inference_mode(False), torch.enable_grad():
            run = finetune.TrainingRun(model, latents, cond, settings)
            with run.checkpointing() as n:
                loss, kept[on] = retained_bytes(run.loss)
                patched[on] = n
                loss.backward()  # checkpointed layers recompute here
            del run, loss
    ratio = kept[True] / kept[False]
    log.info("UniTune SD1.5-tiny 64 px batch 4: kept for backward %.1f MiB off, %.1f MiB on (%d layers): %.3f",
             kept[False] / 2**20, kept[True] / 2**20, patched[True], ratio)
    assert patched[False] == 0 and patched[True] > 0
    assert ratio <= 0.6, (kept, ratio)

    results = {}
    for on in (False, True):
        settings = finetune.FineTuneSettings(mode="full", steps=2, batch_size=2, optimizer="adamw",
                                             learning_rate=1e-3, gradient_checkpointing=on)
        results[on] = finetune.fine_tune(model, latents, cond, settings)
    assert results[False].losses == pytest.approx(results[True].losses, rel=1e-5)
    for key, off in results[False].tensors.items():
        on = results[True].tensors[key]
        assert torch.allclose(off, on, rtol=1e-3, atol=1e-6), (key, (off - on).abs().max())


def zero_fraction(tensors: dict[str, torch.Tensor]) -> float:
    diffs = [t for k, t in tensors.items() if k.endswith(".diff")]
    return sum(int((t == 0).sum()) for t in diffs) / sum(t.numel() for t in diffs)


@pytest.mark.half  # an fp8 base
@pytest.mark.parametrize("mode", ["full", pytest.param("attention", marks=pytest.mark.long)])  # attention: a subset of full
def test_fp8_base_keeps_its_deltas(mode, tiny_checkpoints, encoders, subject, unitune_folder):
    """Issue 11 (3): an fp8-stored base's saved deltas are not rounded away; Load applies them on fp8."""
    from frozentune.storage import safetensors_file as weights_file
    from harness.precision import FP8

    clip, vae = encoders["sd15"]
    model = load_unet(tiny_checkpoints["sd15"], FP8)
    before = at_rest_hash(model)
    tuned = run_finetune(model, clip, vae, subject, train=mode, steps=2, learning_rate=1e-4)
    assert at_rest_hash(model) == before
    path, reloaded = save_and_load(tuned, model, f"fp8_{mode}")
    tensors, metadata = weights_file.load(path)
    zeros = zero_fraction(tensors)
    as_before = zero_fraction({k: t.to(FP8).float() for k, t in tensors.items()})  # the old cast to the base dtype
    log.info("fp8 SD1.5-tiny %s: %.4f%% of saved deltas zero (%.2f%% if cast to fp8)", mode, 100 * zeros,
             100 * as_before)
    assert {t.dtype for k, t in tensors.items() if ".diff" in k} == {torch.float32}
    assert metadata["unitune.precision"] == "auto"
    assert zeros < 0.10 and as_before > 0.9, (zeros, as_before)

    # Inference on the fp8 base: the deltas reach its weights and its samples.
    assert_load_applies(model, reloaded, clip, before)


def assert_load_applies(model, reloaded, clip, before_hash: str) -> None:
    """``reloaded`` (UniTune Load onto ``model``) changes the patched weights and the sample; base unchanged.

    Under inference mode, as ComfyUI's executor runs nodes (fp8 patching rounds with out= ops).
    """
    with torch.inference_mode():
        _assert_load_applies(model, reloaded, clip, before_hash)


def _assert_load_applies(model, reloaded, clip, before_hash: str) -> None:
    import comfy.model_management as mm
    import nodes

    mm.load_models_gpu([reloaded], force_patch_weights=True)
    keys = {k.removeprefix("diffusion_model.") for k in reloaded.patches if k.startswith("diffusion_model.")}
    patched = {k: t.detach().float().clone() for k, t in reloaded.model.diffusion_model.state_dict().items()
               if k in keys}
    assert patched, "Load applied no patch"
    mm.load_models_gpu([model])
    base = model.model.diffusion_model.state_dict()
    changed = sum(int((patched[k] != base[k].float()).sum()) for k in patched) / sum(t.numel() for t in patched.values())
    assert changed > 0.05, changed
    assert weight_hash(model.model.diffusion_model) == before_hash

    positive = nodes.CLIPTextEncode().encode(clip, "beikkpic")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    samples = {}
    for name, m in (("base", model), ("tuned", reloaded)):
        samples[name] = nodes.common_ksampler(m, 3, 3, 3.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert torch.isfinite(samples["tuned"]).all()
    assert not torch.equal(samples["base"], samples["tuned"])
    assert at_rest_hash(model) == before_hash


# sdxl-fp16 (long) repeats sdxl-bf16's lora-on-a-half-base path; fp16 compute (loss scaler, plain step) is sd15-fp16
@pytest.mark.parametrize(("family", "dtype_name"), [("sd15", "bf16"), ("sd15", "fp16"), ("sdxl", "bf16"),
                                                    pytest.param("sdxl", "fp16", marks=pytest.mark.long)])
def test_half_precision_tier(family, dtype_name, tiny_checkpoints, encoders, subject, unitune_folder, monkeypatch):
    """Fine-Tune/Save/Load on a natively bf16/fp16 base: fp32 trainable state, no copy, learns, samples; fp8 Load."""
    import comfy.model_management as mm

    from frozentune.training import objective, precision
    from frozentune.unitune import finetune
    from harness.precision import FP8

    clip, vae = encoders[family]
    dtype = HALF[dtype_name]
    model = load_unet(tiny_checkpoints[family], dtype)
    before = at_rest_hash(model)
    base_ptrs = {n: p.data_ptr() for n, p in model.model.diffusion_model.named_parameters()}
    seen = {}
    real_twin, real_optimizer = precision.frozen_twin, finetune._optimizer
    monkeypatch.setattr(precision, "frozen_twin", lambda m: seen.setdefault("twin", real_twin(m)))
    monkeypatch.setattr(finetune, "_optimizer", lambda p, s, **kw: seen.setdefault("opt", real_optimizer(p, s, **kw)))
    real_deltas = finetune._deltas

    def deltas(unet, initial, patcher):  # also keep the fp32 deltas, to measure what each storage dtype keeps
        params = dict(unet.named_parameters())
        seen["raw"] = {n: params[n].detach().float() - t.float() for n, t in initial.items() if t.ndim > 1}
        return real_deltas(unet, initial, patcher)

    monkeypatch.setattr(finetune, "_deltas", deltas)

    mode = "attention" if family == "sd15" else "lora"  # both leave frozen weights to check (full: test_fp8_*)
    tuned = run_finetune(model, clip, vae, subject, train=mode, precision=dtype_name, steps=4, batch_size=2)
    result = result_of(tuned)
    assert result.settings.mode == mode and result.metadata["unitune.precision"] == dtype_name
    assert result.metadata["unitune.compute_dtype"] == str(dtype).removeprefix("torch.")
    assert at_rest_hash(model) == before

    # Trainable state fp32, frozen weights the base's own memory in its dtype.
    unet = seen["twin"].diffusion_model
    trainable = [p for p in unet.parameters() if p.requires_grad] + [
        p for m in unet.modules() for f in getattr(m, "weight_function", []) if isinstance(f, torch.nn.Module)
        for p in f.parameters()]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    state = [t for s in seen["opt"].state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert state and {t.dtype for t in state} == {torch.float32}
    frozen = {n: p for n, p in unet.named_parameters() if not p.requires_grad}
    if mode == "lora":
        assert frozen.keys() == base_ptrs.keys()
    assert frozen and all(p.data_ptr() == base_ptrs[n] and p.dtype == dtype for n, p in frozen.items())
    assert {t.dtype for k, t in result.tensors.items() if k.endswith(".diff")} <= {torch.bfloat16}
    if "raw" in seen:  # the storage dtype of deltas on a half-precision base (finetune.delta_dtype)
        raw = seen["raw"]
        kept = {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            zeros = sum(int((d.to(dt) == 0).sum()) for d in raw.values()) / sum(d.numel() for d in raw.values())
            error = (sum((d.to(dt).float() - d).square().sum() for d in raw.values())
                     / sum(d.square().sum() for d in raw.values())).sqrt().item()
            kept[name] = (zeros, error)
        log.info("UniTune %s %s-base %s deltas stored as (zero fraction, relative error): %s",
                 family, dtype_name, mode, kept)
        assert kept["bf16"][0] <= kept["fp32"][0] + 1e-4 and kept["bf16"][1] < 5e-3, kept

    # The training objective on fixed draws: lower for the tuned MODEL than for the base.
    latents = vae.encode(subject)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("beikkpic"))

    def objective_loss(patcher) -> float:
        mm.load_models_gpu([patcher])
        m = patcher.model
        ms, gen = m.model_sampling, torch.Generator().manual_seed(5)
        x0 = m.latent_format.process_in(latents).expand(8, -1, -1, -1)
        conds = {k: v.expand(8, *v.shape[1:]) for k, v in
                 finetune.training_conds(m, cond, x0[:1], patcher.load_device).items()}
        sigma = objective.draw_sigmas(ms, 8, gen)
        x_t = objective.noised(ms, sigma, torch.randn(x0.shape, generator=gen), x0)
        with torch.no_grad():
            return objective.denoised_loss(ms, sigma, x_t, x0, m.apply_model(x_t, sigma, **conds)).item()

    path, reloaded = save_and_load(tuned, model, f"{family}_{dtype_name}")
    losses = {"base": objective_loss(model), "tuned": objective_loss(tuned), "reloaded": objective_loss(reloaded)}
    log.info("UniTune %s-tiny %s %s, 4 steps: objective on fixed draws %s; train losses %s",
             family, dtype_name, mode, losses, result.losses)
    assert losses["tuned"] < losses["base"] and losses["reloaded"] < losses["base"], losses
    assert_load_applies(model, reloaded, clip, before)

    # The same file on an fp8-stored base of the checkpoint (inference).
    fp8 = load_unet(tiny_checkpoints[family], FP8)
    from frozentune.nodes.unitune_nodes import UniTuneLoad

    fp8_hash = at_rest_hash(fp8)
    on_fp8 = UniTuneLoad.execute(model=fp8, unitune_name=f"{family}_{dtype_name}.safetensors", strength=1.0).args[0]
    assert_load_applies(fp8, on_fp8, clip, fp8_hash)


MEMORY_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from harness import comfy_env
comfy_env.import_comfy(cpu=True)
comfy_env.import_pack()
import copy, torch, folder_paths, nodes, comfy.model_management as mm
from harness import tiny_models
from frozentune.unitune import finetune

torch.set_num_threads(1)
folder_paths.add_model_folder_path("checkpoints", str(tiny_models.cache_dir()))
path = tiny_models.checkpoint_path("sdxl")
model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:3]
latents = vae.encode(torch.rand(1, 64, 64, 3))
cond = clip.encode_from_tokens_scheduled(clip.tokenize("beikkpic"))
mm.load_models_gpu([model], force_patch_weights=True)
weights = sum(t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values())

def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
start = kib("VmRSS")
if sys.argv[2] == "copy":  # the control arm: what the probe reports for one fp32 UNet copy
    with torch.inference_mode(False):
        kept = copy.deepcopy(model.model.diffusion_model).to(torch.float32)
else:
    settings = finetune.FineTuneSettings(mode=sys.argv[2], steps=2, batch_size=1, optimizer="adamw", lora_rank=8)
    finetune.fine_tune(model, latents, cond, settings)
print(json.dumps({"growth": kib("VmHWM") - start, "weights": weights}))
"""


@pytest.mark.slow  # two child processes, one thread each (~32 s idle)
def test_lora_mode_peak_memory_is_a_fraction_of_the_unet(tiny_checkpoints):
    """Issue 11 (4): lora mode trains on the frozen twin; peak RSS growth < 0.5x the UNet's weight bytes.

    Each arm runs in a fresh process (peak RSS, ``VmHWM``, reset just before the call), with glibc's
    mmap threshold fixed so freed large blocks go back to the OS instead of being reused unseen.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    out = {}
    for arm in ("copy", "lora"):
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, tests, arm], env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = out["lora"]["weights"]
    ratios = {arm: r["growth"] / weights for arm, r in out.items()}
    log.info("SDXL-tiny fp32 UNet %.1f MiB; peak RSS growth / weight bytes: %s", weights / 2**20, ratios)
    assert ratios["copy"] > 0.9, ratios  # the probe sees a UNet copy
    assert ratios["lora"] < 0.5, ratios


def test_adamw8bit_keeps_8bit_state_and_trains(tiny_checkpoints, encoders, subject, monkeypatch):
    """optimizer=adamw8bit: the large attention weights' moments are uint8 codes; the tuning changes the output."""
    pytest.importorskip("bitsandbytes")
    from frozentune.unitune import finetune

    clip, vae = encoders["sd15"]
    model = load_unet(tiny_checkpoints["sd15"], torch.float32)
    seen = {}
    real_optimizer = finetune._optimizer
    monkeypatch.setattr(finetune, "_optimizer", lambda p, s, **kw: seen.setdefault("opt", real_optimizer(p, s, **kw)))
    tuned = run_finetune(model, clip, vae, subject, train="attention", optimizer="adamw8bit", steps=2)
    dtypes = {t.dtype for s in seen["opt"].state.values() for t in s.values() if torch.is_tensor(t)}
    assert torch.uint8 in dtypes, dtypes
    result = result_of(tuned)
    assert result.metadata["unitune.optimizer"] == "adamw8bit"
    assert any(t.abs().max() > 0 for k, t in result.tensors.items() if k.endswith(".diff"))
