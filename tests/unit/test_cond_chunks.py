"""sampling.cond_chunks: the transformer_options key saying which cond indexes are unconditional (issue 15).

The reader falls back to {1}; ``declare`` copies; the stock guiders are recognised by the class that defines
their ``predict_noise`` (as ComfyUI loads them, under path-like module names too); the OUTER_SAMPLE wrapper
declares for the running guider on its per-run options only, once per patcher, and logs unknown guiders once.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest

from harness import comfy_env


@pytest.fixture(scope="module")
def chunks():
    comfy_env.import_comfy()
    comfy_env.import_pack()
    from frozentune.sampling import cond_chunks

    return cond_chunks


@pytest.fixture(scope="module")
def guiders():
    comfy_env.import_comfy()
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler, nodes_perpneg

    return SimpleNamespace(cfg=comfy.samplers.CFGGuider, basic=nodes_custom_sampler.Guider_Basic,
                           dual=nodes_custom_sampler.Guider_DualCFG, perpneg=nodes_perpneg.Guider_PerpNeg)


def make(cls, options=None):
    return cls(SimpleNamespace(model_options=options if options is not None else {}))


def test_reader_default_and_declared(chunks):
    assert chunks.unconditional_indexes({}) == {1}
    assert chunks.unconditional_indexes({"cond_or_uncond": [0, 1, 2]}) == {1}
    assert chunks.unconditional_indexes({chunks.KEY: (1, 2)}) == {1, 2}
    assert chunks.unconditional_indexes({chunks.KEY: ()}) == frozenset()


@pytest.mark.parametrize("bad", [(-1,), (1.0,), ("1",), (True,)])
def test_bad_indexes_are_refused_with_the_value(chunks, bad):
    with pytest.raises(ValueError, match="non-negative ints"):
        chunks.unconditional_indexes({chunks.KEY: bad})
    with pytest.raises(ValueError, match=repr(bad[0]).replace("(", r"\(")):
        chunks.declare({}, bad)


def test_declare_copies_and_keeps_the_rest(chunks):
    marker = "marker"
    options = {"transformer_options": {"patches": {"x": [marker]}}, "sampler_cfg_function": marker}
    before = copy.deepcopy(options)
    out = chunks.declare(options, [2, 1, 2])
    assert options == before and chunks.KEY not in options["transformer_options"]
    assert out["transformer_options"][chunks.KEY] == (1, 2)
    assert out["transformer_options"]["patches"] is options["transformer_options"]["patches"]
    assert out["sampler_cfg_function"] is marker
    assert chunks.unconditional_indexes(out["transformer_options"]) == {1, 2}


def test_stock_guiders_are_known_by_their_calc_cond_batch_order(chunks, guiders):
    assert chunks.guider_indexes(make(guiders.cfg)) == {1}  # [positive, negative]
    assert chunks.guider_indexes(make(guiders.basic)) == {1}  # inherits CFGGuider.predict_noise
    assert chunks.guider_indexes(make(guiders.perpneg)) == {1, 2}  # [positive, negative, empty]
    assert chunks.guider_indexes(make(guiders.dual)) == {0}  # [negative, cond2, cond1]


def test_subclasses_inherit_the_order_unless_they_override_predict_noise(chunks, guiders):
    inherits = type("MyPerpNeg", (guiders.perpneg,), {})
    overrides = type("Reordered", (guiders.perpneg,), {"predict_noise": lambda self, *a, **k: None})
    declared = type("Declared", (guiders.cfg,), {"predict_noise": lambda self, *a, **k: None,
                                                 chunks.ATTRIBUTE: (0, 3)})
    assert chunks.guider_indexes(make(inherits)) == {1, 2}
    assert chunks.guider_indexes(make(overrides)) is None
    assert chunks.guider_indexes(make(declared)) == {0, 3}


def test_comfyui_path_like_module_names_are_recognised(chunks, guiders):
    """ComfyUI's loader imports comfy_extras/nodes_perpneg.py as '/.../comfy_extras/nodes_perpneg_x_py'."""
    loaded = type("Guider_PerpNeg", (guiders.cfg,), {"predict_noise": guiders.perpneg.predict_noise,
                                                     "__module__": "/x/comfy_extras/nodes_perpneg_x_py"})
    assert chunks.guider_indexes(make(loaded)) == {1, 2}
    elsewhere = type("Guider_PerpNeg", (guiders.cfg,), {"predict_noise": guiders.perpneg.predict_noise,
                                                        "__module__": "/x/custom_nodes/other_x_py"})
    assert chunks.guider_indexes(make(elsewhere)) is None


class _Executor:
    """Stands in for comfy.patcher_extension.WrapperExecutor: class_obj is the guider, calling runs the rest."""

    def __init__(self, guider, inner):
        self.class_obj, self._inner = guider, inner

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)


def run_wrapper(chunks, guider):
    seen = {}

    def inner(*args, **kwargs):
        seen["options"] = guider.model_options
        return "sampled"

    return chunks._declare_for_guider(_Executor(guider, inner)), seen["options"]


def test_wrapper_declares_on_the_run_options_only(chunks, guiders):
    run_options = {"transformer_options": {"sample_sigmas": 1}}
    guider = make(guiders.perpneg, run_options)
    result, seen = run_wrapper(chunks, guider)
    assert result == "sampled"
    assert seen["transformer_options"][chunks.KEY] == (1, 2)
    assert chunks.KEY not in run_options["transformer_options"]  # the options it was handed are unchanged


def test_wrapper_keeps_an_existing_declaration(chunks, guiders):
    guider = make(guiders.perpneg, {"transformer_options": {chunks.KEY: (0,)}})
    _, seen = run_wrapper(chunks, guider)
    assert seen["transformer_options"][chunks.KEY] == (0,)


def test_unknown_guider_keeps_the_fallback_and_logs_once(chunks, guiders, caplog):
    unknown = type("Mystery", (guiders.cfg,), {"predict_noise": lambda self, *a, **k: None})
    with caplog.at_level(logging.INFO, logger=chunks.__name__):
        for _ in range(3):
            _, seen = run_wrapper(chunks, make(unknown))
            assert chunks.unconditional_indexes(seen.get("transformer_options", {})) == {1}
    assert [r.getMessage().split()[0] for r in caplog.records] == ["Mystery"]


def test_add_guider_wrapper_is_idempotent_and_leaves_the_source_patcher(chunks):
    import comfy.model_patcher
    import comfy.patcher_extension
    import torch

    source = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    clone = source.clone()
    chunks.add_guider_wrapper(clone)
    chunks.add_guider_wrapper(clone)
    kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    assert clone.get_wrappers(kind, chunks.WRAPPER_KEY) == [chunks._declare_for_guider]
    assert source.get_wrappers(kind, chunks.WRAPPER_KEY) == []
    again = clone.clone()
    chunks.add_guider_wrapper(again)
    assert again.get_wrappers(kind, chunks.WRAPPER_KEY) == [chunks._declare_for_guider]
