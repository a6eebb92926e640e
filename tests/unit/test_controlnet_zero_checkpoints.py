"""ControlNet-Zero checkpoints: old files still resume, and the resume check compares bases by fingerprint.

The base fingerprint is ``families.fingerprint``'s dtype-independent one: the same weights loaded in fp16
or bf16 match, other weights are refused, and fingerprints written before v2 are still read.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`
from frozentune.controlnet_zero import resume_state as checkpoints  # noqa: E402
from frozentune.controlnet_zero import training_run as trainer  # noqa: E402
from frozentune.families import fingerprint as family  # noqa: E402
from frozentune.storage import safetensors_file as weights_file  # noqa: E402


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3), torch.nn.Conv2d(32, 32, 3))


def stepped(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    module = net(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.randn(1, 4, 8, 8)).square().mean().backward()
    opt.step()
    return module, opt


def test_a_checkpoint_written_before_the_shared_optimizer_state_format_still_loads(tmp_path):
    module, opt = stepped()
    folder = checkpoints.save(tmp_path, 1, module, opt, torch.Generator().manual_seed(0), [0.5], {})
    tensors, meta = weights_file.load(folder / checkpoints.STATE)
    info = json.loads(meta.pop("optimizer_state"))
    assert not info["numbers"], "torch AdamW keeps every state entry as a tensor"
    meta["param_groups"] = json.dumps(info["param_groups"])  # the old layout: groups only
    weights_file.save(folder / checkpoints.STATE, tensors, meta, format=checkpoints.FORMAT)

    fresh = net(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    done = checkpoints.load(folder, fresh, fresh_opt, torch.Generator())
    assert done.step == 1 and done.losses == [0.5]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), module.state_dict().values(),
                                                 strict=True))
    for p, q in zip(module.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), key


def test_resume_check_matches_the_base_in_any_dtype_and_refuses_another():
    base = net(0)
    key = trainer.FINGERPRINT_KEY
    saved = {key: family.fingerprint(copy.deepcopy(base).half())}  # trained on an fp16 load
    now = {"controlnet_zero.optimizer": "adamw"}
    trainer._check_resume(saved, now, "ck", SimpleNamespace(diffusion_model=base))
    trainer._check_resume(saved, now, "ck", SimpleNamespace(diffusion_model=copy.deepcopy(base).bfloat16()))
    trainer._check_resume({key: family.legacy_fingerprint(base)}, now, "ck",
                          SimpleNamespace(diffusion_model=base))  # a pre-v2 checkpoint
    with pytest.raises(ValueError, match="another base model"):
        trainer._check_resume(saved, now, "ck", SimpleNamespace(diffusion_model=net(1)))


def test_resume_check_refuses_the_other_optimizers_state():
    base = SimpleNamespace(diffusion_model=net(0))
    trainer._check_resume({}, {"controlnet_zero.optimizer": "adamw"}, "ck", base)  # old checkpoints: AdamW
    with pytest.raises(ValueError, match="holds adamw optimizer state.*set optimizer to 'adamw'"):
        trainer._check_resume({}, {"controlnet_zero.optimizer": "adamw8bit"}, "ck", base)
