"""What the UniTune and Prompt Guidance node tests share, so each test file holds only its own checks.

- UniTune on the tiny DiTs (``test_unitune_dit.py``: Flux.1, SD3; ``test_unitune_qwen_zimage_chroma.py``:
  Qwen-Image, Z-Image, Chroma). A ``kit`` is anything with ``model``, ``clip``, ``vae``, ``encode(prompt)`` and
  ``empty_latent()``: ``harness.tiny_dits.TinyDiT`` or ``harness.tiny_dits2.Kit``. Fine-Tune as ComfyUI runs the
  node, its result, a cheap fixed-noise sample, the family's train targets, the model folders, the weights' hash
  at rest, one forward/backward with a copy-everything oracle, and spies on the twin and optimizer it trains;
  the module fixtures ``subject`` and ``folders`` (``unitune_fixtures``).
- The tiny SD1.5's module fixtures for the half-precision tier's oracle tests (``test_prompt_guidance.py``,
  ``test_unitune_edit.py``): ``sd15_module_fixtures``.

Import it only after ComfyUI is importable (see ``harness.comfy_env``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from harness import half_tier
from harness.hashing import weight_hash
from harness.images import subject_image

# UniTune Fine-Tune's inputs in these tests (a test overrides what it checks).
FINE_TUNE = dict(token="beikkpic", class_word="", steps=3, batch_size=2, learning_rate=1e-3, optimizer="adamw",
                 train="auto", lora_rank=4, gradient_checkpointing=False, seed=0)


def unitune_fixtures() -> tuple:
    """``(subject, folders)``, to assign at a test module's top level under those names: ``subject`` is the 64 px
    subject image (``harness.images``, once per module); ``folders`` is ``model_folders`` in the test's
    ``tmp_path``."""

    @pytest.fixture(scope="module")
    def subject(pack):
        return subject_image()

    @pytest.fixture
    def folders(tmp_path, monkeypatch):
        return model_folders(tmp_path, monkeypatch)

    return subject, folders


def model_folders(tmp_path: Path, monkeypatch, models_dir: bool = True) -> Path:
    """models/unitune/ and models/loras/ in ``tmp_path`` (ComfyUI's folder lists patched for the test; with
    ``models_dir``, ComfyUI's models folder too)."""
    import folder_paths

    from frozentune.nodes.unitune_nodes import FOLDER

    for kind in (FOLDER, "loras"):
        (tmp_path / kind).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind, ([str(tmp_path / kind)], {".safetensors"}))
    if models_dir:
        monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    return tmp_path


def at_rest_hash(patcher) -> str:
    """The hash of a MODEL's diffusion-model weights, loaded as ComfyUI loads it (its patches applied)."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return weight_hash(patcher.model.diffusion_model)


def fine_tune_node(kit, image, model=None, **overrides):
    """UniTune Fine-Tune's outputs (the node's execute, as ComfyUI runs it) on ``kit``'s MODEL or ``model``."""
    from frozentune.nodes.unitune_nodes import UniTuneFineTune

    args = {**FINE_TUNE, **overrides}
    return UniTuneFineTune.execute(model=model or kit.model, clip=kit.clip, vae=kit.vae, image=image, **args).args


def result_of(tuned):
    """The fine-tune result a tuned MODEL carries."""
    return tuned.attachments["frozentune.unitune"]


def sample(kit, model, seed: int = 3):
    """Two Euler steps at 64 px from fixed noise, at cfg 1 (the distilled Flux's way; the others too, to stay
    cheap: the guidance tests use each family's cfg)."""
    import nodes

    positive = kit.encode("beikkpic")
    return nodes.common_ksampler(model, seed, 2, 1.0, "euler", "simple", positive, positive,
                                 kit.empty_latent())[0]["samples"]


def target_modules(kit, mode: str) -> set[str]:
    """The diffusion model's modules the family table's rule for ``mode`` picks (those that take a LoRA)."""
    from frozentune import families

    rule = families.train_targets(families.family_of(kit.model), mode)
    return {n for n, m in kit.model.model.diffusion_model.named_modules() if rule(n) and hasattr(m, "weight_function")}


def gradients(kit, subject, checkpoint: bool, oracle: bool = False) -> tuple[float, dict[str, torch.Tensor], int]:
    """One full-mode forward/backward on a twin: (loss, gradients, checkpointed blocks). ``oracle``: every tensor
    autograd saves is copied at save time, so no later in-place write can reach it (the reference gradients)."""
    import comfy.model_management as mm

    from frozentune.unitune import finetune

    mm.load_models_gpu([kit.model], force_patch_weights=True)
    settings = finetune.FineTuneSettings(mode="full", steps=1, batch_size=2, optimizer="adamw",
                                         gradient_checkpointing=checkpoint)
    copies = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t) if oracle \
        else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad():
        run = finetune.TrainingRun(kit.model, kit.vae.encode(subject), kit.encode("beikkpic"), settings)
        run.optimizer.close()  # keep the gradients (no step during backward)
        with run.checkpointing() as blocks, copies:
            loss = run.loss()
            loss.backward()
        return loss.item(), {n: p.grad for n, p in run.unet.named_parameters() if p.grad is not None}, blocks


def checked_auto_lora(kit, family: str, subject):
    """UniTune Fine-Tune with train = auto on ``kit`` (3 steps, a preview at the last), checked: a LoRA on exactly
    the family table's LoRA targets, some of its weights moved, finite losses, the base's weights unchanged, a
    64 px preview that is not flat (drawn from the 16-channel latent), a loss curve, and a tuned MODEL that samples
    otherwise than the base. Returns (result, the LoRA's module names) for the caller's own checks."""
    before = at_rest_hash(kit.model)
    tuned, curve, _, token, previews = fine_tune_node(kit, subject, preview_every=3)
    result = result_of(tuned)
    assert result.settings.mode == "lora" and result.family == family and token == "beikkpic"
    modules = {key.removesuffix(".lora_up.weight") for key in result.tensors if key.endswith(".lora_up.weight")}
    assert modules == {f"diffusion_model.{n}" for n in target_modules(kit, "lora")}
    assert any(t.abs().max() > 0 for key, t in result.tensors.items() if key.endswith("lora_up.weight"))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert at_rest_hash(kit.model) == before
    assert previews.shape[1:] == (64, 64, 3) and previews.std() > 0
    assert curve.shape[-1] == 3
    assert not torch.equal(sample(kit, tuned), sample(kit, kit.model))
    return result, modules


def save_and_load_back(kit, tuned, name: str, folders: Path) -> tuple[dict, dict, object, object]:
    """UniTune Save of ``tuned`` as ``unitune/<name>``; the file copied to ``models/loras/x.safetensors`` of
    ``folders`` (``model_folders``) and loaded onto ``kit``'s MODEL by the stock LoraLoaderModelOnly and by UniTune
    Load: (tensors, metadata, stock MODEL, reloaded MODEL)."""
    import nodes

    from frozentune.nodes.unitune_nodes import UniTuneLoad, UniTuneSave
    from frozentune.storage import safetensors_file as weights_file

    path = UniTuneSave.execute(model=tuned, filename=f"unitune/{name}").args[0]
    tensors, metadata = weights_file.load(path)
    (folders / "loras" / "x.safetensors").write_bytes(Path(path).read_bytes())
    stock = nodes.LoraLoaderModelOnly().load_lora_model_only(kit.model, "x.safetensors", 1.0)[0]
    reloaded = UniTuneLoad.execute(model=kit.model, unitune_name=f"{name}.safetensors", strength=1.0).args[0]
    return tensors, metadata, stock, reloaded


def training_spies(monkeypatch) -> dict:
    """Record the frozen twin UniTune trains (``seen["twin"]``) and its optimizer (``seen["opt"]``)."""
    from frozentune.training import precision
    from frozentune.unitune import finetune

    seen: dict = {}
    real_twin, real_optimizer = precision.frozen_twin, finetune._optimizer
    monkeypatch.setattr(precision, "frozen_twin", lambda m: seen.setdefault("twin", real_twin(m)))
    monkeypatch.setattr(finetune, "_optimizer", lambda p, s, **kw: seen.setdefault("opt", real_optimizer(p, s, **kw)))
    return seen


def lora_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The LoRA weight functions on ``unet``'s modules (a twin's, during or after training)."""
    return [f for m in unet.modules() for f in getattr(m, "weight_function", []) if isinstance(f, torch.nn.Module)]


def optimizer_state(optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors (moments; not the scalar step counts)."""
    return [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]


# --- the tiny SD1.5 of the half-precision oracle tests --------------------------------------------------------

def sd15_module_fixtures() -> tuple:
    """``(sd15, _forget_unets)``, to assign at a test module's top level under those names: ``sd15`` is the tiny
    SD1.5 checkpoint's (MODEL, CLIP, VAE) through the stock CheckpointLoaderSimple, loaded once per module;
    ``_forget_unets`` (autouse) drops ``half_tier``'s UNets at the module's end."""

    @pytest.fixture(scope="module")
    def sd15(tiny_checkpoints, pack):
        import nodes

        return nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[:3]

    @pytest.fixture(scope="module", autouse=True)
    def _forget_unets():
        yield
        half_tier.forget()

    return sd15, _forget_unets
