"""The trainers' model inputs for one caption (``training.conditioning``): tensors made trainable-safe, the rest as is.

Z-Image's ``extra_conds`` carries a plain int (``num_tokens``, a ``CONDConstant``) beside its tensors; the old code
called ``.detach()`` on every input and stopped there.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; training/ needs no ComfyUI
from frozentune.training.conditioning import batched, training_conds  # noqa: E402


class _Model:
    """A stand-in ``BaseModel`` whose ``extra_conds`` returns what Z-Image's / Qwen-Image's do: tensors, an int, a list."""

    def __init__(self):
        with torch.inference_mode():  # as upstream nodes hand them over
            self.context = torch.randn(1, 5, 8)
            self.refs = [torch.randn(1, 4, 2, 2)]
        self.seen = {}

    def extra_conds(self, **kwargs):
        self.seen = kwargs
        return {"c_crossattn": SimpleNamespace(cond=kwargs["cross_attn"]), "num_tokens": SimpleNamespace(cond=5),
                "method": SimpleNamespace(cond="offset"), "ref_latents": SimpleNamespace(cond=self.refs)}


def test_non_tensor_inputs_pass_through_and_tensors_can_be_saved_by_autograd():
    model = _Model()
    conds = training_conds(model, [[model.context, {"guidance": 1.0}]], torch.zeros(1, 4, 2, 3), torch.device("cpu"))
    assert conds["num_tokens"] == 5 and conds["method"] == "offset"
    assert model.seen["guidance"] == 1.0 and (model.seen["width"], model.seen["height"]) == (24, 16)
    context, (ref,) = conds["c_crossattn"], conds["ref_latents"]
    for t, source in ((context, model.context), (ref, model.refs[0])):
        assert not t.is_inference() and torch.equal(t, source) and t.data_ptr() != source.data_ptr()
    w = torch.ones(8, requires_grad=True)
    (context * w).sum().backward()  # an inference tensor here would refuse to be saved for backward
    assert w.grad is not None

    batch = batched(conds, 3)
    assert batch["c_crossattn"].shape == (3, 5, 8) and batch["c_crossattn"].data_ptr() == context.data_ptr()
    assert batch["num_tokens"] == 5 and batch["ref_latents"] is conds["ref_latents"]
