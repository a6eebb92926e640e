"""Which chunks of a ``calc_cond_batch`` call are unconditional, said by the guider that made the call.

ComfyUI hands attention patches ``transformer_options["cond_or_uncond"]``: one entry per batch chunk, the
index of that chunk's conditioning in the guider's ``calc_cond_batch(model, [c0, c1, c2, ...])`` call. What
an index *means* is the guider's business: stock ``CFGGuider`` runs [positive, negative], ``PerpNegGuider``
[positive, negative, empty prompt], ``DualCFGGuider`` [negative, cond2, cond1], our Prompt Guidance guider
[positive, negative, baseline prompt]. A patch that gives unconditional image tokens (IP-Adapter) or any
other "no conditioning" treatment cannot know from the index alone which chunks are unconditional, so the
guider declares them under ``transformer_options[KEY]`` and patches read :func:`unconditional_indexes`
(declared indexes, else ``{1}``: what ``CFGGuider`` means).

How a guider declares:

- a guider we write passes ``declare(model_options, indexes)`` to ``calc_cond_batch`` (or sets the class
  attribute ``ATTRIBUTE``, which the wrapper below reads);
- stock guiders cannot be edited, so a node that patches a model (InstantStyle) calls
  :func:`add_guider_wrapper` on its clone: an ``OUTER_SAMPLE`` wrapper that, when any guider samples that
  model, looks up the class that defines the guider's ``predict_noise`` in :data:`STOCK` (their documented
  ``calc_cond_batch`` orders, ComfyUI 0.3.75) and declares its indexes for that sampling run. An unknown
  guider keeps the ``{1}`` fallback, logged once per class.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

log = logging.getLogger(__name__)

KEY = "frozentune_unconditional_indexes"  # transformer_options[KEY]: sorted tuple of unconditional cond indexes
ATTRIBUTE = "frozentune_unconditional_indexes"  # guider class attribute with the same meaning
WRAPPER_KEY = "frozentune_cond_chunks"  # ModelPatcher wrapper key (one wrapper per patcher, however often added)
DEFAULT = frozenset({1})

# (module name's last part, qualname) of the class defining predict_noise -> unconditional indexes.
STOCK: dict[tuple[str, str], frozenset[int]] = {
    # sampling_function: calc_cond_batch([positive, negative]); also BasicGuider and KSampler.
    ("samplers", "CFGGuider"): frozenset({1}),
    # Guider_PerpNeg.predict_noise: [positive, negative, empty]; the result is built around the empty
    # prediction, and the negative is a direction measured from it: both are unconditional.
    ("nodes_perpneg", "Guider_PerpNeg"): frozenset({1, 2}),
    # Guider_DualCFG.predict_noise: [negative, middle (cond2), positive (cond1)], both styles; the negative
    # is the baseline of the outer CFG term, cond2 and cond1 are prompts.
    ("nodes_custom_sampler", "Guider_DualCFG"): frozenset({0}),
}

_logged: set[type] = set()


def _checked(indexes: Iterable[int]) -> tuple[int, ...]:
    values = tuple(indexes)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values):
        raise ValueError(f"unconditional indexes {values!r} must be non-negative ints (positions in the "
                         "guider's calc_cond_batch list, e.g. (1,) for [positive, negative]).")
    return tuple(sorted(set(values)))


def unconditional_indexes(transformer_options: dict) -> frozenset[int]:
    """The cond indexes the guider declared unconditional, else ``{1}`` (stock CFG's negative)."""
    declared = transformer_options.get(KEY)
    return DEFAULT if declared is None else frozenset(_checked(declared))


def declare(model_options: dict, indexes: Iterable[int]) -> dict:
    """A copy of ``model_options`` whose ``transformer_options`` says which indexes are unconditional.

    Shallow: only the ``transformer_options`` dict is new, so the input (often the ModelPatcher's own
    options) is never changed.
    """
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), KEY: _checked(indexes)}
    return options


def _module_tail(module: str) -> str:
    # ComfyUI loads comfy_extras files under a path-like name ('/.../comfy_extras/nodes_perpneg_x_py').
    return re.split(r"[./\\]", module.removesuffix("_x_py"))[-1]


def guider_indexes(guider) -> frozenset[int] | None:
    """The unconditional indexes a guider's class declares or :data:`STOCK` knows, else None."""
    declared = getattr(type(guider), ATTRIBUTE, None)
    if declared is not None:
        return frozenset(_checked(declared))
    owner = next((c for c in type(guider).__mro__ if "predict_noise" in vars(c)), None)
    if owner is None:
        return None
    return STOCK.get((_module_tail(owner.__module__), owner.__qualname__))


def _declare_for_guider(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: declare the running guider's indexes for this sampling run."""
    guider = executor.class_obj
    options = guider.model_options  # CFGGuider.sample's per-run copy, restored after the run
    if KEY not in options.get("transformer_options", {}):
        indexes = guider_indexes(guider)
        if indexes is None:
            if type(guider) not in _logged:
                _logged.add(type(guider))
                log.info("%s is a guider of unknown chunk order: attention patches treat only cond index 1 as "
                         "unconditional (set the class attribute %r to say otherwise).",
                         type(guider).__qualname__, ATTRIBUTE)
        else:
            guider.model_options = declare(options, indexes)
    return executor(*args, **kwargs)


def add_guider_wrapper(model_patcher) -> None:
    """Make every guider that samples ``model_patcher`` declare its unconditional chunks.

    Call it on a clone you own (it adds a wrapper to that patcher); adding it again is a no-op.
    """
    import comfy.patcher_extension

    kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    if not model_patcher.get_wrappers(kind, WRAPPER_KEY):
        model_patcher.add_wrapper_with_key(kind, WRAPPER_KEY, _declare_for_guider)
