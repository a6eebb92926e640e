"""UniTune Save / Load against careless and hostile input (issue 12): NaN, bad files, bad names, re-queue.

Most cases need only the tiny SD1.5 UNet (no text encoder) and hand-made patch files in ComfyUI's LoRA key
format; the re-queue case runs the real graph (checkpoint -> Fine-Tune -> Save) through ComfyUI's executor.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from harness.hashing import weight_hash

Q_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q"


@pytest.fixture(scope="module")
def unet(tiny_checkpoints, pack):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoints["sd15"]), output_vae=False,
                                                 output_clip=False)[0]


@pytest.fixture
def folders(tmp_path, monkeypatch, pack):
    """models/unitune and models/loras in a temporary models folder."""
    import folder_paths

    from frozentune.nodes.unitune_nodes import FOLDER

    out = {word: tmp_path / "models" / word for word in (FOLDER, "loras")}
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    for word, folder in out.items():
        monkeypatch.setitem(folder_paths.folder_names_and_paths, word, ([str(folder)], {".safetensors"}))
    return out


def q_weight(unet) -> torch.Tensor:
    import comfy.utils

    return comfy.utils.get_attr(unet.model, Q_KEY + ".weight")


def write(folder: Path, name: str, tensors: dict, metadata: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def load(unet, name: str, strength: float = 1.0):
    from frozentune.nodes.unitune_nodes import UniTuneLoad

    return UniTuneLoad.execute(model=unet, unitune_name=name, strength=strength).args[0]


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_fitting_file_loads(unet, folders):
    """The control for the refusals below: the same kind of file with the right shapes loads and changes the weight."""
    w = q_weight(unet)
    write(folders["unitune"], "good.safetensors", {f"{Q_KEY}.diff": torch.full_like(w, 1e-3)})
    tuned = load(unet, "good.safetensors")
    assert Q_KEY + ".weight" in tuned.patches


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_load_refuses_a_non_finite_strength(unet, folders, value):
    w = q_weight(unet)
    write(folders["unitune"], "good.safetensors", {f"{Q_KEY}.diff": torch.full_like(w, 1e-3)})
    with pytest.raises(ValueError, match=r"strength is (nan|inf|-inf): give a finite number"):
        load(unet, "good.safetensors", strength=value)


def test_load_refuses_a_file_holding_nan(unet, folders):
    w = q_weight(unet)
    delta = torch.zeros_like(w)
    delta[0, 0] = math.nan
    write(folders["unitune"], "nan.safetensors", {f"{Q_KEY}.diff": delta})
    before = weight_hash(unet.model.diffusion_model)
    with pytest.raises(ValueError, match=r"nan\.safetensors: tensor '.*attn2\.to_q\.diff' holds 1 NaN"):
        load(unet, "nan.safetensors")
    assert weight_hash(unet.model.diffusion_model) == before


@pytest.mark.parametrize("kind", ["diff", "lora"])
def test_load_refuses_a_wrong_shaped_file_without_metadata(unet, folders, kind):
    """ComfyUI would only log "WEIGHT NOT MERGED" when sampling; the node must refuse, naming file, key and shapes."""
    w = q_weight(unet)
    out_dim, in_dim = w.shape
    if kind == "diff":
        tensors = {f"{Q_KEY}.diff": torch.zeros(out_dim + 1, in_dim)}
        key, shape = f"{Q_KEY}.diff", [out_dim + 1, in_dim]
    else:
        tensors = {f"{Q_KEY}.lora_up.weight": torch.zeros(out_dim, 2),
                   f"{Q_KEY}.lora_down.weight": torch.zeros(2, in_dim + 3), f"{Q_KEY}.alpha": torch.tensor(2.0)}
        key, shape = f"{Q_KEY}.lora_up.weight", [out_dim, in_dim + 3]
    write(folders["unitune"], "other.safetensors", tensors)
    expected = (rf"other\.safetensors: '{key}' changes a weight of shape \[{shape[0]}, {shape[1]}\], but this "
                rf"MODEL's .*to_q\.weight has shape \[{out_dim}, {in_dim}\]: load it onto the base model")
    with pytest.raises(ValueError, match=expected):
        load(unet, "other.safetensors")


def test_load_refuses_keys_no_weight_has(unet, folders):
    write(folders["unitune"], "keys.safetensors", {"diffusion_model.no_such_block.diff": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"keys\.safetensors: 1 of its 1 tensors match no weight of this MODEL "
                                         r"\(the first: 'diffusion_model\.no_such_block'\)"):
        load(unet, "keys.safetensors")


def test_load_names_a_truncated_file_and_the_fix(unet, folders):
    w = q_weight(unet)
    path = write(folders["unitune"], "cut.safetensors", {f"{Q_KEY}.diff": torch.zeros_like(w)})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cut\.safetensors could not be read .*truncated, corrupt"):
        load(unet, "cut.safetensors")


def tuned_model(unet):
    """A MODEL as UniTune Fine-Tune returns it (patches + the result attachment), with a hand-made delta."""
    from frozentune.nodes.unitune_nodes import ATTACHMENT
    from frozentune.unitune import finetune

    w = q_weight(unet)
    tensors = {f"{Q_KEY}.diff": torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 1e-3}
    settings = finetune.FineTuneSettings(mode="attention")
    result = finetune.FineTuneResult(tensors=tensors, losses=[1.0], settings=settings, base_fingerprint="",
                                     family="sd15", metadata=settings.metadata())
    tuned = finetune.apply_patches(unet, tensors)
    tuned.set_attachments(ATTACHMENT, result)
    return tuned


def save(model, filename: str, **kw) -> Path:
    from frozentune.nodes.unitune_nodes import UniTuneSave

    return Path(UniTuneSave.execute(model=model, filename=filename, **kw).args[0])


@pytest.mark.parametrize(("filename", "problem"), [
    (".", "is not a file or folder name"),
    ("", "it is empty"),
    ("/abs/path", "absolute paths are not allowed"),
    ("checkpoints/x", "'checkpoints/' is another loader's folder"),
    ("../x", "is not a file or folder name"),
    ("unitune/.hidden", "starts with '.'"),
    ("a\x00b", "NUL byte"),
])
def test_save_refuses_names_outside_its_folders(unet, folders, tmp_path, filename, problem):
    model = tuned_model(unet)
    before = all_files(tmp_path)
    with pytest.raises(ValueError, match=rf"filename .* is refused: .*{problem}.*'unitune/\.\.\.', 'loras/\.\.\.'"):
        save(model, filename)
    assert all_files(tmp_path) == before
    assert not Path("/abs").exists()


@pytest.mark.parametrize(("filename", "where"), [
    ("alice", "unitune/alice.safetensors"),
    ("unitune/alice", "unitune/alice.safetensors"),
    ("loras/alice", "loras/alice.safetensors"),
    ("people/alice", "unitune/people/alice.safetensors"),
    ("alice.safetensors", "unitune/alice.safetensors"),
])
def test_save_writes_inside_unitune_or_loras(unet, folders, tmp_path, filename, where):
    path = save(tuned_model(unet), filename)
    assert path == tmp_path / "models" / where and path.is_file()
    assert save(tuned_model(unet), filename).name == Path(where).stem + "_00001.safetensors"  # never overwrites


def test_save_refuses_an_unknown_save_as(unet, folders, tmp_path):
    before = all_files(tmp_path)
    with pytest.raises(ValueError, match=r"save_as 'LoRA' is not one of as trained, lora"):
        save(tuned_model(unet), "unitune/x", save_as="LoRA")
    assert all_files(tmp_path) == before


def test_save_fingerprint_changes_once_its_file_is_deleted(unet, folders):
    from comfy_execution.utils import CurrentNodeContext

    from frozentune.nodes.unitune_nodes import UniTuneSave

    widgets = dict(filename="unitune/again", save_as="as trained", lora_rank=32)
    with CurrentNodeContext("prompt", "9"):
        first = UniTuneSave.fingerprint_inputs(model=None, **widgets)
        path = save(tuned_model(unet), **widgets)
        assert UniTuneSave.fingerprint_inputs(model=None, **widgets) == first
        os.unlink(path)
        assert UniTuneSave.fingerprint_inputs(model=None, **widgets) != first
        assert save(tuned_model(unet), **widgets) == path and path.is_file()  # the name is free again


class _QuietServer:
    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs) -> None:
        pass


def test_requeue_after_delete_writes_the_file_again_through_the_executor(tiny_checkpoints, folders):
    """The issue's case in-process: the same prompt queued again after its file was deleted must not answer
    from ComfyUI's cache with the deleted path; Fine-Tune itself stays cached (it does not train again)."""
    import execution
    import nodes

    from frozentune.nodes.unitune_nodes import UniTuneFineTune, UniTuneSave

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoints["sd15"].name}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "3": {"class_type": "FrozenTuneUniTuneFineTune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "token": "beikkpic",
            "class_word": "", "steps": 1, "batch_size": 1, "learning_rate": 1e-3, "optimizer": "adamw",
            "train": "lora", "lora_rank": 2, "gradient_checkpointing": False, "seed": 0}},
        "4": {"class_type": "FrozenTuneUniTuneSave", "inputs": {"model": ["3", 0], "filename": "unitune/requeue"}},
    }
    trained = []
    original = UniTuneFineTune.execute.__func__

    def counting(cls, *args, **kwargs):
        trained.append(1)
        return original(cls, *args, **kwargs)

    executor = execution.PromptExecutor(_QuietServer(), cache_args={"lru": 0, "ram": 0})

    def run() -> Path:
        executor.execute(copy.deepcopy(prompt), "prompt", {}, ["4"])
        assert executor.success, executor.status_messages[-1]
        return Path(executor.caches.outputs.get("4").outputs[0][0])

    with pytest.MonkeyPatch.context() as mp:
        for cls in (UniTuneFineTune, UniTuneSave):  # as ComfyUI registers the pack's nodes
            mp.setitem(nodes.NODE_CLASS_MAPPINGS, cls.GET_SCHEMA().node_id, cls)
        mp.setattr(UniTuneFineTune, "execute", classmethod(counting))
        first = run()
        assert first == folders["unitune"] / "requeue.safetensors" and first.is_file()
        assert run() == first and len(trained) == 1
        first.unlink()
        again = run()
    assert again.is_file(), f"re-queued after delete, Save answered {again}, which does not exist"
    assert len(trained) == 1, "Fine-Tune ran again; only Save should"
