"""steps = 0 and learning_rate = 0 mean each train mode's recipe (the paper's, or the measured LoRA one)."""

from __future__ import annotations

import pytest
import torch


def test_recipe_by_mode(pack):
    from frozentune.unitune import finetune

    assert finetune.recipe("full", 0, 0.0) == (128, 1e-4)
    assert finetune.recipe("attention", 0, 0.0) == (128, 1e-4)
    assert finetune.recipe("lora", 0, 0.0) == (256, 1e-3)
    assert finetune.recipe("lora", 7, 5e-5) == (7, 5e-5), "explicit values are kept"
    with pytest.raises(ValueError, match="'loha' is unknown"):
        finetune.recipe("loha", 0, 0.0)


@pytest.mark.parametrize("family, mode, steps, lr", [("sd15", "full", 128, 1e-4), ("sdxl", "lora", 256, 1e-3)])
def test_node_defaults_resolve_to_the_mode_recipe(tiny_checkpoints, pack, monkeypatch, family, mode, steps, lr):
    """The node's schema defaults (auto mode, steps 0, lr 0) reach fine_tune as the recipe of the mode auto picks."""
    import nodes

    from frozentune.nodes import unitune_nodes
    from frozentune.unitune import finetune

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints[family].name)[:3]
    seen = {}

    class Stop(Exception):
        pass

    def fake_fine_tune(base, latents, conditioning, settings, on_step=None, preview=None):
        seen["settings"] = settings
        raise Stop

    monkeypatch.setattr(finetune, "fine_tune", fake_fine_tune)
    defaults = {i.id: i.default for i in unitune_nodes.UniTuneFineTune.define_schema().inputs
                if getattr(i, "default", None) is not None}
    with pytest.raises(Stop):
        unitune_nodes.UniTuneFineTune.execute(model=model, clip=clip, vae=vae, image=torch.rand(1, 64, 64, 3),
                                              **defaults)
    s = seen["settings"]
    assert (s.mode, s.steps, s.learning_rate, s.lora_rank) == (mode, steps, lr, 32)
